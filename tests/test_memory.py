"""Memory: a training loop does not grow the process, and the forward keeps for the backward
nothing but the gradient buffers (plus O(B)).

What the forward saves (measured with `torch.autograd.graph.saved_tensors_hooks`):
- the gradient buffer of each input that requires grad, in the input's shape and dtype;
- for a broadcast parameter (a `(Z,)` prior, a `(C,1,1)` log-variance, a BCE weight) a
  summed buffer: the parameter's own shape for scalar reductions; one slice per row for
  `"none"` (rows x parameter: the per-row gradient is only known once grad_output is), and the
  full input shape for the drop-in BCE's elementwise `"none"`. These are documented
  exceptions to "grad buffers + O(B)" and the allowance below is exactly that size;
- a 0-d tensor beta that requires grad adds itself and the 0-d/(B,) KL.
"""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before vae_fast imports triton (conftest does too)

import vae_fast  # noqa: E402
from vae_fast import _backend  # noqa: E402


from conftest import fused_backends  # noqa: E402


FUSED = fused_backends()
MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# no growth over 1,000 steps

def _steps(backend: str):
    """Three training-step flavours, cycled: Bernoulli ELBO with grad_output 1 (the backward
    moves no bytes), Gaussian ELBO per sample with a learned (784,) log-variance and (Z,)
    prior and a per-row grad_output (in-place scaling), drop-in BCE elementwise with a weight."""
    # MNIST rows (784 pixels, Z = 32); a quarter of the benchmark's batch of 128 on the C++
    # backend, 2 rows under the (slow) Triton interpreter
    b, n = (32, 784) if backend == "cpu" else (2, 784)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, generator=gen).requires_grad_()
    y = torch.rand(b, n, generator=gen)
    mu = torch.randn(b, 32, generator=gen).requires_grad_()
    lv = torch.randn(b, 32, generator=gen).requires_grad_()
    rlv = torch.zeros(n).requires_grad_()
    plv = torch.zeros(32).requires_grad_()
    w = torch.rand(n, generator=gen).requires_grad_()
    g_rows = torch.linspace(0.5, 2.0, b)
    params = (x, mu, lv, rlv, plv, w)

    def step(i: int) -> None:
        with vae_fast.use_backend(backend):
            if i % 3 == 0:
                vae_fast.elbo_loss(x, y, mu, lv).backward()
            elif i % 3 == 1:
                loss = vae_fast.elbo_loss(x, y, mu, lv, likelihood="gaussian", recon_logvar=rlv,
                                          prior_logvar=plv, reduction="none")
                loss.backward(g_rows)
            else:
                loss = vae_fast.binary_cross_entropy_with_logits(x, y, w, reduction="none")
                loss.sum().backward()
        for p in params:
            p.grad = None

    return step


@pytest.mark.skipif(not FUSED, reason="no fused backend runs here")
def test_no_growth_over_1000_steps():
    """1,000 forward+backward calls after a warm-up: resident memory and the number of live
    Python objects stay flat (on the C++ backend a gradient buffer leaked per step would add
    >= 33 MB; a leaked autograd node or tensor object per step shows in the object count)."""
    backend = "cpu" if "cpu" in FUSED else "triton"
    # the Triton interpreter costs ~50 ms a step: where it is the only fused backend, 300
    steps = 1000 if backend == "cpu" else 300
    step = _steps(backend)
    for i in range(60):
        step(i)
    gc.collect()
    rss0, objs0 = _rss(), len(gc.get_objects())
    for i in range(steps):
        step(i)
    gc.collect()
    rss1, objs1 = _rss(), len(gc.get_objects())
    assert rss1 - rss0 < 16 * MIB, f"RSS grew {(rss1 - rss0) / MIB:.1f} MiB in {steps} steps"
    assert objs1 - objs0 < 200, f"{objs1 - objs0} more live Python objects after {steps} steps"


@pytest.mark.parametrize("backend", FUSED)
def test_graph_and_buffers_are_freed(backend):
    """After backward and `del loss`, every tensor the forward saved is gone."""
    x = torch.randn(4, 50).requires_grad_()
    mu = torch.randn(4, 6).requires_grad_()
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), vae_fast.use_backend(backend):
        loss = vae_fast.elbo_loss(x, torch.rand(4, 50), mu, torch.randn(4, 6), reduction="none")
    loss.backward(torch.full((4,), 0.5))
    x.grad = mu.grad = None
    del loss
    gc.collect()
    alive = [r() for r in refs if r() is not None and r().numel() > 0]
    assert not alive, [tuple(t.shape) for t in alive]


# ---------------------------------------------------------------------------------------------
# what the forward saves for the backward

def _config(name: str):
    """(function, args, kwargs, allowance in bytes beyond the grad buffers and O(B))."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *s, dt=torch.float32: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    u = lambda *s, dt=torch.float32: torch.rand(*s, generator=gen).to(dt)  # noqa: E731
    g = lambda t: t.requires_grad_()  # noqa: E731
    if name == "bernoulli_elbo":
        return "elbo_loss", (g(r(16, 1, 28, 28)), u(16, 1, 28, 28) > 0.5, g(r(16, 32)),
                             g(r(16, 32))), {}, 0
    if name == "bernoulli_elbo_bf16":
        return "elbo_loss", (g(r(16, 784, dt=torch.bfloat16)), u(16, 784),
                             g(r(16, 32, dt=torch.bfloat16)), g(r(16, 32))), {"beta": 0.5}, 0
    if name == "gaussian_learned_priors":
        return "elbo_loss", (g(r(8, 3, 16, 16)), g(r(8, 3, 16, 16)), g(r(8, 32)), g(r(8, 32))), \
            {"likelihood": "gaussian", "recon_logvar": g(r(3, 1, 1)), "prior_mu": g(r(32)),
             "prior_logvar": g(r(32))}, 0
    if name == "gaussian_learned_priors_rows":  # per-row slices of the broadcast gradients
        return "elbo_loss", (g(r(8, 3, 16, 16)), g(r(8, 3, 16, 16)), g(r(8, 32)), g(r(8, 32))), \
            {"likelihood": "gaussian", "recon_logvar": g(r(3, 1, 1)), "prior_mu": g(r(32)),
             "prior_logvar": g(r(32)), "reduction": "none"}, 4 * 8 * (3 + 32 + 32)
    if name == "kl_only":
        return "gaussian_kl", (g(r(64, 16)), g(r(64, 16))), {}, 0
    if name == "bce_weight_elementwise":  # the weight's gradient needs every element
        return "binary_cross_entropy_with_logits", (g(r(16, 784)), u(16, 784), g(u(784))), \
            {"reduction": "none"}, 4 * 16 * 784
    if name == "beta_tensor":
        return "elbo_loss", (g(r(16, 784)), u(16, 784), g(r(16, 32)), g(r(16, 32))), \
            {"beta": g(torch.tensor(0.3))}, 0
    raise KeyError(name)


CONFIGS = ["bernoulli_elbo", "bernoulli_elbo_bf16", "gaussian_learned_priors",
           "gaussian_learned_priors_rows", "kl_only", "bce_weight_elementwise", "beta_tensor"]


def _saved_storages(fn, args, kw, backend):
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), vae_fast.use_backend(backend):
        out = getattr(vae_fast, fn)(*args, **kw)
    return out, saved


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_saves_only_gradient_buffers(backend, config):
    fn, args, kw, allowance = _config(config)
    out, saved = _saved_storages(fn, args, kw, backend)
    leaves = [t for t in list(args) + list(kw.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_bytes = sum(_nbytes(t) for t in leaves)
    batch = args[0].shape[0]
    small = 64 * batch + 4096  # O(B): per-row values, 0-d terms, bookkeeping
    total = sum(saved.values())
    assert total <= grad_bytes + small + allowance, (
        f"saved {total} B for {grad_bytes} B of gradients (+{small} + {allowance} allowed)")
    out.sum().backward()  # and the saved buffers are enough


@pytest.mark.parametrize("backend", FUSED)
def test_nothing_saved_without_grad(backend):
    args = (torch.randn(16, 784), torch.rand(16, 784), torch.randn(16, 32), torch.randn(16, 32))
    out, saved = _saved_storages("elbo_loss", args, {}, backend)
    assert not saved and not out.requires_grad
    with torch.no_grad():
        out, saved = _saved_storages("elbo_loss", [a.requires_grad_() for a in args], {}, backend)
    assert not saved and not out.requires_grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gout", [1.0, 0.37])
def test_backward_hands_over_the_saved_buffers(backend, gout):
    """The gradient a leaf receives is the buffer the forward wrote (scaled in place when
    grad_output != 1): the backward allocates no N-sized tensor."""
    x = torch.randn(16, 784).requires_grad_()
    mu = torch.randn(16, 32).requires_grad_()
    lv = torch.randn(16, 32).requires_grad_()
    out, saved = _saved_storages("elbo_loss", (x, torch.rand(16, 784), mu, lv), {}, backend)
    out.backward(torch.tensor(gout))
    for t in (x, mu, lv):
        assert t.grad.untyped_storage().data_ptr() in saved
