"""`python -m bench --objectives`: what each objective costs.

1. Each `elbo_loss` option against the plain fused ELBO at the same size: one training step
   (loss, backward) of the Bernoulli ELBO and its `capacity=`, `free_bits=` and
   `likelihood="continuous_bernoulli"` forms, and of the Gaussian ELBO with a per-channel
   `recon_logvar` against its `full=False` and `recon_logvar="optimal"` forms. The ratio is
   the option's step time over the plain step's (the objectives issue asks for at most 1.3).
2. The objectives over K = 5 samples, the Monte-Carlo ELBO (`elbo_loss` with recon (K, B, ...))
   and `iwae_loss`, against the eager formulas users write (the target expanded to the
   samples), and `mixture_prior_kl` at B = 256, K = 500, Z = 64 against its eager formula and
   `torch.compile` of it.
Timed in interleaved rounds with caches flushed before each step (median, ms); a ratio is the
median of the per-round ratios (bench/measure.py: paired_ratio). Before timing,
each vae_fast loss is checked against the formula written out here. Timings are reported,
never asserted.
"""
from __future__ import annotations

import datetime
import math
import statistics

import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import _backend

from .cases import CASES
from .measure import Device, cpu_model, default_threads, heap_setting, paired_ratio, time_interleaved

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# name -> (likelihood of the plain call, keyword arguments of the option, which may replace
# the likelihood or the recon_logvar); the plain call of a row is that likelihood without them
OPTIONS = {
    "capacity": ("bernoulli", dict(capacity=torch.tensor(5.0), beta=4.0)),
    "free_bits": ("bernoulli", dict(free_bits=0.6)),  # most dimensions under it, some over
    "continuous_bernoulli": ("bernoulli", dict(likelihood="continuous_bernoulli")),
    "full=False": ("gaussian", dict(full=False)),
    "optimal": ("gaussian", dict(recon_logvar="optimal")),
}
SAMPLES = 5


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


def _kl(mu, lv):
    return 0.5 * (mu ** 2 + lv.exp() - 1 - lv)


def _check(name, args, kw, opt):
    """The option's loss against its formula, from the plain call's terms."""
    x, y, mu, lv = args
    likelihood = OPTIONS[name][0]
    t = vae_fast.elbo_loss(*args, **kw, likelihood=likelihood, return_terms=True)
    got = vae_fast.elbo_loss(*args, **{**kw, "likelihood": likelihood, **opt})
    b = x.shape[0]
    if name == "capacity":
        want = t.nll + opt["beta"] * (t.kl - opt["capacity"]).abs()
    elif name == "free_bits":
        want = t.nll + _kl(mu, lv).mean(0).clamp_min(opt["free_bits"]).sum()
    elif name == "continuous_bernoulli":
        want = t.loss - torch.log(x / torch.tanh(x / 2)).sum() / b
    elif name == "optimal":
        var = ((y - x) ** 2).mean()
        want = 0.5 * x.numel() * (var.log() + 1 + 2 * HALF_LOG_2PI) / b + t.kl
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
                return lambda: vae_fast.elbo_loss(*args, **{**kw, "likelihood": likelihood, **extra}).backward()

            steps = {"plain": (step({}), reset), name: (step(opt), reset)}
            for s, r in steps.values():  # warm-up
                r()
                s()
            faults = {}
            times, preempted = time_interleaved(dev, steps, min_reps=min_reps, max_reps=max_reps,
                                                target_s=target_s, faults=faults)
            plain, option = statistics.median(times["plain"]), statistics.median(times[name])
            ratio = paired_ratio(times[name], times["plain"])
            rows.append(dict(case=size, pixels=math.prod(case.shape), option=name, likelihood=likelihood,
                             plain_ms=plain, option_ms=option, ratio=ratio, preempted=preempted,
                             plain_faults=faults["plain"], option_faults=faults[name]))
            log(f"  {size:<9} {likelihood:<9} {name:<20} plain {plain:7.3f} ms  option {option:7.3f} ms  "
                f"ratio {ratio:.2f}  ({len(times['plain'])} rounds, preempted "
                f"{preempted if preempted is None else round(preempted, 2)}/step, page faults/step "
                f"{_faults(faults['plain'])} / {_faults(faults[name])})")
    return rows


def _faults(n) -> str:
    return "?" if n is None else f"{n:.0f}"


def markdown(rows) -> list[str]:
    out = ["| case | pixels | likelihood | option | plain ms | option ms | option / plain | page faults / step (plain, option) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['pixels'] / 1e6:.1f} M | {r['likelihood']} | `{r['option']}` | "
                   f"{r['plain_ms']:.3f} | {r['option_ms']:.3f} | {r['ratio']:.2f} | "
                   f"{_faults(r.get('plain_faults'))}, {_faults(r.get('option_faults'))} |")
    return out


def _sampled_problem(case, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape, zd = case.shape, case.latent
    recon = torch.randn(SAMPLES, *shape, generator=g).to(device).requires_grad_()
    target = torch.rand(shape, generator=g).to(device)
    mu = torch.randn(shape[0], zd, generator=g).to(device).requires_grad_()
    lv = (0.5 * torch.randn(shape[0], zd, generator=g)).to(device).requires_grad_()
    z = (mu + torch.exp(0.5 * lv) * torch.randn(SAMPLES, shape[0], zd, generator=g).to(device)).detach()
    return recon, target, z.requires_grad_(), mu, lv


def eager_mc_elbo(recon, target, z, mu, lv):
    nll = F.binary_cross_entropy_with_logits(recon, target.expand_as(recon), reduction="none")
    return (nll.flatten(2).sum(2).mean(0) + _kl(mu, lv).sum(1)).mean()


def eager_iwae(recon, target, z, mu, lv):
    log_px = -F.binary_cross_entropy_with_logits(recon, target.expand_as(recon), reduction="none").flatten(2).sum(2)
    log_pz = -0.5 * (z * z).sum(-1)
    log_qz = -0.5 * (lv + (z - mu) ** 2 * torch.exp(-lv)).sum(-1)
    return -(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(z.shape[0])).mean()


def fused_mc_elbo(recon, target, z, mu, lv):
    return vae_fast.elbo_loss(recon, target, mu, lv)


def fused_iwae(recon, target, z, mu, lv):
    return vae_fast.iwae_loss(recon, target, z, mu, lv)


def eager_mixture_kl(z, mu, lv, pm, plv, logits):
    """The formula with a (B, K, Z) broadcast, as written by hand."""
    log_q = -0.5 * (lv + (z - mu) ** 2 * torch.exp(-lv)).sum(1)
    d = z[:, None, :] - pm[None]
    log_comp = -0.5 * (plv[None] + d * d * torch.exp(-plv)[None]).sum(2)
    return (log_q - torch.logsumexp(torch.log_softmax(logits, 0) + log_comp, 1)).mean()


def _mixture_problem(device, b=256, k=500, zd=64):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = [torch.randn(b, zd, generator=g), torch.randn(b, zd, generator=g),
         0.5 * torch.randn(b, zd, generator=g), torch.randn(k, zd, generator=g),
         0.5 * torch.randn(k, zd, generator=g), torch.randn(k, generator=g)]
    return [a.to(device).requires_grad_() for a in t]


def run_versus(device, *, sizes=("celeba64",), log=print, min_reps=5, max_reps=30, target_s=1.0,
               compile_mixture=True):
    """The K-sample objectives and mixture_prior_kl against their eager formulas (and
    torch.compile of the mixture one): fwd+bwd, ms."""
    dev = Device(torch.device(device), 128 * 2 ** 20 if torch.device(device).type == "cpu" else 256 * 2 ** 20)
    rows = []
    problems = []
    for size in sizes:
        args = _sampled_problem(CASES[size], dev.device)
        label = f"{size}, K={SAMPLES}"
        problems.append(("mc_elbo", label, args, {"eager": eager_mc_elbo, "vae_fast": fused_mc_elbo}))
        problems.append(("iwae", label, args, {"eager": eager_iwae, "vae_fast": fused_iwae}))
    margs = _mixture_problem(dev.device)
    mix = {"eager": eager_mixture_kl, "vae_fast": lambda *a: vae_fast.mixture_prior_kl(*a)}
    if compile_mixture:
        mix["compile"] = torch.compile(eager_mixture_kl)
    problems.append(("mixture_prior_kl", "B=256, K=500, Z=64", margs, mix))
    for name, label, args, fns in problems:
        leaves = [a for a in args if a.requires_grad]
        want = fns["eager"](*args)
        torch.testing.assert_close(fns["vae_fast"](*args).detach(), want.detach(), rtol=1e-4, atol=1e-3)

        def reset():
            for t in leaves:
                t.grad = None

        steps = {n: ((lambda f=f: f(*args).backward()), reset) for n, f in fns.items()}
        for s_, r in steps.values():  # warm-up (and compile)
            r()
            s_()
        times, preempted = time_interleaved(dev, steps, min_reps=min_reps, max_reps=max_reps,
                                            target_s=target_s)
        med = {n: statistics.median(v) for n, v in times.items()}
        row = dict(objective=name, size=label, preempted=preempted,
                   **{f"{n}_ms": v for n, v in med.items()})
        row["x_eager"] = paired_ratio(times["eager"], times["vae_fast"])
        if "compile" in med:
            row["x_compile"] = paired_ratio(times["compile"], times["vae_fast"])
        rows.append(row)
        log(f"  {name:<17} {label:<20} " + "  ".join(f"{n} {v:8.3f} ms" for n, v in med.items())
            + f"  x eager {row['x_eager']:.2f}" + (f"  x compile {row['x_compile']:.2f}" if "x_compile" in row else ""))
    return rows


def markdown_versus(rows) -> list[str]:
    out = ["| objective | size | eager ms | compile ms | vae_fast ms | x eager | x compile |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        comp = f"{r['compile_ms']:.3f}" if "compile_ms" in r else "-"
        xc = f"{r['x_compile']:.2f}" if "x_compile" in r else "-"
        out.append(f"| `{r['objective']}` | {r['size']} | {r['eager_ms']:.3f} | {comp} | "
                   f"{r['vae_fast_ms']:.3f} | {r['x_eager']:.2f} | {xc} |")
    return out


def main(args, argv=None) -> int:
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    device = args.device or "cpu"
    quick = dict(min_reps=3, target_s=0.2) if args.quick else dict(min_reps=5, target_s=1.0)
    if args.reps:  # exactly this many rounds (more than the default 30 on a noisy machine)
        quick = dict(min_reps=args.reps, max_reps=args.reps, target_s=0.0)
    rows = run(device, sizes=("celeba64",) if args.quick else ("celeba64", "img256"), **quick)
    versus = run_versus(device, **quick)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_model()
    header = (f"{name}, {threads} threads, torch {torch.__version__}, backend "
              f"{_backend.resolve(torch.device(device))}, {datetime.date.today()}; fwd+bwd, median of "
              f"{args.reps or 'up to 30'} interleaved rounds, caches flushed before each step; ratios: "
              f"median of the per-round ratios; C heap: {heap_setting()}")
    text = "\n".join([header, ""] + markdown(rows) + [""] + markdown_versus(versus))
    print()
    print(text)
    if args.out:
        import json
        import pathlib

        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "objectives.md").write_text(text + "\n")
        (out / "objectives.json").write_text(json.dumps(dict(options=rows, versus=versus), indent=1) + "\n")
        print(f"wrote {out / 'objectives.md'} and {out / 'objectives.json'}")
    return 0
