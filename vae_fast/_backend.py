"""Backend choice: `VAE_FAST_BACKEND` or `vae_fast.use_backend(name)`.

"auto": CUDA tensors use Triton; CPU tensors use the C++ kernels; other devices (and a missing
extension, after one warning) use the reference. A forced backend never falls back: what it
cannot handle raises `NotImplementedError`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _ext
from ._enums import Backend

BACKENDS = ("auto", "triton", "cpu", "reference")
ENV = "VAE_FAST_BACKEND"
_stack: list = []  # use_backend's nesting (a plain list: torch.compile traces reads of it)
_warned = False
_CPU, _TRITON = int(Backend.CPU), int(Backend.TRITON)


def _check(name, source: str = "vae_fast backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def current() -> str:
    """The backend asked for: the innermost `use_backend`, else $VAE_FAST_BACKEND, else auto."""
    if _stack:
        return _stack[-1]
    return _check(os.environ.get(ENV, "auto") or "auto", f"${ENV} (the vae_fast backend)")


@contextlib.contextmanager
def use_backend(name: str):
    """`with vae_fast.use_backend("reference"): ...` runs every loss inside on that backend."""
    _stack.append(_check(name))
    try:
        yield
    finally:
        _stack.pop()


def triton_runs_on(device: torch.device) -> bool:
    return device.type in _ext.triton_devices


def cpu_extension():
    """(vae_fast._C, "") when the compiled extension is loaded, else (None, why not)."""
    return _ext.module, _ext.reason


def _unavailable(name: str):
    return NotImplementedError(f"vae_fast: the {name} backend is unavailable: {_ext.reason}")


def code(device: torch.device):
    """The op's backend code for tensors on `device` (a Backend), or None: the reference.

    Raises NotImplementedError for a forced backend that cannot run there. (The Triton
    backend on CPU tensors without TRITON_INTERPRET=1 is refused by the op itself.)"""
    global _warned
    name = _stack[-1] if _stack else current()
    if name == "reference":
        return None
    kind = device.type
    if name == "auto":
        if _ext.module is not None:
            if kind == "cpu":
                return _CPU
            if kind == "cuda" and "cuda" in _ext.triton_devices:
                return _TRITON
        if kind in ("cpu", "cuda") and not _warned:
            _warned = True
            why = _ext.reason or "Triton is not installed"
            warnings.warn(f"vae_fast: the fused kernels are unavailable on {kind} ({why}); "
                          "these tensors use the reference implementation", RuntimeWarning,
                          stacklevel=3)
        return None
    if kind not in ("cpu", "cuda") or (name == "cpu" and kind != "cpu"):
        raise NotImplementedError(f"vae_fast: the {name} backend cannot run on {device}")
    if _ext.module is None:
        raise _unavailable(name)
    return _CPU if name == "cpu" else _TRITON


def resolve(device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "triton", "cpu" or "reference"."""
    c = code(device)
    return "reference" if c is None else ("cpu" if c == _CPU else "triton")
