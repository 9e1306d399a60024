"""KL against a Gaussian-mixture prior: a mixture of Gaussians, or the VampPrior (the encoder's
outputs on its pseudo-inputs as the components).

There is no closed form, so the KL is the single-sample estimate at the posterior sample z,
per example b:

    log q(z_b|x_b) = sum_j log N(z_bj; mu_bj, exp(logvar_bj))
    log p(z_b)     = logsumexp_k [ log_softmax(prior_logits)_k
                                   + sum_j log N(z_bj; prior_mu_kj, exp(prior_logvar_kj)) ]
    KL_b           = log q(z_b|x_b) - log p(z_b)

with log N(x; m, e^s) = -0.5 * (log(2*pi) + s + (x - m)^2 * e^-s). Plain torch (two float64
matmuls and (B, K) work), the same code on every device; its twin, the formula with a
(B, K, Z) broadcast, is vae_fast.reference.mixture_prior_kl.
"""
from __future__ import annotations

import math

import torch

from . import _common as C


def _tensor(p, dtype, like: torch.Tensor) -> torch.Tensor:
    return p.to(dtype) if isinstance(p, torch.Tensor) else torch.as_tensor(p, dtype=dtype, device=like.device)


def mixture_prior_kl(z, mu, logvar, prior_mu, prior_logvar, prior_logits=None, *,
                     reduction="batchmean"):
    """Single-sample KL estimate `log q(z|x) - log p(z)` for a Gaussian-mixture prior.

    z, mu: (B, Z); logvar: broadcastable to (B, Z), or a number; prior_mu: (K, Z);
    prior_logvar: broadcastable to (K, Z), or a number; prior_logits: (K,) mixture logits, None
    for equal weights. reduction: "batchmean" (sum / B), "sum", or "none" (shape (B,)).
    Returns float64 when any input is float64, else float32; gradients reach every tensor.

    The (B, K) component log-densities are matmuls (the quadratic form expanded), so memory is
    O(B*Z + K*Z + B*K), never O(B*K*Z). The expansion cancels when z is near a tight
    component's mean (float32 loses every digit at prior_logvar = -8, |z| ~ 3), so it is
    computed in float64 whatever the input dtype; that also keeps it off TF32 on CUDA.
    """
    logvar, prior_logvar, reduction = C.parse_mixture_prior_kl(
        z, mu, logvar, prior_mu, prior_logvar, prior_logits, reduction)
    out_dtype = C.acc_dtype(z, mu, logvar, prior_mu, prior_logvar, prior_logits)
    f64 = torch.float64
    z, mu, pm = z.to(f64), mu.to(f64), prior_mu.to(f64)
    lv = _tensor(logvar, f64, z)
    plv = _tensor(prior_logvar, f64, z).expand(pm.shape)
    # log N's 0.5*log(2*pi) per latent dimension is in log q and in every component of log p:
    # it cancels, and is left out of both.
    log_q = -0.5 * (lv + (z - mu) ** 2 * torch.exp(-lv)).sum(1)
    prec = torch.exp(-plv)
    pm_prec = pm * prec
    # sum_j (z_bj - m_kj)^2 e^-s_kj = z^2 @ (e^-s).T - 2 z @ (m e^-s).T + sum_j m_kj^2 e^-s_kj
    quad = torch.addmm(torch.addmm((pm * pm_prec).sum(1), z * z, prec.T), z, pm_prec.T, alpha=-2.0)
    log_w = -math.log(pm.shape[0]) if prior_logits is None else torch.log_softmax(prior_logits.to(f64), 0)
    log_p = torch.logsumexp(log_w - 0.5 * (plv.sum(1) + quad), 1)
    return C.reduce_terms(log_q - log_p, reduction).to(out_dtype)
