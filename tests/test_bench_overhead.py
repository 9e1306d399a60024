"""The host-overhead benchmark (`python -m bench --overhead`): a quick run writes its files and
a table of the four variants, and its agreement check catches a wrong loss or gradient.
Timings are not asserted."""
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
from bench import overhead  # noqa: E402
from bench import run as bench_run  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    # --steady-heap: the run re-executes itself with glibc's heap settings (checked in the meta)
    proc = subprocess.run([sys.executable, "-m", "bench", "--overhead", "--quick", "--device", "cpu",
                           "--steady-heap", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _one(out: Path, ext: str) -> Path:
    files = list(out.glob(f"overhead-cpu-*-quick-*.{ext}"))
    assert len(files) == 1, list(out.iterdir())
    return files[0]


def test_quick_run_prints_the_table(quick_run):
    _, stdout = quick_run
    assert "vae_fast backend:" in stdout and "threads" in stdout and "torch " in stdout
    assert "agreement with eager" in stdout and ": ok" in stdout
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("variant "))
    for col in ("eager us/step", "vae_fast us/step", "vae_fast/eager"):
        assert col in header
    for v in overhead.VARIANTS:
        assert any(line.startswith(v + " ") for line in lines), v


def test_quick_run_writes_csv_json_md(quick_run):
    out, _ = quick_run
    with open(_one(out, "csv")) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == overhead.COLUMNS
        rows = list(reader)
    assert [r["variant"] for r in rows] == list(overhead.VARIANTS)
    for r in rows:
        for col in ("eager_us", "vae_fast_us", "ratio"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (r["variant"], col, r[col])
        assert int(r["rounds"]) >= 1 and int(r["steps_per_round"]) >= 1
    data = json.loads(_one(out, "json").read_text())
    assert len(data["results"]) == len(rows)
    for key in ("device", "torch", "threads", "date", "vae_fast_backend"):
        assert data["meta"][key] is not None, key
    assert data["meta"]["vae_fast_backend"] in ("cpu", "reference", "triton")
    from bench.measure import STEADY_HEAP

    assert data["meta"]["heap"] == " ".join(f"{k}={v}" for k, v in STEADY_HEAP.items())
    for r in data["results"]:
        assert set(r["times_us"]) == set(overhead.CONTENDERS)
        assert len(r["times_us"]["eager"]) == len(r["times_us"]["vae_fast"]) == r["rounds"]
    md = _one(out, "md").read_text()
    assert "| variant |" in md and all(f"| {v} |" in md for v in overhead.VARIANTS)


def _wrong_loss(loss):
    return loss * 1.01


def _wrong_grad(loss):
    # the same value, but every gradient gets an extra 1% of the loss's own gradient
    return loss + 0.01 * (loss - loss.detach())


@pytest.mark.parametrize("corrupt", [_wrong_loss, _wrong_grad], ids=["loss", "grad"])
def test_agreement_check_catches_a_wrong_result(monkeypatch, tmp_path, capsys, corrupt):
    elbo_loss = vae_fast.elbo_loss
    monkeypatch.setattr(vae_fast, "elbo_loss", lambda *a, **k: corrupt(elbo_loss(*a, **k)))
    with pytest.raises(overhead.Mismatch, match="differs from eager"):
        overhead.run("cpu", rounds=1, steps=1, warmup=0, out=tmp_path, log=lambda *a: None)
    # the command line reports it, fails, and writes no timings
    argv = ["--overhead", "--quick", "--device", "cpu", "--threads", str(torch.get_num_threads()),
            "--out", str(tmp_path)]  # the threads of this process, left as they are
    assert bench_run.main(argv) == 1
    assert "differs from eager" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
