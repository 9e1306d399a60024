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


@pytest.mark.parametrize("lv_shape", [(5, 7), (7,), None], ids=["full", "per_latent", "number"])
def test_cuda_iwae_latent_matches_the_formula(lv_shape):
    """vae_fast::iwae_latent and its backward on CUDA (ATen ops, csrc/iwae_latent.cpp) against
    the torch formula on the CPU, float64."""
    from vae_fast import _common as C
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    lv = 0.3 if lv_shape is None else 0.5 * torch.randn(*lv_shape, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    results = []
    for dev in ("cuda", "cpu"):
        ins = [t.to(dev).requires_grad_() for t in (z, mu, lv) if isinstance(t, torch.Tensor)]
        lvd = ins[2] if len(ins) == 3 else None
        out = (torch.ops.vae_fast.iwae_latent(ins[0], ins[1], lvd, 0.3 if lvd is None else 0.0, torch.float64)
               if dev == "cuda" else C.iwae_latent(ins[0], ins[1], lvd if lvd is not None else lv, torch.float64))
        grads = torch.autograd.grad((out * w.to(dev)).sum(), ins)
        results.append([out.cpu()] + [t.cpu() for t in grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _objective_cases():
    """Every objective of the objectives issue on one odd-sized image batch: name -> (function
    name, tensors, keyword arguments). Float64 on the CPU; the test moves them."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W, Z, K, M = 4, 3, 33, 65, 16, 5, 500

    def n(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    def u(*s):
        return torch.rand(*s, generator=g, dtype=torch.float64)

    img, lat = (B, C, H, W), (B, Z)
    mu, lv = n(*lat), n(*lat, scale=0.5)
    z = mu + torch.exp(0.5 * lv) * n(K, *lat)
    bern = dict(recon=n(*img, scale=2.0), target=u(*img), mu=mu, logvar=lv)
    gauss = dict(recon=n(*img), target=n(*img), mu=mu, logvar=lv)
    bins = torch.randint(0, 256, img, generator=g).double() / 127.5 - 1
    return {
        "free_bits": ("elbo_loss", bern, dict(free_bits=0.4, beta=0.7)),
        "capacity": ("elbo_loss", bern, dict(capacity=torch.tensor(3.0, dtype=torch.float64), beta=4.0)),
        "continuous_bernoulli": ("elbo_loss", bern, dict(likelihood="continuous_bernoulli")),
        "sigma_vae_optimal": ("elbo_loss", gauss, dict(likelihood="gaussian", recon_logvar="optimal")),
        "gaussian_full_false": ("elbo_loss", dict(gauss, recon_logvar=n(1, C, 1, 1, scale=0.5)),
                                dict(likelihood="gaussian", full=False)),
        "mc_elbo_k5": ("elbo_loss", dict(bern, recon=n(K, *img, scale=2.0)), {}),
        "iwae_k5": ("iwae_loss", dict(recon=n(K, *img, scale=2.0), target=u(*img), z=z, mu=mu, logvar=lv), {}),
        "iwae_k5_gaussian": ("iwae_loss", dict(recon=n(K, *img), target=n(*img), z=z, mu=mu, logvar=lv,
                                                recon_logvar=n(1, C, 1, 1, scale=0.5)),
                             dict(likelihood="gaussian")),
        "mixture_prior_kl": ("mixture_prior_kl", dict(z=z[0], mu=mu, logvar=lv, prior_mu=n(M, Z),
                                                      prior_logvar=n(M, Z, scale=0.3), prior_logits=n(M)), {}),
        "logistic_mixture": ("discretized_logistic_mixture_nll", dict(params=n(B, 100, H, W), target=bins), {}),
    }


OBJECTIVE_RUNS = [(c, r) for c in _objective_cases() for r in ("batchmean", "sum", "none")
                  if not (c == "free_bits" and r == "none")]  # that one raises: tests/test_objectives.py


def check_objective(case, reduction, device):
    """One objective on float32 tensors of `device` (forced Triton backend) against the
    reference on the CPU in float64: the loss and every input's gradient, with a per-sample
    grad_output."""
    fn, tensors, kw = _objective_cases()[case]
    kw = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ins = {k: v.float().to(device).requires_grad_(k != "target") for k, v in tensors.items()}
    with vae_fast.use_backend("triton"):
        got = getattr(vae_fast, fn)(**ins, **kw, reduction=reduction)
    w = torch.rand(got.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad((got * w.float().to(device)).sum(), [v for k, v in ins.items() if k != "target"])
    ref_ins = {k: v.requires_grad_(k != "target") for k, v in tensors.items()}
    ref_kw = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want = getattr(R, fn)(**ref_ins, **ref_kw, reduction=reduction)
    want_grads = torch.autograd.grad((want * w).sum(), [v for k, v in ref_ins.items() if k != "target"])
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().item()  # sums of ~6e3 float32 terms: relative to the largest
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-6 * scale)
    rtol = 1e-4
    if fn == "iwae_loss":
        # The gradients carry the softmax weights exp(log w_kb - logsumexp_k log w_kb), whose
        # relative error is the absolute float32 error of log w_kb, a sum of H*W*C pixel terms:
        # about 2^-23 |log w_kb| at worst (|log w| ~ 4e3 here: 5e-4).
        with torch.no_grad():
            per = R.iwae_loss(**tensors, **ref_kw, reduction="none")
        rtol = max(rtol, 2.0 ** -23 * per.abs().max().item())
    for name, a, b in zip([k for k in ins if k != "target"], grads, want_grads):
        torch.testing.assert_close(a.cpu().double(), b, rtol=rtol, atol=1e-5 * b.abs().max().item(),
                                   msg=lambda m: f"{case}: d/d{name}: {m}")


@pytest.mark.parametrize("case,reduction", OBJECTIVE_RUNS)
def test_cuda_objectives_match_reference(case, reduction):
    check_objective(case, reduction, "cuda")


def test_cuda_compile_fullgraph_and_autocast():
    """torch.compile(fullgraph=True) with a tensor beta, then torch.autocast's bf16 activations,
    on CUDA tensors: the values and gradients of the reference, a float32 loss under autocast."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).cuda().requires_grad_()
    y = torch.rand(16, 3, 32, 32, generator=g).cuda()
    mu = torch.randn(16, 32, generator=g).cuda().requires_grad_()
    lv = (0.5 * torch.randn(16, 32, generator=g)).cuda().requires_grad_()
    beta = torch.tensor(0.5, device="cuda")
    step = torch.compile(lambda *a: vae_fast.elbo_loss(*a, beta=beta, return_terms=True), fullgraph=True)
    got = step(x, y, mu, lv)
    got_g = torch.autograd.grad(got.loss, (x, mu, lv))
    want = R.elbo_loss(x, y, mu, lv, beta=beta, return_terms=True)
    want_g = torch.autograd.grad(want.loss, (x, mu, lv))
    for a, b in zip([*got, *got_g], [*want, *want_g]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    lin = torch.nn.Linear(32, 3 * 32 * 32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        recon = lin(mu).view(16, 3, 32, 32)
        assert recon.dtype == torch.bfloat16
        loss = vae_fast.elbo_loss(recon, y, mu, lv)
    assert loss.dtype == torch.float32
    (gw,) = torch.autograd.grad(loss, (lin.weight,))
    ref = vae_fast.elbo_loss(lin(mu).view(16, 3, 32, 32), y, mu, lv)  # float32 throughout
    (rw,) = torch.autograd.grad(ref, (lin.weight,))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(gw.flatten(), rw.flatten(), dim=0) > 0.98


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
