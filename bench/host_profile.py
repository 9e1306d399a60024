"""Where the host time of one tiny ELBO fwd+bwd goes: the per-call cost of the pieces it is made
of (one torch op, one Triton launch, an allocation), the tiny step itself (eager and vae_fast),
and cProfile's top functions for vae_fast's step.

    python -m bench.host_profile            # on CUDA when there is one

Prints only; bench/overhead.py is the measurement that is committed (this one says why)."""
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl

import vae_fast


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def per_call_us(fn, device, n=2000):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, triton {triton.__version__}, backend "
          f"{vae_fast._backend.resolve(device)}")
    x = torch.randn(8, 64, device=device, requires_grad=True)
    y = torch.rand(8, 64, device=device)
    mu = torch.randn(8, 16, device=device, requires_grad=True)
    lv = torch.randn(8, 16, device=device, requires_grad=True)
    a, b = torch.randn(1024, device=device), torch.empty(1024, device=device)

    def eager_step():
        nll = (torch.nn.functional.softplus(x) - y * x).sum()
        kl = 0.5 * (mu * mu + lv.exp() - 1 - lv).sum()
        ((nll + kl) / 8).backward()

    def fused_step():
        vae_fast.elbo_loss(x, y, mu, lv).backward()

    def fused_forward():
        with torch.no_grad():
            vae_fast.elbo_loss(x, y, mu, lv)

    rows = {
        "torch op (a.add_(1))": lambda: a.add_(1),
        "torch.empty(1024)": lambda: torch.empty(1024, device=device),
        "Triton launch (1 block copy)": lambda: _copy_kernel[(1,)](a, b, 1024, BLOCK=1024),
        "eager ELBO fwd+bwd": eager_step,
        "vae_fast forward, no grad": fused_forward,
        "vae_fast fwd+bwd": fused_step,
    }
    for name, fn in rows.items():
        print(f"  {name:32s} {per_call_us(fn, device, 500 if 'ELBO' in name or 'vae' in name else 2000):8.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fused_step()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print("cProfile of 300 vae_fast fwd+bwd steps, by own time:")
    print(s.getvalue()[:9000])


if __name__ == "__main__":
    main()
