"""The discretized logistic mixture likelihood (PixelCNN++'s discretized_mix_logistic_loss):
the fused C++ and Triton (interpreter) paths against an independent eager transcription of
PixelCNN++'s code (written below, in its own layout), in values and gradients, for C = 3 and
C = 1, K = 256 and 32, every reduction, edge bins, log-scales under the floor and the
small-probability fallback; float64 gradcheck; dtypes, channels_last, elbo_loss, checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import discretized_logistic_mixture_nll as dmol_nll
from vae_fast import reference

REDUCTIONS = ("batchmean", "sum", "mean", "none")


# ---- an independent transcription of PixelCNN++ (channels last, its own names) -------------

def _pcnn_log_probs(x, l, K, colours):
    """PixelCNN++'s discretized_mix_logistic_loss (and its 1-channel twin) up to the final
    sum, with K bins: log p per pixel, (B, H, W). x: (B, H, W, C), l: (B, H, W, P)."""
    nr_mix = l.shape[-1] // (10 if colours == 3 else 3)
    logit_probs = l[..., :nr_mix]
    l = l[..., nr_mix:].contiguous().view(*x.shape, 3 * nr_mix if colours == 3 else 2 * nr_mix)
    means = l[..., :nr_mix]
    log_scales = torch.clamp(l[..., nr_mix:2 * nr_mix], min=-7.0)
    x = x.unsqueeze(-1) + torch.zeros(*x.shape, nr_mix, dtype=x.dtype)
    if colours == 3:
        coeffs = torch.tanh(l[..., 2 * nr_mix:3 * nr_mix])
        m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
        m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
        means = torch.stack((means[..., 0, :], m2, m3), dim=-2)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / (K - 1))
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / (K - 1))
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    inner_inner_cond = (cdf_delta > 1e-5).to(x.dtype)
    inner_inner_out = inner_inner_cond * torch.log(torch.clamp(cdf_delta, min=1e-12)) + (
        1.0 - inner_inner_cond) * (log_pdf_mid - math.log((K - 1) / 2))
    inner_cond = (x > 0.999).to(x.dtype)
    inner_out = inner_cond * log_one_minus_cdf_min + (1.0 - inner_cond) * inner_inner_out
    cond = (x < -0.999).to(x.dtype)
    log_probs = cond * log_cdf_plus + (1.0 - cond) * inner_out
    log_probs = torch.sum(log_probs, dim=3) + torch.log_softmax(logit_probs, -1)
    m = log_probs.max(-1, keepdim=True).values
    return m.squeeze(-1) + torch.log(torch.exp(log_probs - m).sum(-1))


def _pcnn_nll(params, target, K, reduction):
    """The transcription in PyTorch layout, reduced."""
    lp = _pcnn_log_probs(target.permute(0, 2, 3, 1), params.permute(0, 2, 3, 1), K,
                         target.shape[1])
    per = -lp.flatten(1).sum(1)
    return {"none": per, "sum": per.sum(), "batchmean": per.sum() / per.shape[0],
            "mean": per.sum() / target.numel()}[reduction]


def _inputs(B=2, C=3, M=3, H=5, W=7, K=256, dtype=torch.float64, seed=0, spread=1.0):
    """Parameters and a target on bin centres, with both edge bins, log-scales under the floor
    and (spread) far-off means where some bins take the fallback."""
    g = torch.Generator().manual_seed(seed)
    P = (10 if C == 3 else 3) * M
    params = torch.randn(B, P, H, W, generator=g, dtype=torch.float64)
    ls = slice(M, 2 * M) if C == 1 else None
    blocks = [M + 3 * M * c for c in range(C)] if C == 3 else [M]
    for b in blocks:  # log-scales: some under -7, most in [-4, 1]
        params[:, b + M:b + 2 * M] = torch.rand(B, M, H, W, generator=g, dtype=torch.float64) * 5 - 4
        params[:, b + M, 0, :] = -7.5
        params[:, b:b + M] *= spread
    del ls
    k = torch.randint(0, K, (B, C, H, W), generator=g)
    k[:, :, 0, 0], k[:, :, 0, 1] = 0, K - 1  # both edge bins
    target = k.to(torch.float64) / ((K - 1) / 2) - 1
    return params.to(dtype), target.to(dtype)


def _grad(fn, params, target, **kw):
    p = params.detach().clone().requires_grad_()
    out = fn(p, target, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), p.grad


# ---- the reference twin is the formula ------------------------------------------------------

@pytest.mark.parametrize("C", [3, 1])
@pytest.mark.parametrize("K", [256, 32])
def test_reference_matches_pixelcnn(C, K):
    params, target = _inputs(C=C, K=K, spread=3.0)
    for red in REDUCTIONS:
        out, g = _grad(reference.discretized_logistic_mixture_nll, params, target, num_bins=K,
                       reduction=red)
        want, g_want = _grad(_pcnn_nll, params, target, K=K, reduction=red)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, g_want, rtol=1e-8, atol=1e-10)


# ---- fused against the transcription --------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C,K", [(3, 256), (1, 256), (3, 32), (1, 32)])
def test_float64_matches_pixelcnn(backend, C, K, reduction):
    params, target = _inputs(C=C, K=K, spread=3.0)
    out, g = _grad(dmol_nll, params, target, num_bins=K, reduction=reduction)
    want, g_want = _grad(_pcnn_nll, params, target, K=K, reduction=reduction)
    assert out.dtype == torch.float64 and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_want, rtol=1e-7, atol=1e-9)


def test_branches_are_all_taken():
    """The inputs above reach every branch of the piecewise function (else the tests above
    could pass with one missing)."""
    params, target = _inputs(C=3, K=256, spread=3.0)
    x = target.permute(0, 2, 3, 1)
    assert (x < -0.999).any() and (x > 0.999).any()
    M = 3
    raw = torch.cat([params[:, M + 3 * M * c + M:M + 3 * M * c + 2 * M] for c in range(3)], 1)
    assert (raw < -7).any()
    # the fallback: some bin probabilities at most 1e-5 in the middle bins
    l = params.permute(0, 2, 3, 1)
    means = l[..., M:].reshape(*x.shape, 3 * M)[..., :M]
    ls = l[..., M:].reshape(*x.shape, 3 * M)[..., M:2 * M].clamp_min(-7)
    u = (x.unsqueeze(-1) - means) * torch.exp(-ls)
    h = torch.exp(-ls) / 255
    delta = torch.sigmoid(u + h) - torch.sigmoid(u - h)
    mid = (x.abs() < 0.999).unsqueeze(-1)
    assert ((delta <= 1e-5) & mid).any() and ((delta > 1e-5) & mid).any()


def test_raw_log_scales_under_the_floor_get_no_gradient(backend):
    params, target = _inputs(C=3, M=2)
    params[:, 2 + 2] = -9.0  # colour 0, component 0: raw log-scale under -7
    _, g = _grad(dmol_nll, params, target, reduction="sum")
    assert (g[:, 4] == 0).all()
    assert (g[:, 5] != 0).any()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-4),
                                        (torch.float16, 2e-4)], ids=str)
def test_low_precision_params(backend, dtype, rtol):
    """16-bit and float32 params are read as they are and computed in float32: against the
    float64 formula on the same (rounded) values."""
    params, target = _inputs(C=3, M=4, H=6, W=6)
    params = params.to(dtype)
    out, g = _grad(dmol_nll, params, target.float(), reduction="none")
    want, g_want = _grad(_pcnn_nll, params.double(), target, K=256, reduction="none")
    assert out.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=1e-3)
    # bfloat16: the Triton interpreter casts float32 to bfloat16 by truncation (a GPU rounds
    # to nearest), up to one ulp (2^-7 relative) on top of the reference's own rounding
    gtol = {torch.float32: 1e-4, torch.bfloat16: 2e-2 if backend == "triton" else 1e-2,
            torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(g.double(), g_want.to(dtype).double(), rtol=gtol, atol=gtol)


@pytest.mark.parametrize("C", [3, 1])
def test_channels_last(backend, C):
    params, target = _inputs(C=C, M=3, H=4, W=6)
    out, g = _grad(dmol_nll, params, target, reduction="none")
    p_cl = params.to(memory_format=torch.channels_last)
    t_cl = target.to(memory_format=torch.channels_last)
    for t in (target, t_cl):
        out2, g2 = _grad(dmol_nll, p_cl, t, reduction="none")
        assert g2.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g2, g, rtol=1e-12, atol=1e-12)
    # any other strides: copied, same numbers
    p_t = params.transpose(2, 3).contiguous().transpose(2, 3)
    out3, g3 = _grad(dmol_nll, p_t, target, reduction="none")
    torch.testing.assert_close(out3, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g3, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 30, 13), (2, 30, 1, 1), (1, 30, 2, 3, 4)], ids=str)
def test_other_ranks(backend, shape):
    """1-D, a single pixel, 3-D spatial: the spatial dims are flattened."""
    g = torch.Generator().manual_seed(3)
    params = torch.randn(shape, generator=g, dtype=torch.float64)
    target = (torch.randint(0, 256, (shape[0], 3, *shape[2:]), generator=g).double() / 127.5 - 1)
    out, gr = _grad(dmol_nll, params, target, reduction="none")
    want, g_want = _grad(reference.discretized_logistic_mixture_nll, params, target,
                         reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gr, g_want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("C", [3, 1])
def test_gradcheck(backend, C):
    # per example ("none"): the Jacobian of every reduction is a row sum of it. One row of 3
    # pixels per example: both edge bins and an interior one, log-scales under the floor (the
    # interpreter makes each evaluation slow: 120 inputs for C = 3)
    params, target = _inputs(B=2, C=C, M=2, H=1, W=3, spread=2.0)
    assert torch.autograd.gradcheck(
        lambda p: dmol_nll(p, target, reduction="none"), (params.requires_grad_(),))


def test_deterministic_whatever_the_threads():
    vae_fast.use_backend  # noqa: B018
    params, target = _inputs(B=3, C=3, M=5, H=32, W=40, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with vae_fast.use_backend("cpu"):
                outs.append(_grad(dmol_nll, params, target.float(), reduction="sum"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---- elbo_loss with the mixture -------------------------------------------------------------

@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
def test_elbo(backend, reduction):
    params, target = _inputs(B=3, C=3, M=2, H=3, W=4)
    g = torch.Generator().manual_seed(5)
    mu, lv = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                              dtype=torch.float64)
    for beta in (0.5, torch.tensor(2.0, dtype=torch.float64)):
        leaves = [t.clone().requires_grad_() for t in (params, mu, lv)]
        out = vae_fast.elbo_loss(leaves[0], target, leaves[1], leaves[2],
                                 likelihood="discretized_logistic_mixture", beta=beta,
                                 reduction=reduction, return_terms=True)
        ref = [t.clone().requires_grad_() for t in (params, mu, lv)]
        nll = _pcnn_nll(ref[0], target, 256, reduction)
        kl = reference.gaussian_kl(ref[1], ref[2], reduction=reduction)
        for got, want in zip(out, (nll + beta * kl, nll, kl)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        w = torch.randn(out.loss.shape, generator=g, dtype=torch.float64)
        (out.loss * w).sum().backward()
        ((nll + beta * kl) * w).sum().backward()
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_elbo_capacity_and_free_bits(backend):
    params, target = _inputs(B=3, C=1, M=2, H=3, W=4, K=32)
    mu, lv = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for kw in (dict(capacity=2.0), dict(free_bits=0.1)):
        got = vae_fast.elbo_loss(params, target, mu, lv, likelihood="discretized_logistic_mixture",
                                 num_bins=32, beta=0.7, **kw)
        with vae_fast.use_backend("reference"):
            want = vae_fast.elbo_loss(params, target, mu, lv,
                                      likelihood="discretized_logistic_mixture", num_bins=32,
                                      beta=0.7, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_module():
    m = vae_fast.DiscretizedLogisticMixtureNLLLoss(num_bins=32, reduction="sum")
    assert "num_bins=32" in repr(m) and "reduction='sum'" in repr(m)
    params, target = _inputs(C=1, K=32)
    torch.testing.assert_close(m(params, target), _pcnn_nll(params, target, 32, "sum"))


def test_compile_fullgraph():
    params, target = _inputs(B=2, C=3, M=2, H=3, W=3, dtype=torch.float32)
    mu, lv = torch.randn(2, 4), torch.randn(2, 4)

    def f(p, t, mu, lv, beta):
        return vae_fast.elbo_loss(p, t, mu, lv, likelihood="discretized_logistic_mixture",
                                  beta=beta)

    with vae_fast.use_backend("cpu"):
        fc = torch.compile(f, fullgraph=True, backend="aot_eager")
        p = params.clone().requires_grad_()
        out = fc(p, target, mu, lv, torch.tensor(0.5))
        out.backward()
        p2 = params.clone().requires_grad_()
        want = f(p2, target, mu, lv, torch.tensor(0.5))
        want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p.grad, p2.grad)


def test_opcheck():
    params, target = _inputs(B=2, C=3, M=2, H=3, W=3)
    mu, lv = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    from vae_fast._enums import Api, Backend, Likelihood, Reduction
    for pl in (params, params.to(memory_format=torch.channels_last)):
        args = (pl.clone().requires_grad_(), target, None, None, None, mu, lv, None, None, None,
                int(Api.ELBO_LOSS), int(Likelihood.DMOL), int(Reduction.PER_SAMPLE), False, 256.0,
                0.0, 0.0, 0.0, 1.0, int(Backend.CPU))
        torch.library.opcheck(torch.ops.vae_fast.fused_loss.default, args)


# ---- checks ---------------------------------------------------------------------------------

BAD = [
    (lambda p, t: (p[:, :29], t), ValueError, r"params must have 10 \* M channels \(dim 1\) for a 3-channel target"),
    (lambda p, t: (p[:, :10], t[:, :2]), ValueError, "target must have 1 or 3 channels"),
    (lambda p, t: (p[:, :10], t[:, :1]), ValueError, r"params must have 3 \* M channels"),
    (lambda p, t: (p, t[:, :, :1]), ValueError, "target must have the shape of params but for the channel dimension"),
    (lambda p, t: (p, t[:1]), ValueError, "target must have the shape of params but for the channel"),
    (lambda p, t: (p[:, :, 0, 0].sum(1), t[:, 0, 0, 0]), ValueError, r"params must have shape \(B, P, \*spatial\)"),
    (lambda p, t: (p.long(), t), TypeError, "params must be a floating point tensor"),
    (lambda p, t: (p, t.long()), TypeError, "target must be a floating point tensor"),
    (lambda p, t: (p, t.clone().requires_grad_()), ValueError, "target takes no gradient"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
@pytest.mark.parametrize("path", ["reference", "cpu", "raw_op"])
def test_bad_inputs_raise(bad, path):
    params, target = _inputs(B=2, C=3, M=3, H=2, W=2)
    make, err, msg = BAD[bad]
    p, t = make(params, target)
    if path == "raw_op":  # the C++ plan words it as the Python checks do
        from vae_fast._enums import Api, Backend, Likelihood, Reduction
        if isinstance(p, torch.Tensor) and p.is_floating_point():
            p = p.requires_grad_()
        with pytest.raises(err, match=msg):
            torch.ops.vae_fast.fused_loss(p, t, None, None, None, None, None, None, None, None,
                                          int(Api.DMOL_NLL), int(Likelihood.DMOL),
                                          int(Reduction.SUM), False, 256.0, 0.0, 0.0, 0.0, 1.0,
                                          int(Backend.CPU))
        return
    with vae_fast.use_backend(path), pytest.raises(err, match=msg):
        dmol_nll(p, t)


def test_bad_arguments():
    params, target = _inputs(B=2, C=3, M=3, H=2, W=2)
    mu = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="num_bins must be an int"):
        dmol_nll(params, target, num_bins=256.0)
    with pytest.raises(ValueError, match="num_bins must be at least 2"):
        dmol_nll(params, target, num_bins=1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        dmol_nll(params, target, reduction="elementwise")
    with pytest.raises(ValueError, match="num_bins is only used with likelihood"):
        vae_fast.elbo_loss(params, params, mu, mu, likelihood="gaussian", num_bins=32)
    with pytest.raises(ValueError, match="recon_logvar is only used"):
        vae_fast.elbo_loss(params, target, mu, mu, likelihood="discretized_logistic_mixture",
                           recon_logvar=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        vae_fast.elbo_loss(params, target, mu, mu, likelihood="discretized_logistic_mixture",
                           reduction="mean")
    with pytest.raises(ValueError, match="batch size of recon"):
        vae_fast.elbo_loss(params, target, mu[:1], mu[:1],
                           likelihood="discretized_logistic_mixture")
    with pytest.raises(ValueError, match="takes no sample dimension"):
        vae_fast.iwae_loss(params[None], target, mu[None], mu, mu,
                           likelihood="discretized_logistic_mixture")
