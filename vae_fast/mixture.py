"""KL against a Gaussian-mixture prior: a mixture of Gaussians, or the VampPrior (the encoder's
outputs on its pseudo-inputs as the components).

There is no closed form, so the KL is the single-sample estimate at the posterior sample z,
per example b:

    log q(z_b|x_b) = sum_j log N(z_bj; mu_bj, exp(logvar_bj))
    log p(z_b)     = logsumexp_k [ log_softmax(prior_logits)_k
                                   + sum_j log N(z_bj; prior_mu_kj, exp(prior_logvar_kj)) ]
    KL_b           = log q(z_b|x_b) - log p(z_b)

with log N(x; m, e^s) = -0.5 * (log(2*pi) + s + (x - m)^2 * e^-s). The op vae_fast::mixture_kl
(csrc/mixture.cpp: C++ kernels on CPU, vae_fast/triton_mixture.py's Triton kernels on CUDA)
sums the quadratic forms directly, component by component, with a hand-written backward; the
"reference" backend runs its twin, the formula with a (B, K, Z) broadcast,
vae_fast.reference.mixture_prior_kl.
"""
from __future__ import annotations

import torch

from . import _backend, _common as C, _ext, reference
from ._enums import Reduction

_op = torch.ops.vae_fast.mixture_kl.default if _ext.module is not None else None
_REDUCTIONS = {"batchmean": int(Reduction.BATCHMEAN), "sum": int(Reduction.SUM),
               "none": int(Reduction.PER_SAMPLE)}


def mixture_prior_kl(z, mu, logvar, prior_mu, prior_logvar, prior_logits=None, *,
                     reduction="batchmean"):
    """Single-sample KL estimate `log q(z|x) - log p(z)` for a Gaussian-mixture prior.

    z, mu: (B, Z); logvar: broadcastable to (B, Z), or a number; prior_mu: (K, Z);
    prior_logvar: broadcastable to (K, Z), or a number; prior_logits: (K,) mixture logits, None
    for equal weights. reduction: "batchmean" (sum / B), "sum", or "none" (shape (B,)).
    Returns float64 when any input is float64, else float32; gradients reach every tensor.

    Fused kernels: (z_bj - m_kj)^2 is summed directly for each example and component (no
    matmul expansion, so no cancellation near a tight component: float32 accumulation is
    accurate, float64 when any input is float64), with a logsumexp over the components. The
    backward keeps only the (B, K) responsibilities, so memory is O(B*Z + K*Z + B*K), never
    O(B*K*Z). It is a hand-written backward: a second derivative (create_graph=True then a
    second backward, torch.func.hessian, forward mode) raises; use
    vae_fast.reference.mixture_prior_kl for those.
    """
    logvar, prior_logvar, reduction = C.parse_mixture_prior_kl(
        z, mu, logvar, prior_mu, prior_logvar, prior_logits, reduction)
    backend = _backend.code(z)
    if backend is None:
        return reference.mixture_prior_kl(z, mu, logvar, prior_mu, prior_logvar, prior_logits,
                                          reduction=reduction)
    acc = C.acc_dtype(z, mu, logvar, prior_mu, prior_logvar, prior_logits)
    # a number is a 0-d tensor the op broadcasts (it takes no gradient)
    lv = logvar if isinstance(logvar, torch.Tensor) else torch.tensor(logvar, dtype=acc, device=z.device)
    plv = (prior_logvar if isinstance(prior_logvar, torch.Tensor)
           else torch.tensor(prior_logvar, dtype=acc, device=z.device))
    return _op(z, mu, lv, prior_mu, plv, prior_logits, _REDUCTIONS[reduction], backend)
