"""The discretized logistic mixture benchmark (`python -m bench --dmol`, bench/dmol.py): its
eager PixelCNN++ transcription is the same loss as vae_fast.reference's (values and gradients,
float64, on inputs that reach every branch), a tiny run writes its rows and files, and its
agreement check catches a wrong fused loss or gradient. Timings are not asserted."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vae_fast  # noqa: E402
from bench import dmol  # noqa: E402
from bench import run as bench_run  # noqa: E402
from conftest import fused_backends  # noqa: E402

TINY = {"rgb32": dmol.Problem("rgb32", 2, 3, 4, 3), "gray28": dmol.Problem("gray28", 2, 1, 5, 2)}
# the reference path of the public function, and each fused backend that runs here
BACKENDS = ["reference"] + [b for b in fused_backends() if b == "cpu"]
FAST = dict(min_reps=1, max_reps=1, target_s=0.0, warmup=1, flush_bytes=0)


def _branch_inputs(channels, m=3, k=256, seed=0):
    """float64 params and targets whose pixels reach every branch of the loss: both edge bins,
    interior bins, and bins many scales from every mean (bin probability under 1e-5: the
    density fallback)."""
    p, t = dmol.make_inputs(dmol.Problem("x", 3, channels, 6, m, k), dtype=torch.float64, seed=seed)
    p = p.detach().clone()
    per = 3 if channels == 3 else 2
    for ch in range(channels):  # one image with small scales and means far from its targets
        mean0, scale0 = m + ch * per * m, m + ch * per * m + m
        p[2, mean0:mean0 + m] = 0.9 * torch.sign(-t[2, ch:ch + 1]) + 0.05 * p[2, mean0:mean0 + m]
        p[2, scale0:scale0 + m] = -5.0
    return p.requires_grad_(), t


def _branches(p, t, k=256):
    """How many (pixel, channel, component) terms take each branch (the reference's formula)."""
    c = t.shape[1]
    m = p.shape[1] // (10 if c == 3 else 3)
    x = t.movedim(1, -1).unsqueeze(-1)
    rest = p.detach().movedim(1, -1)[..., m:].unflatten(-1, (c, -1))
    means, ls = rest[..., :m], rest[..., m:2 * m].clamp_min(-7)
    if c == 3:  # coupled means
        a = torch.tanh(rest[..., 2 * m:])
        means = torch.stack((means[..., 0, :], means[..., 1, :] + a[..., 0, :] * x[..., 0, :],
                             means[..., 2, :] + a[..., 1, :] * x[..., 0, :] + a[..., 2, :] * x[..., 1, :]), -2)
    inv, u, h = torch.exp(-ls), x - means, 1.0 / (k - 1)
    delta = torch.sigmoid(inv * (u + h)) - torch.sigmoid(inv * (u - h))
    interior = (x >= -0.999) & (x <= 0.999)
    return dict(low=int((x < -0.999).expand_as(u).sum()), high=int((x > 0.999).expand_as(u).sum()),
                mid=int((interior & (delta > 1e-5)).sum()), fallback=int((interior & (delta <= 1e-5)).sum()))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("k", [256, 32])
def test_eager_transcription_matches_the_reference(channels, k):
    p, t = _branch_inputs(channels, k=k)
    counts = _branches(p, t, k)
    assert all(n > 0 for n in counts.values()), counts  # every branch is compared
    want = vae_fast.reference.discretized_logistic_mixture_nll(p, t, num_bins=k, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, p)
    got = dmol.eager_dmol_loss(p, t, k)
    (got_grad,) = torch.autograd.grad(got, p)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the reference takes sigmoid complements above the mean: the same numbers up to rounding
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9 * float(want_grad.abs().max()))


def test_eager_transcription_uses_pixelcnn_channel_order():
    """Swapping two colour channels' parameter blocks changes the loss: the order is read."""
    p, t = _branch_inputs(3)
    m = p.shape[1] // 10
    q = p.detach().clone()
    q[:, m:m + 3 * m], q[:, m + 3 * m:m + 6 * m] = p[:, m + 3 * m:m + 6 * m].detach(), p[:, m:m + 3 * m].detach()
    a = dmol.eager_dmol_loss(p, t).detach()
    b = dmol.eager_dmol_loss(q, t)
    assert abs(float(a - b)) > 1e-3 * abs(float(a))
    torch.testing.assert_close(b, vae_fast.reference.discretized_logistic_mixture_nll(q, t, reduction="sum"))


def test_make_inputs_are_on_bin_centres():
    p, t = dmol.make_inputs(dmol.PROBLEMS["rgb32"])
    assert p.shape == (16, 100, 32, 32) and t.shape == (16, 3, 32, 32) and p.requires_grad
    bins = (t.double() + 1) * 127.5
    torch.testing.assert_close(bins, bins.round(), rtol=0, atol=1e-4)
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0
    p1, t1 = dmol.make_inputs(dmol.PROBLEMS["gray28"])
    assert p1.shape == (16, 30, 28, 28) and t1.shape == (16, 1, 28, 28)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_run_rows(backend):
    rows = dmol.run("cpu", problems=list(TINY.values()), contenders=("eager", "vae_fast"),
                    backend=backend, log=lambda *a: None, **FAST)
    assert [(r["problem"], r["contender"]) for r in rows] == [
        ("rgb32", "eager"), ("rgb32", "vae_fast"), ("gray28", "eager"), ("gray28", "vae_fast")]
    for r in rows:
        assert r["time_ms"] > 0 and r["x_eager"] > 0 and r["check"] == "ok", r
        assert math.isfinite(r["peak_extra_mb"]) and r["peak_extra_mb"] > 0, r
        assert r["grad_mb"] > 0 and math.isfinite(r["loss"]) and r["loss"] > 0
    assert rows[1]["backend"] == backend and rows[0]["backend"] == "eager"
    assert rows[0]["x_eager"] == 1.0
    table = dmol.table(rows, markdown=True)
    assert len(table) == 2 + len(rows) and "| rgb32 |" in table[2]


def test_tiny_run_with_compile():
    rows = dmol.run("cpu", problems=[TINY["gray28"]], backend="reference", log=lambda *a: None, **FAST)
    assert [r["contender"] for r in rows] == list(dmol.CONTENDERS)
    assert all(r["time_ms"] > 0 for r in rows) and rows[1]["backend"] == "inductor"
    assert math.isfinite(rows[2]["x_compile"]) and rows[2]["x_compile"] > 0


def _wrong_loss(loss):
    return loss * 1.001


def _wrong_grad(loss):  # the same value, a gradient 1% too large
    return loss + 0.01 * (loss - loss.detach())


@pytest.mark.parametrize("corrupt", [_wrong_loss, _wrong_grad], ids=["loss", "grad"])
def test_check_catches_a_wrong_fused_result(monkeypatch, corrupt):
    p, t = dmol.make_inputs(TINY["rgb32"])
    fns = {"eager": dmol.eager_dmol_loss, "vae_fast": dmol.fused_dmol_loss}
    with vae_fast.use_backend("reference"):
        losses, verdicts = dmol.check_agreement(fns, p, t)  # the real one passes
        assert verdicts == {"eager": "ok", "vae_fast": "ok"}
        assert losses["vae_fast"] == pytest.approx(losses["eager"], rel=1e-5)
        nll = vae_fast.discretized_logistic_mixture_nll
        monkeypatch.setattr(vae_fast, "discretized_logistic_mixture_nll",
                            lambda *a, **k: corrupt(nll(*a, **k)))
        with pytest.raises(dmol.Mismatch, match="vae_fast differs"):
            dmol.check_agreement(fns, p, t)
        # a lenient contender (compile) is reported, not raised
        _, verdicts = dmol.check_agreement(fns, p, t, strict=("eager",))
        assert verdicts["eager"] == "ok" and verdicts["vae_fast"].startswith("vae_fast differs")


def test_main_writes_the_files(monkeypatch, tmp_path, capsys):
    for name, prob in TINY.items():
        monkeypatch.setitem(dmol.PROBLEMS, name, prob)
    args = bench_run.parse_args(["--quick", "--reps", "1", "--no-flush", "--device", "cpu", "--backend",
                                 "reference", "--contenders", "eager,vae_fast", "--threads",
                                 str(torch.get_num_threads()), "--out", str(tmp_path)])
    assert dmol.main(args, []) == 0
    out = capsys.readouterr().out
    assert "rgb32: eager/vae_fast" in out and "gray28: eager/vae_fast" in out and "wrote " in out
    header = next(line for line in out.splitlines() if line.startswith("problem "))
    assert "ms/step" in header and "peak extra MB" in header
    stems = {f.suffix: f for f in tmp_path.iterdir()}
    assert set(stems) == {".csv", ".json", ".md"} and stems[".csv"].name.startswith("dmol-cpu-")
    with open(stems[".csv"]) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == dmol.COLUMNS
        assert [r["contender"] for r in reader] == ["eager", "vae_fast"] * 2
    data = json.loads(stems[".json"].read_text())
    assert data["meta"]["vae_fast_backend"] == "reference" and len(data["results"]) == 4
    assert "| rgb32 |" in stems[".md"].read_text()


def test_main_fails_on_a_mismatch(monkeypatch, tmp_path, capsys):
    for name, prob in TINY.items():
        monkeypatch.setitem(dmol.PROBLEMS, name, prob)
    nll = vae_fast.discretized_logistic_mixture_nll
    monkeypatch.setattr(vae_fast, "discretized_logistic_mixture_nll", lambda *a, **k: _wrong_loss(nll(*a, **k)))
    args = bench_run.parse_args(["--quick", "--reps", "1", "--device", "cpu", "--backend", "reference",
                                 "--contenders", "eager,vae_fast", "--threads", str(torch.get_num_threads()),
                                 "--out", str(tmp_path)])
    assert dmol.main(args, []) == 1
    assert "vae_fast differs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dmol_flag_is_wired():
    proc = subprocess.run([sys.executable, "-m", "bench", "--dmol", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--dmol" in proc.stdout and "bench/dmol.py" in proc.stdout and "--contenders" in proc.stdout
