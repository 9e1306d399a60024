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
    "continuous_bernoulli": lambda: dict(recon=g(3, 8, scale=2), target=g(3, 8, low=0.1)),
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


def test_gradcheck_can_fail(backend):
    """The check above is not vacuous: a backward off by 1% (a hook on the fused loss's autograd
    node scales the gradient it hands back) is caught, for a 0-d and a per-sample loss."""
    x, y = g(2, 5), g(2, 5, low=0.1)

    def off_by_one_percent(fn):
        def run(a):
            loss = fn(a)
            loss.grad_fn.register_hook(lambda grads_in, grads_out: (grads_in[0] * 1.01,) + grads_in[1:])
            return loss
        return run

    for reduction in ("sum", "none"):
        fn = lambda a: vae_fast.bernoulli_nll(a, y, reduction=reduction)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert not torch.autograd.gradcheck(off_by_one_percent(fn), (x,), raise_exception=False)
