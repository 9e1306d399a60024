"""Benchmarks of vae_fast. `python -m bench` is the main one (see bench/run.py)."""
