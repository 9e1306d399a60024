"""The objectives benchmark (`python -m bench --objectives`): a run on the smallest case
writes a row per option and per K-sample / mixture objective, and its checks of each loss
catch an option that is ignored or a fused loss that is off. Timings are not asserted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vae_fast  # noqa: E402
from bench import objectives  # noqa: E402
from bench.cases import CASES  # noqa: E402


def test_rows_for_every_option():
    rows = objectives.run("cpu", sizes=("mnist",), log=lambda *a: None, min_reps=1, max_reps=1, target_s=0.0)
    assert [r["option"] for r in rows] == list(objectives.OPTIONS)
    assert all(r["plain_ms"] > 0 and r["option_ms"] > 0 and r["ratio"] > 0 for r in rows)
    table = objectives.markdown(rows)
    assert len(table) == 2 + len(rows) and "`free_bits`" in table[3]


@pytest.mark.parametrize("name", list(objectives.OPTIONS))
def test_check_catches_an_ignored_option(name, monkeypatch):
    likelihood, opt = objectives.OPTIONS[name]
    args, kw = objectives._problem(CASES["mnist"], likelihood, torch.device("cpu"))
    objectives._check(name, args, kw, opt)  # the real call passes
    plain = vae_fast.elbo_loss
    monkeypatch.setattr(vae_fast, "elbo_loss", lambda *a, **k: plain(
        *a, **{n: v for n, v in k.items() if n not in opt}))
    with pytest.raises(AssertionError):
        objectives._check(name, args, kw, opt)


def test_versus_rows_and_their_check(monkeypatch):
    run = dict(sizes=("mnist",), log=lambda *a: None, min_reps=1, max_reps=1, target_s=0.0,
               compile_mixture=False)
    rows = objectives.run_versus("cpu", **run)
    assert [r["objective"] for r in rows] == ["mc_elbo", "iwae", "mixture_prior_kl"]
    assert all(r["eager_ms"] > 0 and r["vae_fast_ms"] > 0 for r in rows)
    assert len(objectives.markdown_versus(rows)) == 2 + len(rows)
    iwae = vae_fast.iwae_loss
    monkeypatch.setattr(vae_fast, "iwae_loss", lambda *a, **k: iwae(*a, **k) * 1.01)
    with pytest.raises(AssertionError):
        objectives.run_versus("cpu", **run)
