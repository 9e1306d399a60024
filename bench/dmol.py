"""`python -m bench --dmol`: the discretized logistic mixture likelihood (PixelCNN++, VDVAE,
NVAE) against the eager code that users copy.

One training step of the loss alone, forward + backward (`loss.backward()` into the params,
which require grad), for three contenders:
  eager     `eager_dmol_loss` below: a plain PyTorch transcription of PixelCNN++'s
            `discretized_mix_logistic_loss` as it is found in the wild (permute to channels-last,
            expand the target over the components, masks multiplied in as floats: some 40
            temporaries of the size of the params or larger, each kept for the backward)
  compile   `torch.compile` of that function (default mode, compiled for these shapes)
  vae_fast  `vae_fast.discretized_logistic_mixture_nll(params, target, reduction="sum")`, on the
            backend that `--backend` asks for (auto on a CPU: the C++ kernels)
Problems: B=16 RGB 3x32x32, M=10 (params 16x100x32x32), and B=16 grayscale 1x28x28, M=10
(params 16x30x28x28), K=256 bins, float32. Before timing, each contender's loss and params
gradient must agree with eager's computed in float64 (loss 1e-5 relative, gradient 1e-3 of
its largest element); a disagreement raises `Mismatch` and nothing is timed. Timed in interleaved rounds with the
caches flushed before each step (bench/measure.py), median ms. Peak extra memory of one step
(bench/measure.py's `Device.peak_extra_bytes`: on a CPU the profiler's allocation events, on
CUDA `max_memory_allocated`) includes the params gradient the step leaves in `.grad`; for
vae_fast it should be that gradient plus O(B). Timings are reported, never asserted.
"""
from __future__ import annotations

import datetime
import math
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import _backend

from . import report
from .measure import MB, Device, heap_setting, slug, time_interleaved
from .run import RESULTS, _busy_warning, _git_revision


@dataclass(frozen=True)
class Problem:
    name: str
    batch: int
    channels: int
    side: int
    mixtures: int
    num_bins: int = 256

    @property
    def params_channels(self) -> int:
        return (10 if self.channels == 3 else 3) * self.mixtures

    @property
    def label(self) -> str:
        return (f"B={self.batch} {self.channels}x{self.side}x{self.side} M={self.mixtures} "
                f"K={self.num_bins}")


PROBLEMS = {
    "rgb32": Problem("rgb32", 16, 3, 32, 10),
    "gray28": Problem("gray28", 16, 1, 28, 10),
}
CONTENDERS = ("eager", "compile", "vae_fast")
COLUMNS = ("device", "problem", "shape", "params_shape", "contender", "backend", "reps", "time_ms",
           "time_ms_p25", "time_ms_p75", "noise_pct", "preempted_per_step", "peak_extra_mb",
           "grad_mb", "extra_beyond_grad_mb", "x_eager", "x_compile", "loss", "check")


class Mismatch(AssertionError):
    """A contender's loss or gradient differs from eager's."""


# ---- the eager baseline: PixelCNN++'s loss as it is copied around -------------------------------

def _log_sum_exp(x):
    """Numerically stable log-sum-exp over the last axis, by hand (as in PixelCNN++)."""
    m, _ = torch.max(x, dim=-1)
    m2, _ = torch.max(x, dim=-1, keepdim=True)
    return m + torch.log(torch.sum(torch.exp(x - m2), dim=-1))


def _log_prob_from_logits(x):
    """log_softmax over the last axis, by hand (as in PixelCNN++)."""
    m, _ = torch.max(x, dim=-1, keepdim=True)
    return x - m - torch.log(torch.sum(torch.exp(x - m), dim=-1, keepdim=True))


def _bin_log_probs(x, means, log_scales, num_bins):
    """Per component log-probability of the target's bin: open-ended edge bins, the sigmoid
    difference in between, the density at the bin centre where that difference is tiny."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half_bin = 1.0 / (num_bins - 1)
    plus_in = inv_stdv * (centered_x + half_bin)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - half_bin)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log prob of the lowest bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # log prob of the highest bin
    cdf_delta = cdf_plus - cdf_min  # prob of the bins in between
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    inner_inner_cond = (cdf_delta > 1e-5).float()
    inner_inner_out = (inner_inner_cond * torch.log(torch.clamp(cdf_delta, min=1e-12))
                       + (1.0 - inner_inner_cond) * (log_pdf_mid - math.log((num_bins - 1) / 2)))
    inner_cond = (x > 0.999).float()
    inner_out = inner_cond * log_one_minus_cdf_min + (1.0 - inner_cond) * inner_inner_out
    cond = (x < -0.999).float()
    return cond * log_cdf_plus + (1.0 - cond) * inner_out


def eager_dmol_loss(l, x, num_bins: int = 256):
    """-log p(x | l) summed over everything: l (B, 10 M, H, W) for RGB x (B, 3, H, W), or
    (B, 3 M, H, W) for grayscale x (B, 1, H, W), x in [-1, 1] (PixelCNN++'s
    `discretized_mix_logistic_loss` and its 1-channel variant)."""
    x = x.permute(0, 2, 3, 1)  # channels last, as the TensorFlow original
    l = l.permute(0, 2, 3, 1)
    xs = list(x.shape)  # (B, H, W, C)
    ls = list(l.shape)  # (B, H, W, P)
    if xs[-1] == 3:
        nr_mix = ls[-1] // 10
        logit_probs = l[:, :, :, :nr_mix]
        l = l[:, :, :, nr_mix:].contiguous().view(xs + [nr_mix * 3])  # means, scales, coefficients
        means = l[:, :, :, :, :nr_mix]
        log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.0)
        coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
        # the target once per component (a zeros tensor added, as in the original)
        x = x.contiguous().unsqueeze(-1) + torch.zeros(xs + [nr_mix], dtype=x.dtype, device=x.device)
        m2 = (means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
        m3 = (means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
              + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
        means = torch.cat((means[:, :, :, 0, :].unsqueeze(3), m2, m3), dim=3)
    else:
        nr_mix = ls[-1] // 3
        logit_probs = l[:, :, :, :nr_mix]
        l = l[:, :, :, nr_mix:].contiguous().view(xs + [nr_mix * 2])  # means, scales
        means = l[:, :, :, :, :nr_mix]
        log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.0)
        x = x.contiguous().unsqueeze(-1) + torch.zeros(xs + [nr_mix], dtype=x.dtype, device=x.device)
    log_probs = _bin_log_probs(x, means, log_scales, num_bins)
    log_probs = torch.sum(log_probs, dim=3) + _log_prob_from_logits(logit_probs)
    return -torch.sum(_log_sum_exp(log_probs))


def fused_dmol_loss(params, target, num_bins: int = 256):
    """The same loss, fused: vae_fast's public function with reduction="sum"."""
    return vae_fast.discretized_logistic_mixture_nll(params, target, num_bins=num_bins, reduction="sum")


# ---- problems, checks, timing --------------------------------------------------------------------

def make_inputs(problem: Problem, device="cpu", dtype=torch.float32, seed: int = 0):
    """params (B, P, H, W) requiring grad, as a decoder's output might be (log-scales around
    -2, some logits large), and a target on the bin centres with some pixels on the edge bins."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, c, s, m, k = problem.batch, problem.channels, problem.side, problem.mixtures, problem.num_bins
    params = torch.randn(b, problem.params_channels, s, s, generator=g, dtype=torch.float64)
    # log-scale channels: per colour channel, after the M logits and M means
    per = 3 if c == 3 else 2
    for ch in range(c):
        start = m + ch * per * m + m
        params[:, start:start + m] = params[:, start:start + m] - 2.0
    bins = torch.randint(0, k, (b, c, s, s), generator=g)
    bins[:, :, 0, :] = 0  # an edge row at each end
    bins[:, :, -1, :] = k - 1
    target = bins.to(torch.float64) / ((k - 1) / 2) - 1.0
    return (params.to(device=device, dtype=dtype).requires_grad_(),
            target.to(device=device, dtype=dtype))


def check_agreement(fns: dict, params, target, num_bins: int = 256, *, loss_rtol=1e-5,
                    grad_tol=1e-3, strict=("eager", "vae_fast")):
    """Every contender's loss and params gradient against eager's in float64 (the truth:
    eager's own float32 gradient loses up to ~5e-4 of the largest gradient to the cancellation
    in `sigmoid(plus) - sigmoid(minus)` near 1, which the fused kernels avoid): the loss to
    `loss_rtol` relative, the gradient to `grad_tol` of the largest |gradient|, elementwise.
    Raises Mismatch for a contender in `strict`; returns each contender's loss and the
    verdict per contender ("ok" or what differs: a compile contender's verdict is reported,
    not raised, since Inductor's numerics are not vae_fast's to fix)."""
    p64 = params.detach().double().requires_grad_()
    want_loss = eager_dmol_loss(p64, target.double(), num_bins)
    want_loss.backward()
    want_loss, want_grad = want_loss.detach(), p64.grad
    scale = float(want_grad.abs().max())
    losses, verdicts = {}, {}
    for name, fn in fns.items():
        params.grad = None
        loss = fn(params, target, num_bins)
        loss.backward()
        grad = params.grad.double()
        params.grad = None
        losses[name] = float(loss.detach())
        loss_err = abs(losses[name] - float(want_loss)) / max(abs(float(want_loss)), 1e-30)
        grad_err = float((grad - want_grad).abs().max()) / max(scale, 1e-30)
        verdicts[name] = "ok"
        if not (loss_err <= loss_rtol and grad_err <= grad_tol):
            verdicts[name] = (f"{name} differs from eager (float64): loss {loss_err:.1e} relative "
                              f"(at most {loss_rtol:g}), params gradient {grad_err:.1e} of the largest "
                              f"(at most {grad_tol:g})")
            if name in strict:
                raise Mismatch(verdicts[name])
    return losses, verdicts


def run(device="cpu", *, problems=("rgb32", "gray28"), contenders=CONTENDERS, backend="auto",
        min_reps=10, max_reps=100, target_s=2.0, warmup=2, flush_bytes=None, memory=True,
        log=print) -> list[dict]:
    """Checks and times every contender on every problem (names of PROBLEMS, or Problem
    objects): the result rows (one per problem and contender)."""
    device = torch.device(device)
    if flush_bytes is None:
        flush_bytes = (256 if device.type == "cuda" else 128) * MB
    dev = Device(device, flush_bytes)
    rows = []
    with vae_fast.use_backend(backend):
        engine = _backend.resolve(device)
        for problem in problems:
            problem = PROBLEMS[problem] if isinstance(problem, str) else problem
            pname = problem.name
            params, target = make_inputs(problem, device)
            fns = {"eager": eager_dmol_loss, "vae_fast": fused_dmol_loss}
            if "compile" in contenders:
                torch._dynamo.reset()
                fns["compile"] = torch.compile(eager_dmol_loss)
            fns = {c: fns[c] for c in contenders}
            k = problem.num_bins

            def reset():
                params.grad = None

            steps = {c: ((lambda f=f: f(params, target, k).backward()), reset) for c, f in fns.items()}
            for step, rst in steps.values():  # warm-up; the first call compiles
                for _ in range(warmup):
                    rst()
                    step()
                    dev.sync()
            losses, verdicts = check_agreement(fns, params, target, k)
            for c, v in verdicts.items():
                if v != "ok":
                    log(f"  warning: {pname}: {v}; timed anyway")
            times, preempted = time_interleaved(dev, steps, min_reps=min_reps, max_reps=max_reps,
                                                target_s=target_s)
            peaks = {}
            for c, (step, rst) in steps.items():
                rst()
                peaks[c] = dev.peak_extra_bytes(step) if memory else math.nan
            reset()
            med = {c: statistics.median(t) for c, t in times.items()}
            quart = {c: statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
                     for c, t in times.items()}
            noise = max(100.0 * (q[2] - q[0]) / med[c] for c, q in quart.items())
            grad_mb = params.numel() * params.element_size() / 1e6
            for c in contenders:
                rows.append({
                    "device": dev.name, "problem": pname,
                    "shape": "x".join(map(str, target.shape)),
                    "params_shape": "x".join(map(str, params.shape)), "contender": c,
                    "backend": {"eager": "eager", "compile": "inductor"}.get(c, engine),
                    "reps": len(times[c]), "time_ms": med[c], "time_ms_p25": quart[c][0],
                    "time_ms_p75": quart[c][2], "noise_pct": noise,
                    "preempted_per_step": math.nan if preempted is None else preempted,
                    "peak_extra_mb": peaks[c] / 1e6, "grad_mb": grad_mb,
                    "extra_beyond_grad_mb": peaks[c] / 1e6 - grad_mb,
                    "x_eager": med["eager"] / med[c] if "eager" in med else math.nan,
                    "x_compile": med["compile"] / med[c] if "compile" in med else math.nan,
                    "loss": losses[c], "check": verdicts[c], "times_ms": [round(t, 4) for t in times[c]],
                })
            log(f"  {pname:7s} {problem.label:28s} "
                + "  ".join(f"{c} {med[c]:8.3f} ms" for c in contenders)
                + f"  ({len(times[contenders[0]])} rounds, noise {noise:.0f}%, check "
                + ("ok" if all(v == "ok" for v in verdicts.values()) else "see warning") + ")")
    return rows


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows, *, markdown=False) -> list[str]:
    """One line per problem and contender: ms, fused speedup over it (its time / fused time),
    peak extra MB and the part of it beyond the params gradient."""
    head = ["problem", "shape", "contender", "backend", "ms/step", "p25", "p75", "vs vae_fast",
            "peak extra MB", "beyond grad MB", "check"]
    fused = {r["problem"]: r for r in rows if r["contender"] == "vae_fast"}
    body = []
    for r in rows:
        f = fused.get(r["problem"])
        ratio = r["time_ms"] / f["time_ms"] if f else math.nan
        body.append([r["problem"], r["shape"], r["contender"], r["backend"], _fmt(r["time_ms"], ".3f"),
                     _fmt(r["time_ms_p25"], ".3f"), _fmt(r["time_ms_p75"], ".3f"),
                     _fmt(ratio, ".2f") + ("x" if f else ""), _fmt(r["peak_extra_mb"], ".2f"),
                     _fmt(r["extra_beyond_grad_mb"], ".3f"),
                     "ok" if r["check"] == "ok" else "MISMATCH"])
    return report.format_table(head, body, left=4, markdown=markdown)


def main(args, argv=None) -> int:
    """`python -m bench --dmol`, with bench/run.py's parsed arguments: --device, --threads,
    --backend, --out, --quick (3-10 rounds, a temporary directory unless --out), --reps,
    --min-time, --no-flush, --contenders (eager, compile, vae_fast)."""
    import sys

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.reps is not None:
        policy = dict(min_reps=args.reps, max_reps=args.reps, target_s=0.0)
    elif args.quick:
        policy = dict(min_reps=3, max_reps=10, target_s=args.min_time or 0.05)
    else:
        policy = dict(min_reps=10, max_reps=100, target_s=args.min_time or 2.0)
    contenders = tuple(c for c in CONTENDERS if c in args.contenders or (c == "vae_fast"))
    if args.out:
        out = Path(args.out)
    else:
        out = Path(tempfile.mkdtemp(prefix="vae_fast_dmol_")) if args.quick else RESULTS
    threads = torch.get_num_threads()
    dev_name = Device(device, 0).name
    date = datetime.date.today().isoformat()
    log = lambda m="": print(m, flush=True)  # noqa: E731
    where = dev_name + ("" if device.type == "cuda" else f", {threads} thread" + ("s" if threads > 1 else ""))
    try:
        with vae_fast.use_backend(args.backend):
            engine = _backend.resolve(device)
    except NotImplementedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"vae_fast discretized logistic mixture on {device.type} ({where}), {date}")
    log(f"torch {torch.__version__}, python {platform.python_version()}, vae_fast backend: {engine} "
        f"(requested {args.backend!r})")
    log(f"fwd+bwd of the loss into the params (reduction sum), float32; median of interleaved rounds "
        f"({policy['min_reps']}-{policy['max_reps']} rounds, {policy['target_s']:g} s), caches "
        + ("warm" if args.no_flush else "flushed"))
    load_before = _busy_warning(0, log)
    try:
        rows = run(device, contenders=contenders, backend=args.backend, log=log,
                   flush_bytes=0 if args.no_flush else None, **policy)
    except (Mismatch, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_after = _busy_warning(0 if device.type == "cuda" else threads, log)
    log("")
    for line in table(rows):
        log(line)
    fused = {r["problem"]: r for r in rows if r["contender"] == "vae_fast"}
    for p, f in fused.items():
        log(f"{p}: eager/vae_fast {_fmt(f['x_eager'], '.1f')}x, compile/vae_fast "
            f"{_fmt(f['x_compile'], '.1f')}x; vae_fast extra memory {f['peak_extra_mb']:.2f} MB = params "
            f"grad {f['grad_mb']:.2f} MB + {f['extra_beyond_grad_mb'] * 1e6:.0f} bytes")
    meta = dict(
        date=date, device_type=device.type, device=dev_name, threads=threads, torch=torch.__version__,
        python=platform.python_version(), vae_fast=vae_fast.__version__, git=_git_revision(),
        vae_fast_backend=engine, backend_requested=args.backend, reps_policy=policy, heap=heap_setting(),
        problems={p: PROBLEMS[p].label for p in PROBLEMS},
        step="params.grad = None; loss(params, target).backward(); reduction sum",
        eager="bench/dmol.py eager_dmol_loss: PixelCNN++ discretized_mix_logistic_loss in PyTorch",
        compile="torch.compile(eager_dmol_loss), default mode",
        peak_memory=("torch.cuda.max_memory_allocated() - memory_allocated() before one step"
                     if device.type == "cuda" else "peak of the running sum of the CPU allocations/"
                     "frees recorded by torch.profiler (profile_memory=True) during one step"),
        load_average_before=load_before, load_average_after=load_after,
        argv=sys.argv[1:] if argv is None else list(argv),
    )
    out.mkdir(parents=True, exist_ok=True)
    tags = ([] if args.backend == "auto" else [args.backend]) + (["quick"] if args.quick else [])
    stem = "-".join(["dmol", device.type, slug(dev_name)]
                    + ([] if device.type == "cuda" else [f"{threads}t"]) + tags + [date])
    paths = [out / f"{stem}{ext}" for ext in (".csv", ".json", ".md")]
    report.write_csv(paths[0], rows, columns=COLUMNS)
    report.write_json(paths[1], meta, rows)
    caption = (f"Discretized logistic mixture NLL, fwd+bwd, {where}, torch {torch.__version__}, "
               f"vae_fast backend `{engine}`, {date}")
    paths[2].write_text(caption + "\n\n" + "\n".join(table(rows, markdown=True)) + "\n")
    log("")
    log(f"wrote {paths[0]} and its {', '.join(p.suffix for p in paths[1:])}")
    return 0
