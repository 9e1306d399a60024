"""torch.autograd.gradcheck in float64 through the fused paths, for every input that takes a
gradient, every reduction (per-sample grad_outputs for "none": gradcheck's vector-Jacobian
products probe every output), and with the terms of return_terms=True."""
import pytest
import torch

import vae_fast

D = dict(dtype=torch.float64)


def g(*shape, scale=1.0, low=None):
    t = torch.randn(*shape, **D) * scale
    if low is not None:  # probabilities away from 0/1 (finite differences)
        t = torch.rand(*shape, **D) * (1 - 2 * low) + low
    return t.requires_grad_()


CASES = {
    "bernoulli_nll": lambda r: (vae_fast.bernoulli_nll, (g(3, 7, scale=2), g(3, 7, low=0.1)), {}),
    "gaussian_nll_full": lambda r: (vae_fast.gaussian_nll, (g(3, 2, 5), g(3, 2, 5), g(3, 2, 5, scale=0.5)), {}),
    "gaussian_nll_channel": lambda r: (vae_fast.gaussian_nll, (g(2, 3, 4), g(2, 3, 4), g(3, 1, scale=0.5)), {}),
    "gaussian_nll_scalar": lambda r: (vae_fast.gaussian_nll, (g(2, 6), g(2, 6), g((), scale=0.5)), dict(full=False)),
    "kl_standard": lambda r: (vae_fast.gaussian_kl, (g(4, 5), g(4, 5, scale=0.5)), {}),
    "kl_prior": lambda r: (vae_fast.gaussian_kl, (g(4, 5), g(4, 5, scale=0.5), g(5), g(5, scale=0.5)), {}),
    "kl_prior_per_sample": lambda r: (vae_fast.gaussian_kl, (g(4, 5), g(4, 5, scale=0.5), g(4, 1), g(4, 5, scale=0.5)), {}),
}
ELBO = {
    "bernoulli": lambda: dict(recon=g(3, 8, scale=2), target=g(3, 8, low=0.1)),
    "bernoulli_probs": lambda: dict(recon=g(3, 8, low=0.1), target=g(3, 8, low=0.1)),
    "gaussian": lambda: dict(recon=g(3, 2, 4), target=g(3, 2, 4), recon_logvar=g(2, 1, scale=0.5)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "mean", "none"))
def test_gradcheck_terms(backend, name, reduction):
    fn, args, kw = CASES[name](reduction)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, **kw, reduction=reduction), args)


@pytest.mark.parametrize("likelihood", ELBO)
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
def test_gradcheck_elbo_every_input(backend, likelihood, reduction):
    t = ELBO[likelihood]()
    names = list(t) + ["mu", "logvar", "prior_mu", "prior_logvar"]
    args = list(t.values()) + [g(3, 4), g(3, 4, scale=0.5), g(4), g(4, scale=0.5)]

    def f(*a):
        kw = dict(zip(names, a))
        out = vae_fast.elbo_loss(kw.pop("recon"), kw.pop("target"), kw.pop("mu"), kw.pop("logvar"),
                                 likelihood=likelihood, beta=0.6, reduction=reduction, return_terms=True, **kw)
        return tuple(out)  # loss, nll, kl: gradients flow from every term

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_gradcheck_drop_in_bce(backend, reduction):
    x, y = g(3, 6, scale=2), g(3, 6, low=0.1)
    w, pw = g(6, low=0.2), g(3, 1, low=0.2)
    assert torch.autograd.gradcheck(
        lambda *a: vae_fast.binary_cross_entropy_with_logits(*a[:3], reduction=reduction, pos_weight=a[3]), (x, y, w, pw))
    p = g(3, 6, low=0.1)
    assert torch.autograd.gradcheck(lambda *a: vae_fast.binary_cross_entropy(*a, reduction=reduction), (p, y, w))


def test_gradcheck_can_fail(backend, monkeypatch):
    """The check above is not vacuous: a kernel gradient off by 1% is caught, on the eager path
    and through the custom op (both use ops._backward). The cpu backend's C++ fast path, which
    does not, is hidden here; tests/test_cpu_fast.py has its own such test."""
    from vae_fast import _cpu, ops

    monkeypatch.setattr(_cpu, "eager_op", None)
    real = ops._backward

    def wrong(ctx, *grads):
        out = list(real(ctx, *grads))
        out[0] = out[0] * 1.01
        return tuple(out)

    monkeypatch.setattr(ops, "_backward", wrong)
    ops.fused_loss.register_autograd(wrong, setup_context=ops._setup_context)
    try:
        x, y = g(2, 5), g(2, 5, low=0.1)
        assert not torch.autograd.gradcheck(lambda a: vae_fast.bernoulli_nll(a, y), (x,), raise_exception=False)
        args = (x, y, None, None, None, None, None, None, None, None)
        kw = dict(kind="bernoulli", reduction="sum", full=False, rlv_const=0.0, pmu_const=0.0,
                  plv_const=0.0, beta=1.0, needs=[True] + [False] * 8, backend=backend)
        assert not torch.autograd.gradcheck(lambda a: ops.fused_loss(a, *args[1:], **kw)[0], (x,),
                                            raise_exception=False)
    finally:
        ops.fused_loss.register_autograd(real, setup_context=ops._setup_context)
