"""The public losses. Each checks its arguments (vae_fast._common), then runs on the backend
that `vae_fast._backend.resolve` picks: the fused op (vae_fast.ops) or the reference twin."""
from __future__ import annotations

import torch

from . import _backend, _common as C, ops, reference
from ._common import ELBOTerms, Problem


def _tensor_or_none(p):
    return p if isinstance(p, torch.Tensor) else None


def _const(p, default=0.0) -> float:
    return p if isinstance(p, float) else default


def compute(p: Problem):
    main = p.x if p.x is not None else p.mu
    backend = _backend.resolve(main.device)
    if backend == "reference":
        return reference.compute(p)
    lv = p.lv
    if isinstance(lv, float):  # a fixed posterior log-variance: read as a broadcast scalar
        acc = C.acc_dtype(p.x, p.y, p.rlv, p.w, p.pw, p.mu, p.pmu, p.plv)
        lv = torch.full((), lv, dtype=acc, device=p.mu.device)
    tensors = (p.x, p.y, _tensor_or_none(p.rlv), p.w, p.pw, p.mu, lv,
               _tensor_or_none(p.pmu), _tensor_or_none(p.plv))
    grad_on = torch.is_grad_enabled()
    needs = [bool(grad_on and t is not None and t.requires_grad) for t in tensors]
    beta_t = _tensor_or_none(p.beta)
    out = ops.call_fused_loss(*tensors, beta_t, kind=p.kind, reduction=p.reduction, full=p.full,
                         rlv_const=_const(p.rlv), pmu_const=_const(p.pmu), plv_const=_const(p.plv),
                         beta=1.0 if beta_t is not None else p.beta, needs=needs, backend=backend)
    if not torch.compiler.is_compiling():  # compiled graphs scale with a fused multiply
        ops.donate_grad_buffers(out)
    loss, nll, kl = out[:3]
    return ELBOTerms(loss, nll, kl) if p.return_terms else loss


def bernoulli_nll(logits, target, *, reduction="batchmean"):
    """Bernoulli negative log-likelihood from logits, summed per pixel:
    `softplus(z) - y*z = max(z,0) - y*z + log1p(exp(-|z|))`. `target` may be bool."""
    return compute(C.parse_bernoulli_nll(logits, target, reduction))


def gaussian_nll(mean, target, logvar=0.0, *, full=True, reduction="batchmean"):
    """Gaussian negative log-likelihood with log-variance `s` (a number, or a tensor that
    broadcasts to `mean`): `0.5*(s + (y-m)^2*exp(-s))` (+ `0.5*log(2*pi)` when `full`)."""
    return compute(C.parse_gaussian_nll(mean, target, logvar, full, reduction))


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, reduction="batchmean"):
    """`KL(N(mu, e^s) || N(mu_p, e^s_p)) = 0.5*(expm1(s-s_p) - (s-s_p) + (mu-mu_p)^2*exp(-s_p))`,
    prior None = N(0, I); prior tensors may broadcast (a learned per-feature `(Z,)` prior)."""
    return compute(C.parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction))


def elbo_loss(recon, target, mu, logvar, *, likelihood="bernoulli", recon_logvar=None,
              prior_mu=None, prior_logvar=None, beta=1.0, reduction="batchmean",
              return_terms=False):
    """Negative ELBO `nll(recon, target) + beta * kl(mu, logvar)` in one fused pass.

    likelihood: "bernoulli" (recon are logits), "bernoulli_probs" (recon are probabilities),
    "gaussian" (recon are means; `recon_logvar` None = unit variance, a number, or a tensor).
    reduction: "batchmean" (sum / batch size, the usual per-example ELBO), "sum", "none" (B,).
    return_terms=True returns ELBOTerms(loss, nll, kl), the KL unweighted.
    """
    return compute(C.parse_elbo(recon, target, mu, logvar, likelihood, recon_logvar, prior_mu,
                                prior_logvar, beta, reduction, return_terms))


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Drop-in for `torch.nn.functional.binary_cross_entropy_with_logits` (same arguments and
    reductions, "none" elementwise); the result is float32 for 16-bit inputs."""
    return compute(C.parse_bce(input, target, weight, reduction, pos_weight, logits=True))


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """Drop-in for `torch.nn.functional.binary_cross_entropy` (log clamped at -100, backward
    `(x-y)/max(x(1-x), 1e-12)`); also runs under autocast. Inputs outside [0, 1] give NaN
    instead of torch's error (checking would cost a host sync)."""
    return compute(C.parse_bce(input, target, weight, reduction, None, logits=False))
