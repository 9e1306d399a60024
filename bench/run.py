"""`python -m bench`: vae_fast's fused ELBO against eager PyTorch and `torch.compile`.

For every problem (case x likelihood x dtype) and pass (forward only; forward + backward), it
prints each contender's median step time, vae_fast's speedup over both baselines, the
effective bandwidth counted with the minimum traffic of docs/design.md, vae_fast's share of the
device's measured copy bandwidth and each contender's peak extra memory; then it writes CSV,
JSON, a Markdown table and a PNG plot. `python -m bench --help` lists the options.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import vae_fast
from vae_fast import _backend

from . import report
from .cases import CASES, CONTENDERS, DEFAULT_CASES, DTYPES, LIKELIHOODS, PASSES, loss_functions, make_inputs, min_traffic_bytes
from .measure import MB, Device, default_threads, heap_setting, paired_ratio, slug, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = dict(cases="mnist,celeba64", likelihoods="bernoulli,gaussian", dtypes="fp32")
# loss and recon-gradient agreement with eager (relative to the largest value); bf16 gradients
# are rounded to 8 bits, so two correct implementations may differ by an ulp
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


def _names(text: str, allowed, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {','.join(allowed)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench", allow_abbrev=False,
        description="vae_fast's fused ELBO against eager PyTorch and torch.compile: time, speedup, "
                    "effective bandwidth and peak memory, forward and forward+backward.")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma list of {','.join(CASES)} (default {','.join(DEFAULT_CASES)})")
    p.add_argument("--likelihoods", default=",".join(LIKELIHOODS),
                   help=f"comma list (default {','.join(LIKELIHOODS)})")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list (default {','.join(DTYPES)})")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma list (default {','.join(CONTENDERS)}); drop compile for a fast rerun")
    p.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="vae_fast backend, as vae_fast.use_backend (default auto)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help=f"torch.set_num_threads (default {default_threads()}, this machine's cores)")
    p.add_argument("--reps", type=int, default=None,
                   help="exactly this many timed rounds (default adaptive: see --min-time)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed steps per pass, at least 10 and at most 100 rounds on a CPU "
                        "(25 and 1000 on CUDA) (default 2 on a CPU, 1 on CUDA)")
    p.add_argument("--no-flush", action="store_true",
                   help="keep caches warm between steps (default: flush them)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test, under a minute on a 2-core CPU: cases "
                        f"{QUICK['cases']}, likelihoods {QUICK['likelihoods']}, dtypes {QUICK['dtypes']} "
                        "unless given, 3-10 rounds; writes to a temporary directory unless --out is given")
    p.add_argument("--out", default=None, help="output directory (default bench/results/)")
    p.add_argument("--steady-heap", action="store_true",
                   help="run with glibc's heap kept (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ "
                        "32 MiB): steps reuse memory already faulted in, instead of paying page "
                        "faults that depend on the heap's layout (see the faults columns); for every "
                        "mode, recorded in the output")
    p.add_argument("--overhead", action="store_true",
                   help="instead: the host cost (us) of a tiny training step, eager vs vae_fast, in four "
                        "variants (bench/overhead.py); honours --device, --threads, --backend, --out, "
                        "--quick and --reps (rounds of 200 steps, default 30)")
    p.add_argument("--objectives", action="store_true",
                   help="instead: fwd+bwd of each elbo_loss option (capacity, free_bits, "
                        "continuous_bernoulli, full=False, optimal) against the plain fused ELBO at "
                        "the same size, and the K=5 Monte-Carlo ELBO, IWAE and mixture_prior_kl "
                        "against their eager formulas (bench/objectives.py); honours --device, "
                        "--threads, --quick, --out and --reps (rounds, default up to 30)")
    args = p.parse_args(argv)
    if args.quick:  # quick narrows only what was not chosen explicitly
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for k, v in QUICK.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
    args.cases = _names(args.cases, CASES, "cases")
    args.likelihoods = _names(args.likelihoods, LIKELIHOODS, "likelihoods")
    args.dtypes = _names(args.dtypes, DTYPES, "dtypes")
    args.contenders = [c for c in CONTENDERS if c in _names(args.contenders, CONTENDERS, "contenders")]
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    return args


def _reps_policy(args, is_cuda: bool) -> dict:
    if args.reps is not None:
        return dict(min_reps=args.reps, max_reps=args.reps, target_s=0.0)
    if args.quick:
        return dict(min_reps=3, max_reps=10, target_s=args.min_time or 0.05)
    if is_cuda:
        return dict(min_reps=25, max_reps=1000, target_s=args.min_time or 1.0)
    return dict(min_reps=10, max_reps=100, target_s=args.min_time or 2.0)


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vae_fast", "csrc"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def _busy_warning(ours: int, log):
    """The 1-minute load average, with a warning when it shows other processes competing for
    the cores besides the `ours` threads of this run (a CPU run's medians then measure the
    scheduler as much as the kernels)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    if load > ours + 1.0:
        log(f"warning: load average {load:.1f} on {default_threads()} cores: other processes "
            "compete for the CPU, timings will be noisy (see the noise % column)")
    return load


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _warm_up(dev: Device, steps: dict, warmup: int, label: str):
    """Runs each step `warmup` times (the first call compiles); returns the first call's
    seconds per contender and the error of each contender that failed."""
    first_call_s, errors = {}, {}
    for c, (step, reset) in steps.items():
        try:
            for i in range(warmup):
                reset()
                t0 = time.perf_counter()
                step()
                dev.sync()
                if i == 0:
                    first_call_s[c] = time.perf_counter() - t0
        except Exception as e:  # a broken contender must not end a long run
            errors[c] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            warnings.warn(f"{label}: {c} failed: {errors[c]}")
    return first_call_s, errors


def _agreement(dev: Device, steps: dict, fns: dict, x, backward: bool, dtype_name: str):
    """Each contender's relative difference from eager, in the loss (forward) or in the recon
    gradient (training step), and a verdict."""
    vals = {}
    for c, (step, reset) in steps.items():
        reset()
        if backward:
            step()
            vals[c] = x.recon.grad.clone()
        else:
            vals[c] = fns[c](*x.args).detach().clone()
        dev.sync()
    if "eager" not in vals:
        return {c: math.nan for c in vals}, "-"
    errs = {c: _rel_err(v, vals["eager"]) for c, v in vals.items()}
    bad = [f"{c} {e:.1e}" for c, e in errs.items() if not e <= TOLERANCE[dtype_name]]
    return errs, ("MISMATCH " + ", ".join(bad)) if bad else "ok"


def _fmt_num(v) -> str:
    return "?" if v is None else f"{v:.2g}"


def _spread(times: dict):
    """Median and quartiles per contender, and the run's noise: the largest interquartile
    range of any contender in % of its median (a shared machine shows here first)."""
    med = {c: statistics.median(t) for c, t in times.items()}
    quart = {c: statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
             for c, t in times.items()}
    noise = max((100.0 * (q[2] - q[0]) / med[c] for c, q in quart.items()), default=math.nan)
    return med, quart, noise


def run_problem(dev: Device, case, likelihood: str, dtype_name: str, contenders, policy,
                backend: str, copy_gbps: float, warmup: int, log) -> list[dict]:
    """Every contender on one problem, both passes: the result rows."""
    x0 = make_inputs(case, likelihood, DTYPES[dtype_name], dev.device)
    eager_fn, fused_fn = loss_functions(likelihood)
    fns = {"eager": eager_fn, "vae_fast": fused_fn}
    if "compile" in contenders:
        torch._dynamo.reset()  # compile this problem's shapes and dtypes afresh (static shapes)
        fns["compile"] = torch.compile(eager_fn)
    engines = {"eager": "eager", "compile": "inductor", "vae_fast": backend}
    rows = []
    for ps in PASSES:
        t_start = time.perf_counter()
        backward = ps == "fwd+bwd"
        x = x0.differentiable() if backward else x0

        def reset(leaves=x.leaves):
            for t in leaves:
                t.grad = None

        def make_step(fn, args=x.args):
            if backward:
                return lambda: fn(*args).backward()
            return lambda: fn(*args)

        steps = {c: (make_step(fns[c]), reset) for c in contenders}
        label = f"{case.name}/{likelihood}/{dtype_name}/{ps}"
        first_call_s, errors = _warm_up(dev, steps, warmup, label)
        live = {c: s for c, s in steps.items() if c not in errors}
        errs, check = _agreement(dev, live, fns, x, backward, dtype_name)
        if errors:
            check = "FAILED " + ",".join(errors) + ("" if check in ("ok", "-") else "; " + check)

        faults = {}
        times, preempted = time_interleaved(dev, live, **policy, faults=faults) if live else ({}, None)
        peaks = {}
        for c, (step, rst) in live.items():
            rst()
            peaks[c] = dev.peak_extra_bytes(step)
        reset()
        med, quart, noise = _spread(times)
        nbytes = min_traffic_bytes(x, backward)
        reps = len(next(iter(times.values()))) if times else 0
        nan3 = [math.nan] * 3
        for c in contenders:
            t = med.get(c, math.nan)
            gbps = nbytes / (t * 1e-3) / 1e9
            rows.append({
                "device": dev.name, "case": case.name, "shape": "x".join(map(str, case.shape)),
                "latent": case.latent, "likelihood": likelihood, "dtype": dtype_name,
                "target_dtype": "bool" if x.target.dtype == torch.bool else dtype_name,
                "pass": ps, "contender": c, "backend": engines[c], "elements": x.recon.numel(),
                "min_bytes": nbytes, "reps": reps, "time_ms": t,
                "time_ms_p25": quart.get(c, nan3)[0], "time_ms_p75": quart.get(c, nan3)[2],
                "time_ms_min": min(times.get(c, [math.nan])), "noise_pct": noise,
                "preempted_per_step": math.nan if preempted is None else preempted,
                "page_faults_per_step": math.nan if faults.get(c) is None else faults[c],
                "gbps": gbps, "pct_copy_bw": 100.0 * gbps / copy_gbps,
                "peak_extra_mb": peaks.get(c, math.nan) / 1e6,
                "speedup_vs_eager": paired_ratio(times.get("eager", []), times.get(c, [])),
                "speedup_vs_compile": paired_ratio(times.get("compile", []), times.get(c, [])),
                "max_rel_err": errs.get(c, math.nan), "check": check,
                "first_call_s": first_call_s.get(c, math.nan), "times_ms": times.get(c, []),
                "error": errors.get(c),
            })
        summary = "  ".join(f"{c} {med[c]:.3f} ms" for c in med)
        log(f"  {case.name:9s} {likelihood:15s} {dtype_name:5s} {ps:8s} {summary}  "
            f"({reps} reps, noise {noise:.0f}%, preempted {_fmt_num(preempted)}/step, {check}, "
            f"{time.perf_counter() - t_start:.1f} s)")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.overhead:
        from . import overhead

        return overhead.main(args, argv)
    if args.objectives:
        from . import objectives

        return objectives.main(args, argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # flush buffers: 256 MiB on CUDA as triton.testing.do_bench; 128 MiB on a CPU, past the
    # size at which copies here run at memory speed rather than cache speed
    flush = 0 if args.no_flush else (256 if device.type == "cuda" else 128) * MB
    dev = Device(device, flush)
    policy = _reps_policy(args, dev.is_cuda)
    warmup = 3 if dev.is_cuda else 2  # the first call compiles (Inductor, Triton)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="vae_fast_bench_")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg=""):
        print(msg, flush=True)

    with vae_fast.use_backend(args.backend):
        t0 = time.perf_counter()
        try:
            backend = _backend.resolve(device)  # may build the C++ extension the first time
        except NotImplementedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        resolve_s = time.perf_counter() - t0
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        threads = torch.get_num_threads()
        n_threads = f"{threads} thread" + ("s" if threads > 1 else "")
        where = dev.name + ("" if dev.is_cuda else f", {n_threads}")
        log(f"vae_fast benchmark on {device.type} ({where})")
        log(f"torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}")
        log(f"vae_fast backend: {backend} (requested {args.backend!r}"
            + (f"; {resolve_s:.0f} s to load it" if resolve_s > 1 else "") + ")")
        load_before = _busy_warning(0, log)
        copy_bytes = 256 * MB
        t0 = time.perf_counter()
        copy_gbps = dev.copy_bandwidth(copy_bytes, reps=5 if args.quick else 20)
        log(f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src) of {copy_bytes // MB} MiB, "
            f"counted 2x bytes, median)")
        how = "CUDA events" if dev.is_cuda else "time.perf_counter"
        flushed = f"caches flushed ({flush // MB} MiB) before each step" if flush else "warm caches"
        if policy["target_s"] > 0:
            reps_txt = (f"at least {policy['min_reps']} rounds and {policy['target_s']:g} s per pass, "
                        f"at most {policy['max_reps']}")
        else:
            reps_txt = f"{policy['min_reps']} rounds"
        log(f"timing: {how}, median of interleaved rounds ({reps_txt}), {warmup} warm-up calls, {flushed}")
        log(f"C heap: {heap_setting()}")
        log("")
        rows = []
        problems = [(CASES[c], lk, dt) for c in args.cases for lk in args.likelihoods for dt in args.dtypes]
        for case, lk, dt in problems:
            rows += run_problem(dev, case, lk, dt, args.contenders, policy, backend, copy_gbps, warmup, log)
        elapsed = time.perf_counter() - t0
        load_after = _busy_warning(0 if dev.is_cuda else threads, log)

    log("")
    for line in report.LEGEND:
        log(line)
    for line in report.table_lines(rows, args.contenders):
        log(line)

    date = datetime.date.today().isoformat()
    tags = ([] if args.backend == "auto" else [args.backend]) + (["quick"] if args.quick else [])
    full = (args.cases == list(DEFAULT_CASES) and args.likelihoods == list(LIKELIHOODS)
            and args.dtypes == list(DTYPES) and args.contenders == list(CONTENDERS))
    if not full and not args.quick:
        tags.append("subset")
    stem = "-".join([device.type, slug(dev.name)] + ([] if dev.is_cuda else [f"{threads}t"]) + tags + [date])
    meta = dict(
        date=date, device_type=device.type, device=dev.name, threads=threads,
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
        python=platform.python_version(), vae_fast=vae_fast.__version__, git=_git_revision(),
        vae_fast_backend=backend, backend_requested=args.backend,
        copy_bandwidth_gbps=copy_gbps, copy_bytes=copy_bytes,
        timing=f"{how}; median over interleaved rounds; {flushed}", reps_policy=policy, heap=heap_setting(),
        warmup_calls=warmup,
        peak_memory=("torch.cuda.max_memory_allocated() - memory_allocated() before one step" if dev.is_cuda
                     else "peak of the running sum of the CPU allocations/frees recorded by "
                          "torch.profiler (profile_memory=True) during one step"),
        min_traffic="fwd: read recon, target (+ recon_logvar), mu, logvar; fwd+bwd: also write the "
                    "gradients of recon (+ recon_logvar), mu, logvar; each at its dtype's size (bool 1 B)",
        eager="F.binary_cross_entropy_with_logits(recon.float(), target.float(), reduction='sum')/B "
              "or 0.5*(s + (y-m)**2*exp(-s)).sum()/B + 0.5*log(2pi)*N/B, plus the KL "
              "-0.5*sum(1 + lv - mu^2 - exp(lv))/B, fp32 math via .float()",
        compile="torch.compile(eager) default mode, compiled afresh per problem",
        load_average_before=load_before, load_average_after=load_after,
        argv=sys.argv[1:] if argv is None else list(argv), elapsed_s=elapsed,
        cases={c: CASES[c].label for c in args.cases},
    )
    caption = (f"{dev.name} ({device.type}{'' if dev.is_cuda else ', ' + n_threads}), torch "
               f"{torch.__version__}, vae_fast backend `{backend}`, copy bandwidth {copy_gbps:.1f} GB/s, {date}")
    title = (f"vae_fast ({backend}) speedup over eager PyTorch and torch.compile on {dev.name}"
             + ("" if dev.is_cuda else f", {n_threads}") + f", {date}")
    paths = report.write_all(out / stem, meta, rows, args.contenders, caption=caption, title=title)
    log("")
    log(f"{len(rows)} rows in {elapsed:.0f} s; wrote {paths[0]} and its {', '.join(q.suffix for q in paths[1:])}")
    return 0
