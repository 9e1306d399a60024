"""Plain, readable PyTorch for every public loss: the oracle of the tests and the fallback path.

Same signatures, checks, reductions and dtype policy as the fused functions in `vae_fast`;
gradients come from autograd. Every formula is the one in docs/design.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _common as C
from ._common import ELBOTerms, Problem

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _as(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) else t


class _BernoulliProbsNLL(torch.autograd.Function):
    """`F.binary_cross_entropy(reduction="none")`, written out so it also runs under autocast
    and in float64 for every input. The clamps make autograd's gradient 0*inf = nan at x in
    {0, 1}, so the backward is torch's own formula: `(x-y)/max(x(1-x), 1e-12)` and, for the
    target, `log1p(-x) - log(x)`."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return -(y * torch.log(x).clamp_min(-100) + (1 - y) * torch.log1p(-x).clamp_min(-100))

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = g * (x - y) / (x * (1 - x)).clamp_min(1e-12) if ctx.needs_input_grad[0] else None
        gy = g * (torch.log1p(-x) - torch.log(x)) if ctx.needs_input_grad[1] else None
        return gx, gy


# log C(z) = log(z / tanh(z/2)) near 0, where z / tanh(z/2) is 0/0: its Taylor series in z^2
_CB_LOG_NORM_SERIES = (math.log(2.0), 1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400)


def continuous_bernoulli_log_norm(z: torch.Tensor) -> torch.Tensor:
    """`log C(z) = log(z / tanh(z/2))`, the log-normalizer of the continuous Bernoulli with
    logit z (Loaiza-Ganem & Cunningham 2019), even in z: `log|z| - log(tanh(|z|/2))`, and its
    Taylor series for |z| under 0.5 (float32) or 0.05 (float64), where autograd's derivative of
    the closed form, `1/z - 1/sinh(z)`, cancels; there the series' next term is under the
    dtype's rounding."""
    a = z.abs()
    small = a < (0.05 if z.dtype == torch.float64 else 0.5)
    a_big = torch.where(small, torch.ones_like(a), a)  # no 0/0 in the branch not taken
    closed = torch.log(a_big) - torch.log(torch.tanh(0.5 * a_big))
    z2 = z * z
    series = torch.zeros_like(z)
    for c in reversed(_CB_LOG_NORM_SERIES):
        series = series * z2 + c
    return torch.where(small, series, closed)


def _softplus(x):
    # torch's default threshold (20) returns x above it, off by exp(-20) = 2e-9: a float64
    # error; past 50 the dropped exp(-x) is under float64's rounding of any loss it is in
    return F.softplus(x, threshold=50.0)


def _recon_elementwise(p: Problem, dt: torch.dtype) -> torch.Tensor:
    x, y = p.x.to(dt), p.y.to(dt)
    if p.kind == "bernoulli":
        if p.pw is None:
            loss = _softplus(x) - y * x  # softplus(z) - y*z, exact gradient at z = 0
        else:  # torch's pos_weight form: (1-y)*z + (1 + (pw-1)*y) * softplus(-z)
            loss = (1 - y) * x + (1 + (p.pw.to(dt) - 1) * y) * _softplus(-x)
    elif p.kind == "bernoulli_probs":
        loss = _BernoulliProbsNLL.apply(x, y)
    elif p.kind == "continuous_bernoulli":
        loss = _softplus(x) - y * x - continuous_bernoulli_log_norm(x)
    else:  # gaussian
        s = _as(p.rlv, dt)
        s_t = s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=dt, device=x.device)
        loss = 0.5 * (s_t + (y - x) ** 2 * torch.exp(-s_t))
        if p.full:
            loss = loss + HALF_LOG_2PI
    if p.w is not None:
        loss = loss * p.w.to(dt)
    return loss.expand(p.x.shape) if loss.shape != p.x.shape else loss


def _kl_elementwise(p: Problem, dt: torch.dtype) -> torch.Tensor:
    mu = p.mu.to(dt)
    lv = _as(p.lv, dt)
    pmu = 0.0 if p.pmu is None else _as(p.pmu, dt)
    plv = 0.0 if p.plv is None else _as(p.plv, dt)
    lv_t = lv if isinstance(lv, torch.Tensor) else torch.tensor(lv, dtype=dt, device=mu.device)
    plv_t = plv if isinstance(plv, torch.Tensor) else torch.tensor(plv, dtype=dt, device=mu.device)
    d = lv_t - plv_t
    kl = 0.5 * (torch.expm1(d) - d + (mu - pmu) ** 2 * torch.exp(-plv_t))
    return kl.expand(mu.shape) if kl.shape != mu.shape else kl


def free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits):
    """sum_j max(free_bits, mean_b KL_bj), the KL term of free bits: each latent dimension's KL
    averaged over the batch, floored (a dimension under the floor gets no gradient). Plain
    torch on the (B, Z) KL values, used by the fused path too."""
    p = C.parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, "sum")
    dt = C.acc_dtype(p.mu, p.lv, p.pmu, p.plv)
    per_dim = _kl_elementwise(p, dt).mean(0)
    if isinstance(free_bits, torch.Tensor):
        return torch.maximum(per_dim, free_bits.to(dt)).sum()
    return per_dim.clamp_min(free_bits).sum()


def compute(p: Problem):
    dt = C.acc_dtype(p.x, p.y, p.rlv, p.w, p.pw, p.mu, p.lv, p.pmu, p.plv)
    if p.reduction == "elementwise":
        return _recon_elementwise(p, dt)
    nll = C.reduce_terms(_recon_elementwise(p, dt), p.reduction) if p.kind != "none" else None
    kl = C.reduce_terms(_kl_elementwise(p, dt), p.reduction) if p.mu is not None else None
    if kl is None:
        return nll
    if nll is None:
        return kl
    loss = nll + (p.beta.to(dt) if isinstance(p.beta, torch.Tensor) else p.beta) * kl
    return ELBOTerms(loss, nll, kl) if p.return_terms else loss


def bernoulli_nll(logits, target, *, reduction="batchmean"):
    """Bernoulli negative log-likelihood from logits, summed per pixel:
    `softplus(z) - y*z = max(z,0) - y*z + log1p(exp(-|z|))`."""
    return compute(C.parse_bernoulli_nll(logits, target, reduction))


def gaussian_nll(mean, target, logvar=0.0, *, full=True, reduction="batchmean"):
    """Gaussian negative log-likelihood with log-variance s:
    `0.5*(s + (y-m)^2*exp(-s))` (+ `0.5*log(2*pi)` when `full`)."""
    return compute(C.parse_gaussian_nll(mean, target, logvar, full, reduction))


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, reduction="batchmean"):
    """`KL(N(mu, e^s) || N(mu_p, e^s_p)) = 0.5*(expm1(s-s_p) - (s-s_p) + (mu-mu_p)^2*exp(-s_p))`;
    prior None = N(0, I)."""
    return compute(C.parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction))


def _sampled_nll(recon, target, rlv, likelihood, full):
    """(K, B) NLLs of each sample of recon against the target, the target expanded."""
    k = recon.shape[0]
    y = target.expand(recon.shape).flatten(0, 1)
    if isinstance(rlv, torch.Tensor):
        rlv = rlv.expand(recon.shape).flatten(0, 1)
    p = Problem(likelihood, recon.flatten(0, 1), y, rlv if rlv is not None else 0.0, None, None,
                full, None, None, None, None, 1.0, "none")
    return compute(p).view(k, -1)


def _sampled_elbo(recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu,
                  prior_logvar, beta, capacity, free_bits, reduction, return_terms):
    beta, capacity, free_bits, rlv = C.parse_sampled_elbo(
        recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu, prior_logvar, beta,
        capacity, free_bits, reduction)
    kl_b = gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction="none")
    nll_kb = _sampled_nll(recon, target, rlv, likelihood, full)
    out = C.sampled_terms(nll_kb, kl_b, beta, reduction)
    out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                         lambda: free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
    return out if return_terms else out.loss


def iwae_loss(recon, target, z, mu, logvar, *, likelihood="bernoulli", recon_logvar=None,
              full=True, reduction="batchmean"):
    """The importance-weighted bound over K samples: -(logsumexp_k log w_kb - log K), with
    log w_kb = -nll(recon_kb, target_b) + log N(z_kb; 0, I) - log N(z_kb; mu_b, e^logvar_b)."""
    rlv, logvar = C.parse_iwae(recon, target, z, mu, logvar, likelihood, recon_logvar, full, reduction)
    nll_kb = _sampled_nll(recon, target, rlv, likelihood, full)
    lat = C.iwae_latent(z, mu, logvar, nll_kb.dtype)
    return C.reduce_terms(-(torch.logsumexp(lat - nll_kb, 0) - math.log(nll_kb.shape[0])), reduction)


def elbo_loss(recon, target, mu, logvar, *, likelihood="bernoulli", recon_logvar=None,
              full=True, prior_mu=None, prior_logvar=None, beta=1.0, capacity=None,
              free_bits=None, reduction="batchmean", return_terms=False, num_bins=256):
    """Negative ELBO: `nll(recon, target) + beta * kl(mu, logvar)`; `recon_logvar="optimal"`:
    the sigma-VAE's shared variance (see vae_fast._common.optimal_gaussian_terms); with `capacity` C,
    `nll + beta * |kl - C|`; with `free_bits` lambda, `nll + beta * sum_j max(lambda, mean_b KL_bj)`;
    likelihood="discretized_logistic_mixture": recon are its parameters (see dmol_log_prob)."""
    if likelihood == C.DMOL:
        return _dmol_elbo(recon, target, mu, logvar, prior_mu, prior_logvar, beta, capacity,
                          free_bits, reduction, return_terms, num_bins, recon_logvar, full)
    C.check_num_bins(num_bins, likelihood)
    if C.sample_count(recon, target) is not None:
        return _sampled_elbo(recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu,
                             prior_logvar, beta, capacity, free_bits, reduction, return_terms)
    if C.is_optimal(recon_logvar, likelihood):
        C.check_full(full, likelihood)
        C.check_reduction(reduction, C.ELBO_REDUCTIONS)
        capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
        per = compute(C.parse_elbo(recon, target, mu, logvar, "gaussian", 0.0, prior_mu,
                                   prior_logvar, beta, "none", True, False))
        out = C.optimal_gaussian_terms(per, recon[0].numel(), full, beta, reduction)
        out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                             lambda: free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
        return out if return_terms else out.loss
    if free_bits is not None or capacity is not None:
        capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
        terms = compute(C.parse_elbo(recon, target, mu, logvar, likelihood, recon_logvar, prior_mu,
                                     prior_logvar, beta, reduction, True, full))
        out = C.kl_objective(terms, beta, capacity, free_bits, reduction, mu.shape[0],
                             lambda: free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
        return out if return_terms else out.loss
    return compute(C.parse_elbo(recon, target, mu, logvar, likelihood, recon_logvar, prior_mu,
                                prior_logvar, beta, reduction, return_terms, full))


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """`torch.nn.functional.binary_cross_entropy_with_logits`, computed in float32/float64."""
    return compute(C.parse_bce(input, target, weight, reduction, pos_weight, logits=True))


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """`torch.nn.functional.binary_cross_entropy` (log clamped at -100), in float32/float64."""
    return compute(C.parse_bce(input, target, weight, reduction, None, logits=False))


def mixture_prior_kl(z, mu, logvar, prior_mu, prior_logvar, prior_logits=None, *,
                     reduction="batchmean"):
    """`log q(z|x) - log p(z)` for a Gaussian-mixture prior, written as the formula: a
    (B, K, Z) broadcast and torch.logsumexp, in float64 when any input is float64, else
    float32."""
    logvar, prior_logvar, reduction = C.parse_mixture_prior_kl(
        z, mu, logvar, prior_mu, prior_logvar, prior_logits, reduction)
    dt = C.acc_dtype(z, mu, logvar, prior_mu, prior_logvar, prior_logits)
    z, mu, pm = z.to(dt), mu.to(dt), prior_mu.to(dt)
    lv, plv = (p.to(dt) if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=dt, device=z.device)
               for p in (logvar, prior_logvar))

    def log_normal(x, m, s):
        return -0.5 * (2 * HALF_LOG_2PI + s + (x - m) ** 2 * torch.exp(-s))

    K = pm.shape[0]
    log_w = (torch.full((K,), -math.log(K), dtype=dt, device=z.device) if prior_logits is None
             else torch.log_softmax(prior_logits.to(dt), 0))
    log_q = log_normal(z, mu, lv).sum(1)
    log_p = torch.logsumexp(log_w + log_normal(z[:, None, :], pm, plv).sum(2), 1)
    return C.reduce_terms(log_q - log_p, reduction)


def dmol_log_prob(params: torch.Tensor, target: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """log p(target | params) per pixel, (B, *spatial), of the discretized logistic mixture:
    PixelCNN++'s `discretized_mix_logistic_loss` (Salimans et al. 2017) in PyTorch layout and
    with `num_bins` bins K, written as its formula. Per pixel, component k and channel c:
    mean `m_ck` (green gets `+ tanh(a_0k) * x_red`, blue `+ tanh(a_1k) * x_red + tanh(a_2k) *
    x_green`), log-scale `s_ck = max(raw, -7)`, `u = x_c - m_ck`, half-bin `h = 1/(K-1)`;
    `log P = log sigmoid((u+h)/e^s)` where `x_c < -0.999`, `log(1 - sigmoid((u-h)/e^s))` where
    `x_c > 0.999`, else `log(sigmoid((u+h)/e^s) - sigmoid((u-h)/e^s))`, or, where that
    probability is at most 1e-5, `log_pdf(u) - log((K-1)/2)`; then
    `logsumexp_k(log_softmax(logits)_k + sum_c log P_ck)`. The bin probability is the
    difference of the sigmoids' complements where both are above 1/2 (the same number, without
    float32's cancellation). Float64 when either input is, else float32."""
    dt = C.acc_dtype(params, target)
    c = target.shape[1]
    m = params.shape[1] // (10 if c == 3 else 3)
    l = params.to(dt).movedim(1, -1)  # (B, *S, P)
    x = target.to(dt).movedim(1, -1).unsqueeze(-1)  # (B, *S, C, 1)
    logits = l[..., :m]
    rest = l[..., m:].unflatten(-1, (c, -1))  # (B, *S, C, 3M) or (B, *S, 1, 2M)
    means = rest[..., :m]
    log_scales = rest[..., m:2 * m].clamp_min(-7.0)
    if c == 3:
        a = torch.tanh(rest[..., 2 * m:3 * m])
        x0, x1 = x[..., 0, :], x[..., 1, :]
        means = torch.stack((means[..., 0, :], means[..., 1, :] + a[..., 0, :] * x0,
                             means[..., 2, :] + a[..., 1, :] * x0 + a[..., 2, :] * x1), -2)
    u = x - means
    inv = torch.exp(-log_scales)
    h = 1.0 / (num_bins - 1)
    plus, minus, mid = inv * (u + h), inv * (u - h), inv * u
    log_cdf_plus = -_softplus(-plus)
    log_sf_min = -_softplus(minus)
    delta = torch.where(minus > 0, torch.sigmoid(-minus) - torch.sigmoid(-plus),
                        torch.sigmoid(plus) - torch.sigmoid(minus))
    log_pdf_mid = mid - log_scales - 2.0 * _softplus(mid)
    inner = torch.where(delta > 1e-5, torch.log(delta.clamp_min(1e-12)),
                        log_pdf_mid - math.log((num_bins - 1) / 2))
    log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_sf_min, inner))
    return torch.logsumexp(log_p.sum(-2) + torch.log_softmax(logits, -1), -1)


def discretized_logistic_mixture_nll(params, target, *, num_bins=256, reduction="batchmean"):
    """-log p(target | params) of the discretized logistic mixture (see dmol_log_prob), summed
    per pixel and reduced: "batchmean", "sum", "mean" (per dimension of target), "none" (B,)."""
    C.parse_dmol(params, target, num_bins, reduction)
    per = -dmol_log_prob(params, target, num_bins).flatten(1).sum(1)
    return C.dmol_reduce(per, reduction, target.numel())


def _dmol_elbo(recon, target, mu, logvar, prior_mu, prior_logvar, beta, capacity, free_bits,
               reduction, return_terms, num_bins, recon_logvar, full):
    beta, logvar, prior_mu, prior_logvar, reduction = C.parse_dmol_elbo(
        recon, target, mu, logvar, prior_mu, prior_logvar, beta, reduction, num_bins,
        recon_logvar, full)
    capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
    nll = discretized_logistic_mixture_nll(recon, target, num_bins=num_bins, reduction=reduction)
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction)
    nll = nll.to(C.acc_dtype(nll, kl))
    kl = kl.to(nll.dtype)
    w = beta.to(nll.dtype) if isinstance(beta, torch.Tensor) else beta
    out = ELBOTerms(nll + w * kl, nll, kl)
    out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                         lambda: free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
    return out if return_terms else out.loss
