"""`python -m bench --overhead`: the host cost of one tiny training step of the loss.

At typical VAE sizes the loss moves little memory: a GPU reads and writes an MNIST or
CelebA-64 batch's logits, targets and gradients in 1-20 us, less than the Python, dispatcher
and autograd work that launches it. So on a GPU the host cost decides what a fused loss saves,
and the bandwidth table of `python -m bench` does not show it. This measures that cost
directly: the tensors are tiny (B=4, 3x4x4 images, Z=8), so kernel time is negligible and what
remains per step is clearing the leaves' `.grad`, building the loss and running its backward.

Four variants, each as eager PyTorch (the formula users write) and as `vae_fast.elbo_loss`:
  float beta      Bernoulli ELBO from logits, beta=0.5
  tensor beta     the same with beta a 0-d tensor (KL annealing under torch.compile)
  gaussian per-channel recon_logvar
                  a learned recon_logvar of shape (C,1,1) that requires grad
  reduction none  Bernoulli ELBO per sample, shape (B,), backward with a ones(B) gradient
The table also names vae_fast's autograd node: `vae_fast::FusedLossBackward` is the op's own
C++ node (every fused call, on every device); anything else means the call did not reach it.

Before timing, vae_fast's loss and gradients must agree with eager's (float32 tolerances of
`torch.testing.assert_close`); a disagreement raises `Mismatch` and nothing is timed. Steps run
in rounds of `steps` back to back, timed with `time.perf_counter`, the two contenders
interleaved (who goes first alternates); the median round / steps is reported in us, and
vae_fast/eager is the median of the per-round ratios (bench/measure.py: paired_ratio). On CUDA
the round ends with one `torch.cuda.synchronize()` (not one per step, which would add the
launch latency to every step): the time is then the throughput of the step, which for these
sizes is its host cost. Timings are reported, never asserted.

Reading a CPU run: eager's `binary_cross_entropy_with_logits` calls torch's log_sigmoid kernel,
which opens a parallel region at any size (grain size 1). With more than one thread on a
machine whose other cores are busy, each step then waits for a preempted thread, milliseconds
instead of microseconds: the `preempt` column (involuntary context switches per step) and the
load-average warning show it; `--threads 1` removes it.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import _backend

from . import report
from .cases import HALF_LOG_2PI
from .measure import Device, _involuntary_switches, heap_setting, paired_ratio, slug
from .run import RESULTS, _busy_warning, _git_revision

B, SHAPE, Z = 4, (3, 4, 4), 8
VARIANTS = ("float beta", "tensor beta", "gaussian per-channel recon_logvar", "reduction none")
CONTENDERS = ("eager", "vae_fast")
COLUMNS = ("device", "variant", "eager_us", "vae_fast_us", "ratio", "eager_us_p25", "eager_us_p75",
           "vae_fast_us_p25", "vae_fast_us_p75", "noise_pct", "eager_preempted_per_step",
           "vae_fast_preempted_per_step", "rounds", "steps_per_round", "backend", "vae_fast_grad_fn")


class Mismatch(AssertionError):
    """vae_fast and eager disagree on a variant's loss or gradients."""


def _kl(mu, lv, dim=None):
    terms = 1 + lv - mu**2 - lv.exp()
    return -0.5 * (torch.sum(terms) if dim is None else torch.sum(terms, dim=dim))


def eager_loss(variant: str, x, y, mu, lv, s, beta):
    if variant == "reduction none":
        return F.binary_cross_entropy_with_logits(x, y, reduction="none").flatten(1).sum(1) + _kl(mu, lv, 1)
    if variant.startswith("gaussian"):
        nll = 0.5 * (s + (y - x) ** 2 * torch.exp(-s)).sum() / B + HALF_LOG_2PI * x.numel() / B
        return nll + _kl(mu, lv) / B
    return F.binary_cross_entropy_with_logits(x, y, reduction="sum") / B + beta * (_kl(mu, lv) / B)


def fused_loss(variant: str, x, y, mu, lv, s, beta):
    if variant == "reduction none":
        return vae_fast.elbo_loss(x, y, mu, lv, reduction="none")
    if variant.startswith("gaussian"):
        return vae_fast.elbo_loss(x, y, mu, lv, likelihood="gaussian", recon_logvar=s)
    return vae_fast.elbo_loss(x, y, mu, lv, beta=beta)


def make_problem(variant: str, device):
    """(leaves that require grad, the loss's arguments after the variant, backward's gradient)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    gaussian = variant.startswith("gaussian")
    x = rand(B, *SHAPE).requires_grad_()
    y = rand(B, *SHAPE) if gaussian else torch.rand(B, *SHAPE, generator=g).to(device)
    mu, lv = rand(B, Z).requires_grad_(), (0.5 * rand(B, Z)).requires_grad_()
    s = (0.3 * rand(SHAPE[0], 1, 1)).requires_grad_() if gaussian else None
    beta = torch.tensor(0.5, device=device) if variant == "tensor beta" else 0.5
    grad = torch.ones(B, device=device) if variant == "reduction none" else None
    leaves = [t for t in (x, mu, lv, s) if t is not None]
    return leaves, (x, y, mu, lv, s, beta), grad


def make_step(fn, variant: str, leaves, args, grad):
    def step():
        for t in leaves:
            t.grad = None
        fn(variant, *args).backward(grad)
    return step


def check_agreement(variant: str, device) -> str:
    """Raises Mismatch unless both contenders give the same loss and gradients; returns the
    name of vae_fast's autograd node (which path it took)."""
    got = {}
    for name, fn in (("eager", eager_loss), ("vae_fast", fused_loss)):
        leaves, args, grad = make_problem(variant, device)
        loss = fn(variant, *args)
        node = loss.grad_fn.name().replace("torch::autograd::", "")
        loss.backward(grad)
        got[name] = [loss.detach()] + [t.grad for t in leaves]
    what = ["loss", "grad recon", "grad mu", "grad logvar", "grad recon_logvar"]
    for w, a, b in zip(what, got["vae_fast"], got["eager"]):
        try:
            torch.testing.assert_close(a, b)
        except AssertionError as e:
            raise Mismatch(f"{variant}: vae_fast's {w} differs from eager's: {e}") from None
    return node


def time_variant(dev: Device, variant: str, rounds: int, steps: int, warmup: int):
    """Per contender the list of per-step times (us) of each round, and the involuntary
    context switches of this process per step (None where unknown): a busy machine shows there."""
    fns = {"eager": eager_loss, "vae_fast": fused_loss}
    run = {c: make_step(fns[c], variant, *make_problem(variant, dev.device)) for c in CONTENDERS}
    for step in run.values():
        for _ in range(warmup):
            step()
    dev.sync()
    times = {c: [] for c in CONTENDERS}
    switches = {c: 0 for c in CONTENDERS}
    for r in range(rounds):
        for c in (CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]):
            step = run[c]
            before = _involuntary_switches()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            dev.sync()
            times[c].append((time.perf_counter() - t0) * 1e6 / steps)
            after = _involuntary_switches()
            switches[c] = None if None in (before, after, switches[c]) else switches[c] + after - before
    return times, {c: None if n is None else n / (rounds * steps) for c, n in switches.items()}


def _quartiles(t):
    return statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3


def table(rows, *, markdown=False) -> list[str]:
    head = ["variant", "eager us/step", "vae_fast us/step", "vae_fast/eager", "noise %",
            "preempt eager/vae_fast", "vae_fast grad_fn"]
    pre = lambda v: "?" if v is None else f"{v:.2g}"  # noqa: E731
    body = [[r["variant"], f"{r['eager_us']:.1f}", f"{r['vae_fast_us']:.1f}", f"{r['ratio']:.2f}",
             f"{r['noise_pct']:.0f}",
             f"{pre(r['eager_preempted_per_step'])} / {pre(r['vae_fast_preempted_per_step'])}",
             r["vae_fast_grad_fn"]] for r in rows]
    return report.format_table(head, body, left=1, markdown=markdown)


def run(device, *, rounds=30, steps=200, warmup=50, out=None, tags=(), log=print, argv=None):
    """Checks and times every variant on `device`; writes CSV, JSON and Markdown to `out`
    (unless None); returns (rows, meta, paths)."""
    device = torch.device(device)
    dev = Device(device, 0)
    backend = _backend.resolve(device)  # may build the C++ extension the first time
    threads = torch.get_num_threads()
    where = dev.name + ("" if dev.is_cuda else f", {threads} thread" + ("s" if threads > 1 else ""))
    date = datetime.date.today().isoformat()
    log(f"vae_fast host overhead on {device.type} ({where}), {date}")
    log(f"torch {torch.__version__}, python {platform.python_version()}, vae_fast backend: {backend}")
    log(f"tiny step: recon {B}x{'x'.join(map(str, SHAPE))}, Z={Z}; median of {rounds} interleaved "
        f"rounds of {steps} steps (clear .grad, loss, backward), {warmup} warm-up steps")
    load_before = _busy_warning(0, log)
    nodes = {v: check_agreement(v, device) for v in VARIANTS}
    log("agreement with eager (loss and gradients, float32 assert_close): ok")
    rows = []
    for v in VARIANTS:
        times, preempted = time_variant(dev, v, rounds, steps, warmup)
        med = {c: statistics.median(t) for c, t in times.items()}
        q = {c: _quartiles(t) for c, t in times.items()}
        noise = max(100.0 * (q[c][2] - q[c][0]) / med[c] for c in CONTENDERS)
        rows.append({
            "device": dev.name, "variant": v, "eager_us": med["eager"], "vae_fast_us": med["vae_fast"],
            "ratio": paired_ratio(times["vae_fast"], times["eager"]), "eager_us_p25": q["eager"][0],
            "eager_us_p75": q["eager"][2], "vae_fast_us_p25": q["vae_fast"][0],
            "vae_fast_us_p75": q["vae_fast"][2], "noise_pct": noise,
            "eager_preempted_per_step": preempted["eager"],
            "vae_fast_preempted_per_step": preempted["vae_fast"], "rounds": rounds,
            "steps_per_round": steps,
            "backend": backend, "vae_fast_grad_fn": nodes[v],
            "times_us": {c: [round(x, 3) for x in t] for c, t in times.items()},
        })
    load_after = _busy_warning(0 if dev.is_cuda else threads, log)
    log("")
    for line in table(rows):
        log(line)
    meta = dict(
        date=date, device_type=device.type, device=dev.name, threads=threads, torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(), vae_fast=vae_fast.__version__,
        git=_git_revision(), vae_fast_backend=backend, shapes=dict(recon=[B, *SHAPE], latent=[B, Z]),
        timing=f"time.perf_counter around rounds of {steps} steps"
               + (", one torch.cuda.synchronize() per round (timed)" if dev.is_cuda else "")
               + f"; per-step time = round / steps; median over {rounds} interleaved rounds; "
               f"{warmup} warm-up steps",
        step="for leaf: leaf.grad = None; loss = f(...); loss.backward(grad) "
             "(grad = ones(B) for reduction none, made once)",
        eager="F.binary_cross_entropy_with_logits(x, y, reduction='sum')/B + beta*KL/B; gaussian: "
              "0.5*(s + (y-m)**2*exp(-s)).sum()/B + 0.5*log(2pi)*N/B + KL/B; none: per-sample sums",
        load_average_before=load_before, load_average_after=load_after, argv=argv, heap=heap_setting(),
    )
    paths = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "-".join(["overhead", device.type, slug(dev.name)]
                        + ([] if dev.is_cuda else [f"{threads}t"]) + list(tags) + [date])
        paths = [out / f"{stem}{ext}" for ext in (".csv", ".json", ".md")]
        report.write_csv(paths[0], rows, columns=COLUMNS)
        report.write_json(paths[1], meta, rows)
        caption = (f"Host cost of a tiny ELBO training step, {where}, torch {torch.__version__}, "
                   f"vae_fast backend `{backend}`, {date}")
        paths[2].write_text(caption + "\n\n" + "\n".join(table(rows, markdown=True)) + "\n")
        log("")
        log(f"wrote {paths[0]} and its {', '.join(p.suffix for p in paths[1:])}")
    return rows, meta, paths


def main(args, argv=None) -> int:
    """`python -m bench --overhead`, with bench/run.py's parsed arguments: --device, --threads,
    --backend, --out, --quick (3 rounds of 20 steps, a temporary directory unless --out) and
    --reps (rounds)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rounds = args.reps or (3 if args.quick else 30)
    steps, warmup = (20, 10) if args.quick else (200, 50)
    if args.out:
        out = Path(args.out)
    else:
        out = Path(tempfile.mkdtemp(prefix="vae_fast_overhead_")) if args.quick else RESULTS
    tags = ([] if args.backend == "auto" else [args.backend]) + (["quick"] if args.quick else [])
    with vae_fast.use_backend(args.backend):
        try:
            run(device, rounds=rounds, steps=steps, warmup=warmup, out=out, tags=tags,
                log=lambda m="": print(m, flush=True), argv=sys.argv[1:] if argv is None else list(argv))
        except (Mismatch, NotImplementedError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0
