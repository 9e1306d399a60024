"""The public losses: argument sugar around one C++ operator, `vae_fast::fused_loss`.

Each function turns its Python arguments into the op's (option strings to codes, numbers or
tensors for each parameter, the backend) and calls the op; the op checks the tensors, plans the
call, runs the fused kernel and registers its autograd node, all in C++ (csrc/plan.cpp,
csrc/ops.cpp). Errors for bad tensors come from there, worded as vae_fast._common words them
for the reference twin (vae_fast.reference), which the "reference" backend runs.
"""
from __future__ import annotations

import torch

from . import _backend, _common as C, _ext, reference
from ._common import ELBOTerms
from ._enums import Api, Likelihood, Reduction

_Tensor = torch.Tensor
_op = torch.ops.vae_fast.fused_loss.default if _ext.module is not None else None
_iwae_op = torch.ops.vae_fast.iwae.default if _ext.module is not None else None
_latent_op = torch.ops.vae_fast.iwae_latent.default if _ext.module is not None else None

_KINDS = {"bernoulli": int(Likelihood.BERNOULLI), "bernoulli_probs": int(Likelihood.BERNOULLI_PROBS),
          "gaussian": int(Likelihood.GAUSSIAN),
          "continuous_bernoulli": int(Likelihood.CONTINUOUS_BERNOULLI),
          "discretized_logistic_mixture": int(Likelihood.DMOL)}
_VAE_REDUCTIONS = {"batchmean": int(Reduction.BATCHMEAN), "sum": int(Reduction.SUM),
                   "mean": int(Reduction.MEAN), "none": int(Reduction.PER_SAMPLE)}
_ELBO_REDUCTIONS = {k: v for k, v in _VAE_REDUCTIONS.items() if k != "mean"}
_TORCH_REDUCTIONS = {"mean": int(Reduction.MEAN), "sum": int(Reduction.SUM),
                     "none": int(Reduction.ELEMENTWISE)}
_NONE, _GAUSSIAN = int(Likelihood.NONE), int(Likelihood.GAUSSIAN)
_BERNOULLI, _PROBS = int(Likelihood.BERNOULLI), int(Likelihood.BERNOULLI_PROBS)
_ELBO, _BNLL, _GNLL, _GKL = int(Api.ELBO_LOSS), int(Api.BERNOULLI_NLL), int(Api.GAUSSIAN_NLL), int(Api.GAUSSIAN_KL)
_BCE_LOGITS, _BCE, _SAMPLED = int(Api.BCE_WITH_LOGITS), int(Api.BCE), int(Api.SAMPLED_NLL)
_PER_SAMPLE, _BATCHMEAN = int(Reduction.PER_SAMPLE), int(Reduction.BATCHMEAN)
_DMOL, _DMOL_NLL = int(Likelihood.DMOL), int(Api.DMOL_NLL)


def _reduction(reduction, table: dict, allowed: tuple) -> int:
    code = table.get(reduction) if type(reduction) is str else None
    if code is None:
        C.check_reduction(reduction, allowed)  # raises
    return code


def _tensor(name: str, t):
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _param(name: str, p, *, allow_none: bool = True, default: float = 0.0):
    """A parameter argument as (tensor or None, number): a tensor, a real number or None."""
    if type(p) is float:
        return None, p
    if p is None and allow_none:
        return None, default
    if isinstance(p, _Tensor):
        return p, default
    return None, C.check_param(name, p, None, None, allow_none=allow_none)  # a number, or raises


def _beta(beta):
    if type(beta) is float and beta >= 0.0:
        return None, beta
    beta = C.check_beta(beta)
    return (beta, 1.0) if isinstance(beta, _Tensor) else (None, beta)


def _weight(name: str, p):
    if p is None or isinstance(p, _Tensor):
        return p
    C.check_param(name, p, None, None)
    raise TypeError(f"{name} must be a tensor or None, got float")


def _code(main, parse):
    """The backend code for `main`'s device (None: the reference). Where a forced backend
    cannot run, bad arguments still raise their own ValueError/TypeError first (`parse`, the
    reference's checks), then the NotImplementedError."""
    try:
        return _backend.code(main)
    except NotImplementedError:
        parse()
        raise


def bernoulli_nll(logits, target, *, reduction="batchmean"):
    """Bernoulli negative log-likelihood from logits, summed per pixel:
    `softplus(z) - y*z = max(z,0) - y*z + log1p(exp(-|z|))`. `target` may be bool."""
    red = _reduction(reduction, _VAE_REDUCTIONS, C.VAE_REDUCTIONS)
    backend = _code(_tensor("logits", logits), lambda: C.parse_bernoulli_nll(logits, target, reduction))
    if backend is None:
        return reference.bernoulli_nll(logits, target, reduction=reduction)
    return _op(logits, _tensor("target", target), None, None, None, None, None, None, None, None,
               _BNLL, _BERNOULLI, red, False, 0.0, 0.0, 0.0, 0.0, 1.0, backend)[0]


def gaussian_nll(mean, target, logvar=0.0, *, full=True, reduction="batchmean"):
    """Gaussian negative log-likelihood with log-variance `s` (a number, or a tensor that
    broadcasts to `mean`): `0.5*(s + (y-m)^2*exp(-s))` (+ `0.5*log(2*pi)` when `full`)."""
    red = _reduction(reduction, _VAE_REDUCTIONS, C.VAE_REDUCTIONS)
    backend = _code(_tensor("mean", mean),
                    lambda: C.parse_gaussian_nll(mean, target, logvar, full, reduction))
    if backend is None:
        return reference.gaussian_nll(mean, target, logvar, full=full, reduction=reduction)
    rlv, rlv_c = _param("logvar", logvar, allow_none=False)
    return _op(mean, _tensor("target", target), rlv, None, None, None, None, None, None, None,
               _GNLL, _GAUSSIAN, red, bool(full), rlv_c, 0.0, 0.0, 0.0, 1.0, backend)[0]


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, reduction="batchmean"):
    """`KL(N(mu, e^s) || N(mu_p, e^s_p)) = 0.5*(expm1(s-s_p) - (s-s_p) + (mu-mu_p)^2*exp(-s_p))`,
    prior None = N(0, I); prior tensors may broadcast (a learned per-feature `(Z,)` prior)."""
    red = _reduction(reduction, _VAE_REDUCTIONS, C.VAE_REDUCTIONS)
    backend = _code(_tensor("mu", mu),
                    lambda: C.parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction))
    if backend is None:
        return reference.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction)
    lv, lv_c = _param("logvar", logvar, allow_none=False)
    pmu, pmu_c = _param("prior_mu", prior_mu)
    plv, plv_c = _param("prior_logvar", prior_logvar)
    return _op(None, None, None, None, None, mu, lv, pmu, plv, None, _GKL, _NONE, red, False,
               0.0, lv_c, pmu_c, plv_c, 1.0, backend)[0]


def _floored_kl(mu, logvar, prior_mu, prior_logvar, free_bits):
    """The KL term of free bits, `sum_j max(free_bits, mean_b KL_bj)` (the inputs already
    checked by the ELBO's own op call), in one op call, `vae_fast::free_bits_kl`
    (csrc/free_bits.cpp): two loops over (B, D), the column sums and then the gradients already
    masked by the floor, and a hand-written backward that only scales them. The term is tiny,
    so what it costs is host overhead per op: as a handful of torch ops it cost more than half
    the fused ELBO's own step at B=64, Z=128 (caches flushed). Its value, dtype and gradients are the reference's."""
    backend = _backend.code(mu)
    if backend is None:
        return reference.free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits)
    lv, lv_c = _param("logvar", logvar, allow_none=False)
    pmu, pmu_c = _param("prior_mu", prior_mu)
    plv, plv_c = _param("prior_logvar", prior_logvar)
    op = torch.ops.vae_fast.free_bits_kl.default
    if isinstance(free_bits, _Tensor):
        return op(mu, lv, pmu, plv, lv_c, pmu_c, plv_c, free_bits, 0.0)
    return op(mu, lv, pmu, plv, lv_c, pmu_c, plv_c, None, free_bits)


def _sampled_nll(recon, target, rlv, kind: int, full: bool, backend: int, red: int = _PER_SAMPLE):
    """(K, B) per-sample NLLs of recon (K, B, ...) against target (B, ...), checked, in one
    fused pass that reads the target for every sample without copying it (the op's
    SAMPLED_NLL api); with red BATCHMEAN, their mean over all K * B rows instead, a 0-d
    tensor whose gradient the pass writes already scaled (its backward then moves no memory,
    where a (K, B) result's per-row gradient costs one more pass over the pixels)."""
    rlv, rlv_c = _param("recon_logvar", rlv)
    if rlv is not None and rlv.dim() == recon.dim():
        rlv = rlv.flatten(0, 1)
    nll = _op(recon.flatten(0, 1), target, rlv, None, None, None, None, None, None, None, _SAMPLED,
              kind, red, full, rlv_c, 0.0, 0.0, 0.0, 1.0, backend)[0]
    return nll.view(recon.shape[0], -1) if red == _PER_SAMPLE else nll


def _sampled_elbo(recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu,
                  prior_logvar, beta, capacity, free_bits, reduction, return_terms):
    """elbo_loss with K samples: the Monte-Carlo ELBO (checks, then two fused passes: the
    pixels of every sample, the KL of every example)."""
    beta, capacity, free_bits, rlv = C.parse_sampled_elbo(
        recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu, prior_logvar, beta,
        capacity, free_bits, reduction)
    backend = _backend.code(recon)
    if backend is None:
        return reference.elbo_loss(recon, target, mu, logvar, likelihood=likelihood,
                                   recon_logvar=recon_logvar, full=full, prior_mu=prior_mu,
                                   prior_logvar=prior_logvar, beta=beta, capacity=capacity,
                                   free_bits=free_bits, reduction=reduction, return_terms=return_terms)
    if reduction == "batchmean":  # mean_b mean_k nll_kb is the mean over all K * B rows
        nll = _sampled_nll(recon, target, rlv, _KINDS[likelihood], full, backend, _BATCHMEAN)
        out = C.sampled_mean_terms(nll, gaussian_kl(mu, logvar, prior_mu, prior_logvar), beta)
    else:
        nll_kb = _sampled_nll(recon, target, rlv, _KINDS[likelihood], full, backend)
        kl_b = gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction="none")
        out = C.sampled_terms(nll_kb, kl_b, beta, reduction)
    out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                         lambda: _floored_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
    return out if return_terms else out.loss


def iwae_loss(recon, target, z, mu, logvar, *, likelihood="bernoulli", recon_logvar=None,
              full=True, reduction="batchmean"):
    """The importance-weighted bound (Burda et al. 2016) over K samples z_kb ~ q(z | x_b):
    `log w_kb = -nll(recon_kb, target_b) + log N(z_kb; 0, I) - log N(z_kb; mu_b, e^logvar_b)`,
    loss per example `-(logsumexp_k log w_kb - log K)`, reduced as `reduction` says.

    recon: (K, B, ...), the decoder's output for each sample (logits, probabilities or means,
    as `likelihood` says); target: (B, ...), read for every sample without being copied;
    z: (K, B, Z); mu: (B, Z); logvar: (B, Z), broadcastable, or a number. The latent terms
    are one op, `vae_fast::iwae_latent` (csrc/iwae_latent.cpp); the pixels, the logsumexp over
    k and the importance weights of the gradient are another, `vae_fast::iwae` (csrc/iwae.cpp)."""
    rlv, logvar = C.parse_iwae(recon, target, z, mu, logvar, likelihood, recon_logvar, full, reduction)
    backend = _backend.code(recon)
    if backend is None:
        return reference.iwae_loss(recon, target, z, mu, logvar, likelihood=likelihood,
                                   recon_logvar=recon_logvar, full=full, reduction=reduction)
    rlv, rlv_c = _param("recon_logvar", rlv)
    lv, lv_c = _param("logvar", logvar, allow_none=False)
    lat = _latent_op(z, mu, lv, lv_c, C.acc_dtype(recon, target, rlv))
    return _iwae_op(recon, target, rlv, lat, _KINDS[likelihood], full, rlv_c,
                    _ELBO_REDUCTIONS[reduction], backend)


def discretized_logistic_mixture_nll(params, target, *, num_bins=256, reduction="batchmean"):
    """`-log p(target | params)` of the discretized mixture of logistics (PixelCNN++, Salimans
    et al. 2017; VDVAE, NVAE), summed over pixels, in one fused pass that reads each pixel's
    parameters once and writes their gradient.

    target: (B, C, *spatial), C = 3 or 1, values in [-1, 1] on the centres of `num_bins` bins
    (8-bit data: x / 127.5 - 1); params: (B, P, *spatial) with P = 10 M for C = 3 (M mixture
    logits, then per colour channel M means, M log-scales, M coefficients: PixelCNN++'s order,
    channel dim 1) or P = 3 M for C = 1 (logits, means, log-scales). Log-scales are floored at
    -7, coefficients go through tanh, green's mean is coupled to red and blue's to red and green,
    edge bins are open-ended, and a bin probability under 1e-5 falls back to the density at the
    bin centre times the bin width (vae_fast.reference.dmol_log_prob is the formula).
    reduction: "batchmean" (sum / B), "sum", "mean" (per dimension of target: nats per dim;
    divide by log(2) for bits per dim), "none" (B,). The target takes no gradient."""
    C.parse_dmol(params, target, num_bins, reduction)
    backend = _backend.code(params)
    if backend is None:
        return reference.discretized_logistic_mixture_nll(params, target, num_bins=num_bins,
                                                          reduction=reduction)
    return _op(params, target, None, None, None, None, None, None, None, None, _DMOL_NLL, _DMOL,
               _VAE_REDUCTIONS[reduction], False, float(num_bins), 0.0, 0.0, 0.0, 1.0, backend)[0]


def _dmol_elbo(recon, target, mu, logvar, prior_mu, prior_logvar, beta, capacity, free_bits,
               reduction, return_terms, num_bins, recon_logvar, full):
    """elbo_loss with the discretized logistic mixture: its pixels and the KL in one op call."""
    beta, logvar, prior_mu, prior_logvar, reduction = C.parse_dmol_elbo(
        recon, target, mu, logvar, prior_mu, prior_logvar, beta, reduction, num_bins,
        recon_logvar, full)
    capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
    backend = _backend.code(recon)
    if backend is None:
        return reference.elbo_loss(recon, target, mu, logvar, likelihood=C.DMOL,
                                   prior_mu=prior_mu, prior_logvar=prior_logvar, beta=beta,
                                   capacity=capacity, free_bits=free_bits, reduction=reduction,
                                   return_terms=return_terms, num_bins=num_bins)
    beta_t, beta_c = _beta(beta)
    lv, lv_c = _param("logvar", logvar, allow_none=False)
    pmu, pmu_c = _param("prior_mu", prior_mu)
    plv, plv_c = _param("prior_logvar", prior_logvar)
    out = ELBOTerms(*_op(recon, target, None, None, None, mu, lv, pmu, plv, beta_t, _ELBO, _DMOL,
                         _ELBO_REDUCTIONS[reduction], False, float(num_bins), lv_c, pmu_c, plv_c,
                         beta_c, backend))
    out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                         lambda: _floored_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
    return out if return_terms else out.loss


def elbo_loss(recon, target, mu, logvar, *, likelihood="bernoulli", recon_logvar=None,
              full=True, prior_mu=None, prior_logvar=None, beta=1.0, capacity=None,
              free_bits=None, reduction="batchmean", return_terms=False, num_bins=256):
    """Negative ELBO `nll(recon, target) + beta * kl(mu, logvar)` in one fused pass.

    likelihood: "bernoulli" (recon are logits), "bernoulli_probs" (recon are probabilities),
    "gaussian" (recon are means; `recon_logvar` None = unit variance, a number, a tensor, or
    "optimal": the sigma-VAE's one variance for the batch, sigma*^2 = mean((target - recon)^2),
    Rybkin et al. 2021; `full=False` drops the constant 0.5*log(2*pi) per pixel, as
    `gaussian_nll` allows),
    "continuous_bernoulli" (recon are logits z of a continuous Bernoulli on [0, 1]: the
    Bernoulli's `softplus(z) - y*z` minus its log-normalizer `log(z / tanh(z/2))`).
    capacity: C of the capacity objective (Burgess et al. 2018), `nll + beta * |kl - C|` on the
    KL as reduced; a number or a 0-d tensor (anneal it under torch.compile without recompiling).
    free_bits: lambda of free bits (Kingma et al. 2016): the KL term becomes
    `sum_j max(lambda, mean_b KL_bj)` (times B with "sum"; "none" raises); that KL term is one
    more op call on the (B, Z) values (vae_fast::free_bits_kl), the pixels stay fused.
    reduction: "batchmean" (sum / batch size, the usual per-example ELBO), "sum", "none" (B,).
    return_terms=True returns ELBOTerms(loss, nll, kl), the KL unweighted (and unfloored).
    recon of shape (K, B, ...) against target (B, ...): the Monte-Carlo ELBO over K samples,
    per example `mean_k nll(recon_kb, target_b) + beta * kl_b`; the target is read for every
    sample without being copied.
    likelihood="discretized_logistic_mixture": recon are the (B, P, *spatial) parameters of
    discretized_logistic_mixture_nll against a (B, C, *spatial) target, `num_bins` bins.
    """
    if likelihood == "discretized_logistic_mixture":
        return _dmol_elbo(recon, target, mu, logvar, prior_mu, prior_logvar, beta, capacity,
                          free_bits, reduction, return_terms, num_bins, recon_logvar, full)
    if num_bins != 256 or type(num_bins) is not int:
        C.check_num_bins(num_bins, likelihood)  # raises
    if C.sample_count(recon, target) is not None:  # K samples: the Monte-Carlo ELBO
        return _sampled_elbo(recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu,
                             prior_logvar, beta, capacity, free_bits, reduction, return_terms)
    if C.is_optimal(recon_logvar, likelihood):  # the per-example terms, then sigma*
        C.check_full(full, likelihood)
        C.check_reduction(reduction, C.ELBO_REDUCTIONS)
        capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
        # reduced: the fused op reduces, a few scalar ops follow; "none" (or an empty batch)
        # needs the per-example terms
        per_example = reduction == "none" or recon.shape[0] == 0
        per = elbo_loss(recon, target, mu, logvar, likelihood="gaussian", full=False,
                        prior_mu=prior_mu, prior_logvar=prior_logvar, beta=beta,
                        reduction="none" if per_example else reduction, return_terms=True)
        pixels = recon[0].numel()
        out = (C.optimal_gaussian_terms(per, pixels, full, beta, reduction) if per_example else
               C.optimal_gaussian_reduced(per, pixels, recon.shape[0], full, beta, reduction))
        out = C.kl_objective(out, beta, capacity, free_bits, reduction, mu.shape[0],
                             lambda: _floored_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
        return out if return_terms else out.loss
    if free_bits is not None or capacity is not None:  # the plain terms, then the KL objective
        capacity, free_bits = C.check_kl_options(capacity, free_bits, reduction)
        terms = elbo_loss(recon, target, mu, logvar, likelihood=likelihood,
                          recon_logvar=recon_logvar, full=full, prior_mu=prior_mu,
                          prior_logvar=prior_logvar, beta=beta, reduction=reduction,
                          return_terms=True)
        out = C.kl_objective(terms, beta, capacity, free_bits, reduction, mu.shape[0],
                             lambda: _floored_kl(mu, logvar, prior_mu, prior_logvar, free_bits))
        return out if return_terms else out.loss
    kind = _KINDS.get(likelihood) if type(likelihood) is str else None
    if kind is None:
        C.check_likelihood(likelihood)  # raises
    red = _reduction(reduction, _ELBO_REDUCTIONS, C.ELBO_REDUCTIONS)
    beta_t, beta_c = _beta(beta)
    backend = _code(_tensor("recon", recon), lambda: C.parse_elbo(
        recon, target, mu, logvar, likelihood, recon_logvar, prior_mu, prior_logvar, beta,
        reduction, return_terms, full))
    if backend is None:
        return reference.elbo_loss(recon, target, mu, logvar, likelihood=likelihood,
                                   recon_logvar=recon_logvar, full=full, prior_mu=prior_mu,
                                   prior_logvar=prior_logvar, beta=beta, reduction=reduction,
                                   return_terms=return_terms)
    if recon_logvar is not None and kind != _GAUSSIAN:
        raise ValueError(f"recon_logvar is only used with likelihood='gaussian', got likelihood={likelihood!r}")
    if full is not True:
        C.check_full(full, likelihood)  # raises unless full is False with a Gaussian
    rlv, rlv_c = _param("recon_logvar", recon_logvar)
    lv, lv_c = _param("logvar", logvar, allow_none=False)
    pmu, pmu_c = _param("prior_mu", prior_mu)
    plv, plv_c = _param("prior_logvar", prior_logvar)
    out = _op(recon, _tensor("target", target), rlv, None, None, _tensor("mu", mu), lv, pmu, plv,
              beta_t, _ELBO, kind, red, full, rlv_c, lv_c, pmu_c, plv_c, beta_c, backend)
    return ELBOTerms(*out) if return_terms else out[0]


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Drop-in for `torch.nn.functional.binary_cross_entropy_with_logits` (same arguments and
    reductions, "none" elementwise); the result is float32 for 16-bit inputs."""
    red = _reduction(reduction, _TORCH_REDUCTIONS, C.TORCH_REDUCTIONS)
    backend = _code(_tensor("input", input), lambda: C.parse_bce(
        input, target, weight, reduction, pos_weight, logits=True))
    if backend is None:
        return reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    w, pw = _weight("weight", weight), _weight("pos_weight", pos_weight)
    return _op(input, _tensor("target", target), None, w, pw, None, None, None, None, None,
               _BCE_LOGITS, _BERNOULLI, red, False, 0.0, 0.0, 0.0, 0.0, 1.0, backend)[0]


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """Drop-in for `torch.nn.functional.binary_cross_entropy` (log clamped at -100, backward
    `(x-y)/max(x(1-x), 1e-12)`); also runs under autocast. Inputs outside [0, 1] give NaN
    instead of torch's error (checking would cost a host sync)."""
    red = _reduction(reduction, _TORCH_REDUCTIONS, C.TORCH_REDUCTIONS)
    backend = _code(_tensor("input", input), lambda: C.parse_bce(
        input, target, weight, reduction, None, logits=False))
    if backend is None:
        return reference.binary_cross_entropy(input, target, weight, reduction)
    w = _weight("weight", weight)
    return _op(input, _tensor("target", target), None, w, None, None, None, None, None, None,
               _BCE, _PROBS, red, False, 0.0, 0.0, 0.0, 0.0, 1.0, backend)[0]
