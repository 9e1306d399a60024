"""`python -m bench --objectives`: what each ELBO option costs next to the plain fused ELBO.

One training step (loss, backward) of `vae_fast.elbo_loss` with each option against the plain
call at the same size, timed in interleaved rounds with caches flushed before each step
(median, ms): the Bernoulli ELBO, its `capacity=` and `free_bits=` forms, and the Gaussian ELBO
with a per-channel `recon_logvar` against its `full=False` form. The ratio is the option's
step time over the plain step's; the objectives issue asks for at most 1.3. Before timing,
each option's loss is checked against the formula written out here. Timings are reported,
never asserted.
"""
from __future__ import annotations

import math
import statistics

import torch

import vae_fast
from vae_fast import _backend

from .cases import CASES
from .measure import Device, default_threads, time_interleaved

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# name -> (likelihood, keyword arguments of the option); the plain call of a row is the same
# likelihood without them
OPTIONS = {
    "capacity": ("bernoulli", dict(capacity=torch.tensor(5.0), beta=4.0)),
    "free_bits": ("bernoulli", dict(free_bits=0.6)),  # most dimensions under it, some over
    "full=False": ("gaussian", dict(full=False)),
}


def _problem(case, likelihood, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape, z = case.shape, case.latent
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    y = torch.rand(shape, generator=g).to(device)
    mu = torch.randn(shape[0], z, generator=g).to(device).requires_grad_()
    lv = (0.5 * torch.randn(shape[0], z, generator=g)).to(device).requires_grad_()
    kw = {}
    if likelihood == "gaussian":
        kw["recon_logvar"] = torch.zeros(shape[1], *([1] * (len(shape) - 2)), device=device).requires_grad_()
    return (x, y, mu, lv), kw


def _check(name, args, kw, opt):
    """The option's loss against its formula, from the plain call's terms."""
    x, y, mu, lv = args
    t = vae_fast.elbo_loss(*args, **kw, likelihood=OPTIONS[name][0], return_terms=True)
    got = vae_fast.elbo_loss(*args, **kw, **opt, likelihood=OPTIONS[name][0])
    if name == "capacity":
        want = t.nll + opt["beta"] * (t.kl - opt["capacity"]).abs()
    elif name == "free_bits":
        kl_bj = 0.5 * (mu ** 2 + lv.exp() - 1 - lv)
        want = t.nll + kl_bj.mean(0).clamp_min(opt["free_bits"]).sum()
    else:
        want = t.loss - HALF_LOG_2PI * x[0].numel()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-3)


def run(device, *, sizes=("celeba64", "img256"), log=print, min_reps=5, max_reps=30, target_s=1.0):
    dev = Device(torch.device(device), 128 * 2 ** 20 if torch.device(device).type == "cpu" else 256 * 2 ** 20)
    log(f"vae_fast ELBO options vs the plain fused ELBO, fwd+bwd, on {dev.name}, "
        f"{torch.get_num_threads()} threads, backend {_backend.resolve(dev.device)}")
    rows = []
    for size in sizes:
        case = CASES[size]
        for name, (likelihood, opt) in OPTIONS.items():
            args, kw = _problem(case, likelihood, dev.device)
            _check(name, args, kw, opt)
            leaves = [a for a in (*args, *kw.values()) if isinstance(a, torch.Tensor) and a.requires_grad]

            def reset():
                for t in leaves:
                    t.grad = None

            def step(extra):
                return lambda: vae_fast.elbo_loss(*args, **kw, **extra, likelihood=likelihood).backward()

            steps = {"plain": (step({}), reset), name: (step(opt), reset)}
            for s, r in steps.values():  # warm-up
                r()
                s()
            times, preempted = time_interleaved(dev, steps, min_reps=min_reps, max_reps=max_reps,
                                                target_s=target_s)
            plain, option = statistics.median(times["plain"]), statistics.median(times[name])
            rows.append(dict(case=size, pixels=math.prod(case.shape), option=name, likelihood=likelihood,
                             plain_ms=plain, option_ms=option, ratio=option / plain, preempted=preempted))
            log(f"  {size:<9} {likelihood:<9} {name:<11} plain {plain:7.3f} ms  option {option:7.3f} ms  "
                f"ratio {option / plain:.2f}  ({len(times['plain'])} rounds, preempted "
                f"{preempted if preempted is None else round(preempted, 2)}/step)")
    return rows


def markdown(rows) -> list[str]:
    out = ["| case | pixels | likelihood | option | plain ms | option ms | option / plain |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['pixels'] / 1e6:.1f} M | {r['likelihood']} | `{r['option']}` | "
                   f"{r['plain_ms']:.3f} | {r['option_ms']:.3f} | {r['ratio']:.2f} |")
    return out


def main(args, argv=None) -> int:
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    device = args.device or "cpu"
    rows = run(device, sizes=("celeba64",) if args.quick else ("celeba64", "img256"),
               min_reps=3 if args.quick else 5, target_s=0.2 if args.quick else 1.0)
    print()
    print("\n".join(markdown(rows)))
    if args.out:
        import json
        import pathlib

        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "objectives.md").write_text("\n".join(markdown(rows)) + "\n")
        (out / "objectives.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out / 'objectives.md'} and {out / 'objectives.json'}")
    return 0
