"""The oracle checked in turn: vae_fast.reference against torch.distributions and
torch.nn.functional, values and gradients, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae_fast import reference as R

torch.manual_seed(0)
D = dict(dtype=torch.float64)


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, retain_graph=True)


def test_bernoulli_nll_is_minus_bernoulli_log_prob():
    z = (torch.randn(6, 3, 5, **D) * 4).requires_grad_()
    y = torch.rand(6, 3, 5, **D).requires_grad_()
    ours = R.bernoulli_nll(z, y, reduction="sum")
    theirs = -Bernoulli(logits=z, validate_args=False).log_prob(y).sum()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(_grads(ours, z, y), _grads(theirs, z, y)):
        torch.testing.assert_close(a, b)


def test_gaussian_nll_is_minus_normal_log_prob():
    m = torch.randn(4, 7, **D).requires_grad_()
    y = torch.randn(4, 7, **D).requires_grad_()
    s = torch.randn(4, 7, **D).requires_grad_()
    ours = R.gaussian_nll(m, y, s, reduction="sum")
    theirs = -Normal(m, torch.exp(0.5 * s)).log_prob(y).sum()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(_grads(ours, m, y, s), _grads(theirs, m, y, s)):
        torch.testing.assert_close(a, b)
    # full=False drops 0.5*log(2*pi) per element
    torch.testing.assert_close(R.gaussian_nll(m, y, s, full=False, reduction="sum"),
                               theirs - 0.5 * math.log(2 * math.pi) * m.numel())


@pytest.mark.parametrize("prior", [False, True])
def test_gaussian_kl_is_distributions_kl(prior):
    mu = torch.randn(5, 8, **D).requires_grad_()
    lv = torch.randn(5, 8, **D).requires_grad_()
    pmu = torch.randn(8, **D).requires_grad_() if prior else None
    plv = torch.randn(8, **D).requires_grad_() if prior else None
    ours = R.gaussian_kl(mu, lv, pmu, plv, reduction="sum")
    p = Normal(pmu if prior else torch.zeros(8, **D), torch.exp(0.5 * plv) if prior else torch.ones(8, **D))
    theirs = kl_divergence(Normal(mu, torch.exp(0.5 * lv)), p).sum()
    torch.testing.assert_close(ours, theirs)
    xs = (mu, lv, pmu, plv) if prior else (mu, lv)
    for a, b in zip(_grads(ours, *xs), _grads(theirs, *xs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_matches_torch(reduction):
    z = (torch.randn(4, 6, **D) * 3).requires_grad_()
    y = torch.rand(4, 6, **D).requires_grad_()
    w = torch.rand(6, **D).requires_grad_()
    pw = (torch.rand(6, **D) * 3).requires_grad_()
    ours = R.binary_cross_entropy_with_logits(z, y, w, reduction, pw)
    theirs = F.binary_cross_entropy_with_logits(z, y, w.detach(), reduction=reduction, pos_weight=pw.detach())
    torch.testing.assert_close(ours, theirs)
    g = torch.rand_like(ours)
    for a, b in zip(_grads((ours * g).sum(), z, y), _grads((theirs * g).sum(), z, y)):
        torch.testing.assert_close(a, b)
    # torch refuses gradients for weight and pos_weight; ours are d/dw = the unweighted loss and
    # d/dpw = w * y * softplus(-z), reduced the same way
    unweighted = F.binary_cross_entropy_with_logits(z, y, reduction="none", pos_weight=pw.detach()).detach()
    scale = 1 / unweighted.numel() if reduction == "mean" else 1
    g_full = (g.expand_as(unweighted) if reduction != "none" else g) * scale
    gw, gpw = _grads((ours * g).sum(), w, pw)
    torch.testing.assert_close(gw, (unweighted * g_full).sum(0))
    torch.testing.assert_close(gpw, (w * y * F.softplus(-z) * g_full).detach().sum(0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_probs_matches_torch_including_the_ends(reduction):
    x = torch.rand(4, 6, **D)
    x[0, :3] = torch.tensor([0.0, 1.0, 1e-30], **D)  # log clamped at -100, backward eps 1e-12
    x.requires_grad_()
    y = torch.rand(4, 6, **D)
    y[0, :3] = torch.tensor([1.0, 0.0, 0.5], **D)
    y.requires_grad_()
    w = torch.rand(4, 1, **D)
    ours = R.binary_cross_entropy(x, y, w, reduction)
    theirs = F.binary_cross_entropy(x, y, w, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    g = torch.rand_like(ours)
    for a, b in zip(_grads((ours * g).sum(), x, y), _grads((theirs * g).sum(), x, y)):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_elbo_is_nll_plus_beta_kl_per_sample():
    x, y = torch.randn(3, 10, **D), torch.rand(3, 10, **D)
    mu, lv = torch.randn(3, 4, **D), torch.randn(3, 4, **D)
    t = R.elbo_loss(x, y, mu, lv, beta=0.25, reduction="none", return_terms=True)
    torch.testing.assert_close(t.nll, R.bernoulli_nll(x, y, reduction="none"))
    torch.testing.assert_close(t.kl, R.gaussian_kl(mu, lv, reduction="none"))
    torch.testing.assert_close(t.loss, t.nll + 0.25 * t.kl)
    torch.testing.assert_close(R.elbo_loss(x, y, mu, lv, beta=0.25), t.loss.sum() / 3)


def test_reductions():
    x, y = torch.randn(3, 2, 5, **D), torch.rand(3, 2, 5, **D)
    per = R.bernoulli_nll(x, y, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(R.bernoulli_nll(x, y, reduction="sum"), per.sum())
    torch.testing.assert_close(R.bernoulli_nll(x, y), per.sum() / 3)
    torch.testing.assert_close(R.bernoulli_nll(x, y, reduction="mean"), per.sum() / 30)


def test_16_bit_inputs_accumulate_in_float32():
    x = torch.randn(4, 9).bfloat16()
    out = R.bernoulli_nll(x, torch.rand(4, 9).bfloat16())
    assert out.dtype == torch.float32
    assert R.gaussian_kl(torch.randn(2, 3, **D), torch.randn(2, 3).half()).dtype == torch.float64
