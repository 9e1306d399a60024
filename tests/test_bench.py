"""The benchmark harness (`python -m bench`): its quick mode runs end to end and writes what it
promises, and its traffic count is docs/design.md's minimum. Timings are not asserted."""
from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.cases import CASES, Inputs, make_inputs, min_traffic_bytes  # noqa: E402

CONTENDERS = ("eager", "compile", "vae_fast")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _one(out: Path, ext: str) -> Path:
    files = list(out.glob(f"*.{ext}"))
    assert len(files) == 1, files
    return files[0]


def test_quick_prints_the_table(quick_run):
    _, stdout = quick_run
    assert "vae_fast backend:" in stdout and "copy bandwidth:" in stdout and "threads" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("case "))
    for col in ("eager ms", "compile ms", "vae_fast ms", "x eager", "x compile", "vae_fast GB/s",
                "% copy BW", "vae_fast MB", "reps"):
        assert col in header


def test_quick_writes_csv_json_png(quick_run):
    out, _ = quick_run
    with open(_one(out, "csv")) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        rows = list(reader)
    meta = json.loads(_one(out, "json").read_text())
    assert len(meta["results"]) == len(rows) > 0
    for key in ("device", "torch", "triton", "threads", "vae_fast_backend", "copy_bandwidth_gbps"):
        assert meta["meta"][key] is not None, key
    assert meta["meta"]["vae_fast_backend"] in ("cpu", "reference", "triton")
    assert _one(out, "png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| case |" in _one(out, "md").read_text()

    problems = {(r["case"], r["likelihood"], r["dtype"], r["pass"]) for r in rows}
    assert {p[3] for p in problems} == {"fwd", "fwd+bwd"}
    for p in problems:
        got = {r["contender"]: r for r in rows if (r["case"], r["likelihood"], r["dtype"], r["pass"]) == p}
        assert set(got) == set(CONTENDERS), p
        for c, r in got.items():
            for col in report.NUMERIC:
                v = float(r[col])
                assert math.isfinite(v) and v > 0, (p, c, col, r[col])
            assert int(r["reps"]) >= 3
            assert r["check"] == "ok", (p, r["check"])  # every contender agrees with eager


def test_quick_mode_stays_out_of_the_results_folder(tmp_path):
    before = set((ROOT / "bench" / "results").glob("*"))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--cases", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--cases" in proc.stderr + proc.stdout
    assert set((ROOT / "bench" / "results").glob("*")) == before


def test_min_traffic_is_the_design_count():
    mnist = CASES["mnist"]
    N, BZ = 128 * 784, 128 * 32
    x = make_inputs(mnist, "bernoulli_bool", torch.float32, "cpu")
    assert min_traffic_bytes(x, backward=False) == N * (4 + 1) + 2 * BZ * 4  # bool target: 1 byte
    assert min_traffic_bytes(x.differentiable(), backward=True) == N * (4 + 1) + 2 * BZ * 4 + N * 4 + 2 * BZ * 4
    g = make_inputs(mnist, "gaussian", torch.bfloat16, "cpu")
    assert isinstance(g, Inputs) and g.recon_logvar.shape == g.recon.shape
    assert min_traffic_bytes(g, backward=False) == 3 * N * 2 + 2 * BZ * 2
    assert min_traffic_bytes(g.differentiable(), backward=True) == 3 * N * 2 + 2 * BZ * 2 + 2 * N * 2 + 2 * BZ * 2


def test_ratios_are_paired_per_round():
    """A speedup is the median of the per-round ratios: a slow phase that hits both contenders
    of a round cancels, where a ratio of medians would take it in (here 2 instead of 1)."""
    from bench.measure import paired_ratio

    num, den = [1.0, 10.0, 10.0], [1.0, 5.0, 10.0]
    assert paired_ratio(num, den) == 1.0
    assert statistics.median(num) / statistics.median(den) == 2.0
    assert math.isnan(paired_ratio([1.0], [1.0, 2.0])) and math.isnan(paired_ratio([], []))


def test_page_faults_are_counted_per_contender():
    """A step that touches fresh mapped memory shows its page faults; one that does not, none."""
    from bench.measure import Device, time_interleaved

    pytest.importorskip("resource")  # getrusage: Unix
    dev = Device(torch.device("cpu"), 0)
    steps = {"fresh": (lambda: torch.empty(16 * 2 ** 20).fill_(1.0), lambda: None),  # 64 MiB, mmap'd
             "nothing": (lambda: None, lambda: None)}
    faults = {}
    time_interleaved(dev, steps, min_reps=3, max_reps=3, target_s=0.0, faults=faults)
    assert faults["fresh"] > 1000 and faults["nothing"] < 50, faults
