"""Micro-benchmark of the fused C++ CPU kernel against eager PyTorch and torch.compile.

Bernoulli-from-logits negative ELBO in float32, forward + backward with gradients for the
logits, mu and logvar, at two sizes:
  large: x, y (32, 3, 256, 256) = 6.3M pixels, mu/logvar (32, 256)
  small: x, y (64, 3, 64, 64)   = 0.8M pixels, mu/logvar (64, 128)

  eager:    F.binary_cross_entropy_with_logits(x, y, reduction="sum")/B
            + (-0.5*(1 + lv - mu^2 - lv.exp())).sum()/B, then autograd
  compile:  torch.compile of the same function, then autograd
  fused:    torch.ops.vae_fast.fused_fwd (the C++ backend) writing loss + all three gradients in
            one pass into fresh buffers, as the op does (its backward with grad_output 1 moves
            no memory); also forward only

Methods are timed round-robin (one call of each per round) so that noise from other work
on the machine hits all of them alike; the median of the rounds is reported as ns per pixel.
A large memcpy gives the memory-bandwidth bound: the fused training step moves 12 bytes per
pixel (read logits and target, write the gradient), 8 for the forward alone.

    python bench/cpu_micro.py [--threads 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vae_fast  # noqa: E402,F401
from vae_fast import _ext  # noqa: E402
from vae_fast._enums import Api, Backend, Likelihood, Reduction  # noqa: E402

SIZES = {
    "large": ((32, 3, 256, 256), 256),
    "small": ((64, 3, 64, 64), 128),
}


def eager_loss(x, y, mu, lv):
    B = x.shape[0]
    return (F.binary_cross_entropy_with_logits(x, y, reduction="sum") / B
            + (-0.5 * (1 + lv - mu**2 - lv.exp())).sum() / B)


def make_step(fn):
    def step(x, y, mu, lv):
        loss = fn(x, y, mu, lv)
        return torch.autograd.grad(loss, (x, mu, lv))
    return step


_FWD = None


def fused_step(x, y, mu, lv, with_grads=True):
    """The fused pass of vae_fast::fused_fwd (C++ backend): the loss and, with_grads, the
    gradients of x, mu and logvar written into fresh buffers, as a training step's forward
    does; its backward with grad_output 1 then moves nothing (the buffers become .grad)."""
    needs = (1 << 0 | 1 << 5 | 1 << 6) if with_grads else 0
    return _FWD(x, y, None, None, None, mu, lv, None, None, None, int(Api.ELBO_LOSS),
                int(Likelihood.BERNOULLI), int(Reduction.BATCHMEAN), False, 0.0, 0.0, 0.0, 0.0,
                1.0, int(Backend.CPU), needs)[0]


class OtherLoad:
    """Share of the machine's CPU time used by other processes while timing (Linux only):
    with 2 threads on 2 cores, anything else running stalls the parallel regions."""

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        self.share = None
        if self.start and end:
            busy = end[0] - self.start[0]
            total = end[1] - self.start[1]
            mine = end[2] - self.start[2]
            self.share = max(0.0, (busy - mine) / total) if total > 0 else None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            idle = v[3] + v[4]
            return sum(v) - idle, sum(v), int(st[11]) + int(st[12])
        except (OSError, ValueError, IndexError):
            return None

    def __str__(self):
        return "n/a" if self.share is None else f"{100 * self.share:.0f}%"


def time_round_robin(fns: dict, rounds: int, warmup: int = 3) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if _ext.module is None:
        sys.exit(f"C++ backend unavailable: {_ext.reason}")
    global _FWD
    _FWD = torch.ops.vae_fast.fused_fwd.default
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, vae_fast kernels "
          f"{_ext.module.cpu_capability()}, load average {load:.2f} "
          f"(other work on the machine skews every number)")

    compiled = torch.compile(eager_loss)
    eager_step, compiled_step = make_step(eager_loss), make_step(compiled)

    # memory bandwidth: copy 256 MiB of initialised memory
    a = torch.randn(64 * 2**20)
    b = torch.empty_like(a)
    with OtherLoad() as other:
        bw = time_round_robin({
            "copy into existing": lambda: b.copy_(a),
            "empty_like(a).copy_(a)": lambda: torch.empty_like(a).copy_(a),
        }, rounds=max(10, args.rounds // 2))
    print(f"(other processes used {other} of the CPUs during the memcpy)")
    nbytes = 2 * a.numel() * a.element_size()
    for k, t in bw.items():
        print(f"memcpy {k:24s}: {nbytes / t / 1e9:6.1f} GB/s (read + write)")
    gbps = nbytes / bw["copy into existing"] / 1e9
    del a, b
    print(f"bandwidth bound at {gbps:.1f} GB/s: training step (12 B/pixel) "
          f"{12 / gbps:.3f} ns/pixel, forward only (8 B/pixel) {8 / gbps:.3f} ns/pixel")

    for name, (shape, Z) in SIZES.items():
        g = torch.Generator().manual_seed(0)
        B = shape[0]
        x = (torch.randn(shape, generator=g) * 3).requires_grad_()
        y = torch.rand(shape, generator=g)
        mu = torch.randn(B, Z, generator=g).requires_grad_()
        lv = (torch.randn(B, Z, generator=g) * 0.5).requires_grad_()
        xd, mud, lvd = x.detach(), mu.detach(), lv.detach()
        N = x.numel()
        # sanity: the three agree
        ref = eager_loss(x, y, mu, lv).item()
        got = fused_step(xd, y, mud, lvd).item()
        assert abs(got / ref - 1) < 1e-5, (got, ref)
        with OtherLoad() as other:
            t = time_round_robin({
                "eager": lambda: eager_step(x, y, mu, lv),
                "compile": lambda: compiled_step(x, y, mu, lv),
                "fused": lambda: fused_step(xd, y, mud, lvd),
                "fused fwd only": lambda: fused_step(xd, y, mud, lvd, with_grads=False),
            }, rounds=args.rounds)
        print(f"\n{name}: x {tuple(shape)} ({N / 1e6:.2f}M pixels), mu/logvar ({B}, {Z}); "
              f"other processes used {other} of the CPUs meanwhile")
        for k, v in t.items():
            print(f"  {k:27s} {v * 1e3:8.3f} ms  {v / N * 1e9:6.3f} ns/pixel")
        print(f"  fused vs eager   {t['eager'] / t['fused']:5.2f}x   (target >= 3.5x)")
        print(f"  fused vs compile {t['compile'] / t['fused']:5.2f}x   (target >= 2.0x)")
        print(f"  fused at {12 * N / t['fused'] / 1e9:.1f} GB/s effective "
              f"({t['fused'] / N * 1e9 / (12 / gbps):.2f}x the bandwidth bound)")


if __name__ == "__main__":
    main()
