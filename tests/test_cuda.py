"""The Triton kernels compiled for a real GPU: the contract cases on CUDA tensors against the
reference, determinism, launches, and (slow) a tensor over 2^31 elements.

Run on a GPU machine with the real compiler (not the interpreter):
    VAE_FAST_TEST_GPU=1 python -m pytest tests/test_cuda.py            # + -m slow for the big one
Skipped anywhere else."""
import os

import pytest
import torch

import vae_fast
from vae_fast import reference as R

from test_losses import CASES, DTYPES, build, case_reductions, tolerances

pytestmark = [
    pytest.mark.gpu_required,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA device and compiled kernels: "
                              "VAE_FAST_TEST_GPU=1 python -m pytest tests/test_cuda.py"),
]


def _run(fn, tensors, kw, reduction, weights, device):
    xs = {k: v.detach().to(device).clone().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}
    outs = fn(**xs, **kw, reduction=reduction)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    total = sum((o * w.to(device)).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(total, [x for x in xs.values() if x.requires_grad])
    return [o.cpu() for o in outs], [g.cpu() for g in grads]


@pytest.mark.parametrize("case,reduction", case_reductions())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(3, 37), (4, 3, 33, 65)], ids=["odd", "image"])
def test_cuda_matches_reference(case, reduction, dtypes, shape):
    name, tensors, kw, _ = build(case, shape, *dtypes)
    with vae_fast.use_backend("reference"):
        ref_out, _ = _run(getattr(R, name), tensors, kw, reduction, [torch.ones(())] * 3, "cpu")
    weights = [torch.rand(o.shape, dtype=torch.float64).to(o.dtype) + 0.5 for o in ref_out]
    with vae_fast.use_backend("triton"):
        got, got_g = _run(getattr(vae_fast, name), tensors, kw, reduction, weights, "cuda")
    with vae_fast.use_backend("reference"):
        want, want_g = _run(getattr(R, name), tensors, kw, reduction, weights, "cpu")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerances(a.dtype))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **tolerances(a.dtype))


def test_cuda_bitwise_deterministic_and_auto_uses_triton():
    from vae_fast import _backend

    assert _backend.resolve(torch.device("cuda")) == "triton"
    outs = []
    for _ in range(2):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(32, 3, 64, 64, device="cuda", generator=g).requires_grad_()
        y = torch.rand(32, 3, 64, 64, device="cuda", generator=g)
        mu = torch.randn(32, 128, device="cuda", generator=g).requires_grad_()
        lv = torch.randn(32, 128, device="cuda", generator=g).requires_grad_()
        loss = vae_fast.elbo_loss(x, y, mu, lv)
        (loss * 2).backward()
        outs.append([loss, x.grad, mu.grad, lv.grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_cuda_launches(launches):
    x = torch.randn(8, 1000, device="cuda", requires_grad=True)
    y = torch.rand(8, 1000, device="cuda")
    mu = torch.randn(8, 16, device="cuda", requires_grad=True)
    lv = torch.randn(8, 16, device="cuda", requires_grad=True)
    loss = vae_fast.elbo_loss(x, y, mu, lv)
    assert launches == {"_fused_loss_fwd_kernel": 1, "_finalize_kernel": 1}
    launches.clear()
    loss.backward()
    assert launches == {"_scale_grads_kernel": 1}


@pytest.mark.slow
def test_cuda_over_2_31_elements():
    n = 2**31 + 4096 * 3 + 5
    B = 4
    x = (torch.randn(B, n // B + 1, device="cuda", dtype=torch.bfloat16) * 2).requires_grad_()
    y = torch.rand(B, n // B + 1, device="cuda") > 0.5
    mu = torch.randn(B, 64, device="cuda", requires_grad=True)
    lv = torch.randn(B, 64, device="cuda", requires_grad=True)
    t = vae_fast.elbo_loss(x, y, mu, lv, reduction="none", return_terms=True)
    t.loss.sum().backward()
    # per-sample references computed in float64 on the GPU, chunk by chunk
    for b in range(B):
        z = x[b].detach().double()
        want = (torch.nn.functional.softplus(z) - y[b].double() * z).sum()
        torch.testing.assert_close(t.nll[b].double(), want, rtol=1e-4, atol=0)  # fp32 sums of 5e8 terms
        torch.testing.assert_close(x.grad[b, -5:].float(), (torch.sigmoid(z[-5:]) - y[b, -5:].double()).float(),
                                   rtol=1e-2, atol=1e-2)
