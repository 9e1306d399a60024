"""Every public loss on every fused backend against vae_fast.reference: values and gradients,
for every reduction, dtype (and mixed dtypes), odd shapes, 4-D images, bool targets, broadcast
parameters, non-contiguous and channels_last inputs, extreme values, grad_output != 1."""
import pytest
import torch

import vae_fast
from vae_fast import reference as R

Z = 6
REDUCTIONS = {"vae": ("batchmean", "sum", "mean", "none"), "elbo": ("batchmean", "sum", "none"),
              "torch": ("mean", "sum", "none")}
# (dtype of recon/mu, dtype of targets/params)
DTYPES = {
    "f32": (torch.float32, torch.float32), "f64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16), "f16": (torch.float16, torch.float16),
    "bf16+f32": (torch.bfloat16, torch.float32),
}
SHAPES = {"odd": (3, 37), "image": (2, 3, 5, 7)}


def build(case, shape, dt, dt2, seed=0):
    """(function name, kwargs of tensors, other kwargs, reduction family)."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]

    def n(*s, scale=1.0, dtype=dt):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    def u(*s, dtype=dt2):
        return torch.rand(*s, generator=g, dtype=torch.float64).to(dtype)

    chan = (shape[1],) + (1,) * (len(shape) - 2)  # per-channel
    mu, lv = n(B, Z), n(B, Z, scale=0.5, dtype=dt2)
    if case == "bernoulli":
        return "bernoulli_nll", dict(logits=n(*shape, scale=3), target=u(*shape)), {}, "vae"
    if case == "bernoulli_bool":
        return "bernoulli_nll", dict(logits=n(*shape, scale=3), target=u(*shape) > 0.5), {}, "vae"
    if case == "gaussian_float_logvar":
        return "gaussian_nll", dict(mean=n(*shape), target=n(*shape, dtype=dt2)), dict(logvar=-0.3), "vae"
    if case == "gaussian_full_logvar":
        return "gaussian_nll", dict(mean=n(*shape), target=n(*shape, dtype=dt2), logvar=n(*shape, scale=0.5, dtype=dt2)), dict(full=False), "vae"
    if case == "gaussian_channel_logvar":
        return "gaussian_nll", dict(mean=n(*shape), target=n(*shape, dtype=dt2), logvar=n(*chan, scale=0.5, dtype=dt2)), {}, "vae"
    if case == "kl_standard":
        return "gaussian_kl", dict(mu=mu, logvar=lv), {}, "vae"
    if case == "kl_learned_prior":
        return "gaussian_kl", dict(mu=mu, logvar=lv, prior_mu=n(Z, dtype=dt2), prior_logvar=n(Z, scale=0.5, dtype=dt2)), {}, "vae"
    if case == "elbo_bernoulli":
        return "elbo_loss", dict(recon=n(*shape, scale=3), target=u(*shape), mu=mu, logvar=lv), dict(beta=0.7, return_terms=True), "elbo"
    if case == "elbo_continuous_bernoulli":
        return "elbo_loss", dict(recon=n(*shape, scale=3), target=u(*shape), mu=mu, logvar=lv), dict(likelihood="continuous_bernoulli", beta=0.7, return_terms=True), "elbo"
    if case == "elbo_probs":
        return "elbo_loss", dict(recon=u(*shape, dtype=dt), target=u(*shape), mu=mu, logvar=lv), dict(likelihood="bernoulli_probs"), "elbo"
    if case == "elbo_gaussian_prior":
        return "elbo_loss", dict(recon=n(*shape), target=n(*shape, dtype=dt2), mu=mu, logvar=lv,
                                 recon_logvar=n((), dtype=dt2), prior_mu=n(B, 1, dtype=dt2)), dict(likelihood="gaussian", prior_logvar=0.4, beta=2.0, return_terms=True), "elbo"
    if case == "bce_logits":
        return "binary_cross_entropy_with_logits", dict(input=n(*shape, scale=3), target=u(*shape),
                                                         weight=u(shape[-1]), pos_weight=u(*chan) * 3), {}, "torch"
    if case == "bce_probs":
        return "binary_cross_entropy", dict(input=u(*shape, dtype=dt), target=u(*shape), weight=u(*chan)), {}, "torch"
    raise KeyError(case)


FAMILY = {"bernoulli_nll": "vae", "gaussian_nll": "vae", "gaussian_kl": "vae", "elbo_loss": "elbo",
          "binary_cross_entropy_with_logits": "torch", "binary_cross_entropy": "torch"}
CASES = ("bernoulli", "bernoulli_bool", "gaussian_float_logvar", "gaussian_full_logvar",
         "gaussian_channel_logvar", "kl_standard", "kl_learned_prior", "elbo_bernoulli", "elbo_continuous_bernoulli", "elbo_probs",
         "elbo_gaussian_prior", "bce_logits", "bce_probs")


def case_reductions(reductions=("batchmean", "sum", "mean", "none")):
    """(case, reduction) pairs that exist: elbo_loss has no "mean", the drop-ins no "batchmean"."""
    pairs = []
    for case in CASES:
        family = FAMILY[build(case, (2, 3), torch.float32, torch.float32)[0]]
        pairs += [pytest.param(case, r, id=f"{case}-{r}") for r in reductions if r in REDUCTIONS[family]]
    return pairs


def tolerances(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}[dtype]


def leaves(tensors):
    return {k: (v.detach().clone().requires_grad_(v.is_floating_point())) for k, v in tensors.items()}


def outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


def run_and_grad(fn, tensors, kw, reduction, weights):
    xs = leaves(tensors)
    outs = outputs(fn(**xs, **kw, reduction=reduction))
    # grad_output != 1, per sample for "none", on every returned term
    total = sum((o * w).sum() for o, w in zip(outs, weights(outs)))
    grads = torch.autograd.grad(total, [x for x in xs.values() if x.requires_grad])
    return outs, grads


def compare(case, shape, dtypes, reduction, seed=0, transform=None):
    dt, dt2 = dtypes
    name, tensors, kw, family = build(case, shape, dt, dt2, seed)
    assert reduction in REDUCTIONS[family]
    if transform:
        tensors = {k: transform(v) for k, v in tensors.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    cache = {}

    def weights(outs):  # the same random grad_outputs for both runs
        if "w" not in cache:
            cache["w"] = [torch.rand(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) + 0.5 for o in outs]
        return cache["w"]

    got, got_g = run_and_grad(getattr(vae_fast, name), tensors, kw, reduction, weights)
    with vae_fast.use_backend("reference"):
        want, want_g = run_and_grad(getattr(R, name), tensors, kw, reduction, weights)
    acc = torch.float64 if torch.float64 in (dt, dt2) else torch.float32
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == acc and a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerances(acc if acc == torch.float64 else torch.float32))
    for a, b in zip(got_g, want_g):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerances(a.dtype))


@pytest.mark.parametrize("case,reduction", case_reductions())
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(backend, case, reduction, dtypes):
    compare(case, SHAPES["odd"], dtypes, reduction)


@pytest.mark.parametrize("case,reduction", case_reductions(("batchmean", "sum", "none")))
def test_matches_reference_4d_images(backend, case, reduction):
    compare(case, SHAPES["image"], DTYPES["f32"], reduction, seed=3)


@pytest.mark.parametrize("case", ("elbo_bernoulli", "elbo_gaussian_prior", "gaussian_channel_logvar", "bce_logits"))
@pytest.mark.parametrize("layout", ("channels_last", "transposed", "sliced"))
def test_strided_inputs_match(backend, case, layout):
    def transform(t):
        if t.dim() != 4:
            return t
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return t.transpose(2, 3).contiguous().transpose(2, 3)
        return torch.cat([t, t], dim=3)[..., ::2]

    compare(case, (2, 3, 4, 6), DTYPES["f32"], "none", seed=5, transform=transform)
    compare(case, (2, 3, 4, 6), DTYPES["f32"], "batchmean" if not case.startswith("bce") else "mean",
            seed=5, transform=transform)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_extreme_values(backend, dtype):
    z = torch.tensor([[-100.0, 100.0, -30.0, 30.0, 0.0, -1e-8]], dtype=dtype).repeat(2, 1)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0]], dtype=dtype).repeat(2, 1)
    lv = torch.tensor([[-30.0, 30.0, 0.0, 1e-7, -1e-7, 5.0]], dtype=dtype).repeat(2, 1)
    mu = torch.tensor([[0.0, 3.0, -1e3, 1e-3, 1.0, 0.0]], dtype=dtype).repeat(2, 1)
    for lik, recon, rlv in (("bernoulli", z, None), ("gaussian", z, lv), ("bernoulli_probs", y.clamp(0, 1).flip(1), None)):
        args = [t.clone().requires_grad_() for t in (recon, mu, lv)]
        kw = dict(likelihood=lik, recon_logvar=rlv, return_terms=True, reduction="none")
        got = vae_fast.elbo_loss(args[0], y, args[1], args[2], **kw)
        ref_args = [t.detach().clone().requires_grad_() for t in args]
        with vae_fast.use_backend("reference"):
            want = R.elbo_loss(ref_args[0], y, ref_args[1], ref_args[2], **kw)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
        g = torch.autograd.grad(got.loss.sum(), args)
        h = torch.autograd.grad(want.loss.sum(), ref_args)
        for a, b in zip(g, h):
            torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_empty_batch_follows_torch(backend):
    x, y = torch.zeros(0, 5), torch.zeros(0, 5)
    mu, lv = torch.zeros(0, 3), torch.zeros(0, 3)
    assert vae_fast.elbo_loss(x, y, mu, lv, reduction="sum").item() == 0
    assert vae_fast.elbo_loss(x, y, mu, lv).isnan()  # batchmean = 0/0
    assert vae_fast.bernoulli_nll(x, y, reduction="mean").isnan()
    assert vae_fast.elbo_loss(x, y, mu, lv, reduction="none").shape == (0,)
    assert vae_fast.binary_cross_entropy_with_logits(x, y, reduction="none").shape == (0, 5)


def test_nan_and_inf_propagate(backend):
    x = torch.randn(3, 8)
    y = torch.rand(3, 8)
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    x[1, 2] = float("nan")
    lv[2, 0] = float("inf")
    t = vae_fast.elbo_loss(x, y, mu, lv, reduction="none", return_terms=True)
    assert torch.isnan(t.nll[1]) and torch.isfinite(t.nll[[0, 2]]).all()
    assert not torch.isfinite(t.kl[2]) and torch.isfinite(t.kl[[0, 1]]).all()  # inf - inf = nan, as torch
    assert not torch.isfinite(vae_fast.elbo_loss(x, y, mu, lv))
