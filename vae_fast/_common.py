"""One place for what every loss shares: argument checking, reductions and the dtype policy.

Both the fused path (`vae_fast.functional`) and the reference twin (`vae_fast.reference`) call
these, so a bad argument raises the same error, with the same words, whichever path runs.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch

VAE_REDUCTIONS = ("batchmean", "sum", "mean", "none")
ELBO_REDUCTIONS = ("batchmean", "sum", "none")
TORCH_REDUCTIONS = ("mean", "sum", "none")
LIKELIHOODS = ("bernoulli", "bernoulli_probs", "gaussian", "continuous_bernoulli",
               "discretized_logistic_mixture")
DMOL = "discretized_logistic_mixture"

ParamLike = Union[None, float, torch.Tensor]


class ELBOTerms(NamedTuple):
    """`elbo_loss(..., return_terms=True)`: the loss and its two terms, reduced the same way.

    `kl` is unweighted: `loss = nll + beta * kl`.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor


def check_reduction(reduction, allowed=VAE_REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def check_likelihood(likelihood) -> str:
    if not isinstance(likelihood, str) or likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def check_beta(beta):
    """A non-negative Python number, or a 0-d floating tensor (for KL annealing under
    torch.compile: a changing Python float recompiles the graph, a tensor does not; its sign is
    not checked, which would cost a host sync)."""
    if isinstance(beta, torch.Tensor):
        if not beta.is_floating_point() or beta.dim() != 0:
            raise TypeError(f"beta must be a number or a 0-d floating tensor, got a tensor of dtype "
                            f"{beta.dtype} and shape {tuple(beta.shape)}")
        return beta
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real Python number or a 0-d tensor, got {type(beta).__name__}")
    beta = _float("beta", beta)
    if not beta >= 0.0:  # also rejects nan
        raise ValueError(f"beta must be a non-negative number, got {beta}")
    return beta


def check_main(name: str, t, *, allow_bool: bool = False, allow_scalar: bool = False) -> torch.Tensor:
    """A tensor that defines the shape of its term: floating (or bool), with a batch dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or (allow_bool and t.dtype == torch.bool)):
        kinds = "a floating point or bool" if allow_bool else "a floating point"
        raise TypeError(f"{name} must be {kinds} tensor, got dtype {t.dtype}")
    if t.dim() == 0 and not allow_scalar:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor (shape {tuple(t.shape)})")
    return t


def check_same_shape(name: str, t, partner_name: str, partner: torch.Tensor, *, allow_bool=False):
    check_main(name, t, allow_bool=allow_bool, allow_scalar=partner.dim() == 0)
    if t.shape != partner.shape:
        raise ValueError(
            f"{name} must have the shape of {partner_name}: got {name} {tuple(t.shape)} "
            f"and {partner_name} {tuple(partner.shape)}"
        )
    return t


def check_param(name: str, p: ParamLike, partner_name: str, partner: torch.Tensor,
                *, allow_none: bool = True) -> ParamLike:
    """A parameter (log-variance, prior, weight): a Python number, or a floating tensor that
    broadcasts to its partner's shape without enlarging it."""
    if p is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a tensor or a number, got None")
    if isinstance(p, torch.Tensor):
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {p.dtype}")
        ok = p.dim() <= partner.dim() and all(
            n == 1 or n == m for n, m in zip(reversed(p.shape), reversed(partner.shape)))
        if not ok:
            raise ValueError(
                f"{name} of shape {tuple(p.shape)} does not broadcast to the shape of "
                f"{partner_name} {tuple(partner.shape)}"
            )
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(p).__name__}")
    return _float(name, p)


def _float(name: str, v) -> float:
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {v}") from None


def check_batch(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"batch size of {a_name} {tuple(a.shape)} differs from that of {b_name} {tuple(b.shape)}"
        )


def check_devices(**named) -> torch.device:
    devices = {n: t.device for n, t in named.items() if isinstance(t, torch.Tensor)}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return unique.pop()


def acc_dtype(*tensors) -> torch.dtype:
    """Sums accumulate (and reduced losses come back) in float64 when any input is float64,
    else in float32: 16-bit inputs are read as they are and summed in float32."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def reduce_terms(per_elem: torch.Tensor, reduction: str) -> torch.Tensor:
    """`"none"` = one value per sample (sum over every dimension but the first)."""
    if reduction == "none":
        return per_elem.flatten(1).sum(1) if per_elem.dim() > 1 else per_elem
    total = per_elem.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_elem.shape[0]
    return total / per_elem.numel()  # "mean": 0/0 = nan for empty input, as torch


class Problem(NamedTuple):
    """A checked call, in the one form that every backend computes.

    Reconstruction term over (x, y) with parameters rlv (Gaussian log-variance), w (weight),
    pw (pos_weight); KL term over mu with parameters lv, pmu, plv. `reduction` is one of
    VAE_REDUCTIONS or "elementwise" (the drop-in BCE's "none"). `loss = nll + beta * kl`.
    """

    kind: str  # "none" or one of LIKELIHOODS
    x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    rlv: ParamLike
    w: Optional[torch.Tensor]
    pw: Optional[torch.Tensor]
    full: bool
    mu: Optional[torch.Tensor]
    lv: ParamLike
    pmu: ParamLike
    plv: ParamLike
    beta: Union[float, torch.Tensor]
    reduction: str
    return_terms: bool = False


_NO_KL = dict(mu=None, lv=None, pmu=None, plv=None, beta=1.0)
_NO_RECON = dict(x=None, y=None, rlv=None, w=None, pw=None, full=False)


def _finish(p: Problem, **names) -> Problem:
    """Last check, on devices; `names` maps Problem fields to the caller's argument names."""
    fields = ("x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv", "beta")
    check_devices(**{names.get(f, f): getattr(p, f) for f in fields})
    return p


def parse_bernoulli_nll(logits, target, reduction, *, probs=False) -> Problem:
    check_main("logits" if not probs else "input", logits)
    check_same_shape("target", target, "logits", logits, allow_bool=True)
    kind = "bernoulli_probs" if probs else "bernoulli"
    return _finish(Problem(kind, logits, target, None, None, None, False, **_NO_KL,
                           reduction=check_reduction(reduction)), x="logits", y="target")


def parse_gaussian_nll(mean, target, logvar, full, reduction) -> Problem:
    check_main("mean", mean)
    check_same_shape("target", target, "mean", mean)
    logvar = check_param("logvar", logvar, "mean", mean, allow_none=False)
    return _finish(Problem("gaussian", mean, target, logvar, None, None, bool(full), **_NO_KL,
                           reduction=check_reduction(reduction)), x="mean", y="target", rlv="logvar")


def parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction) -> Problem:
    check_main("mu", mu)
    logvar = check_param("logvar", logvar, "mu", mu, allow_none=False)
    prior_mu = check_param("prior_mu", prior_mu, "mu", mu)
    prior_logvar = check_param("prior_logvar", prior_logvar, "mu", mu)
    return _finish(Problem("none", **_NO_RECON, mu=mu, lv=logvar, pmu=prior_mu, plv=prior_logvar,
                           beta=1.0, reduction=check_reduction(reduction)),
                   lv="logvar", pmu="prior_mu", plv="prior_logvar")


def check_capacity(capacity):
    """`capacity` C of the capacity objective (Burgess et al. 2018): a non-negative Python
    number, or a 0-d floating tensor (annealed under torch.compile without recompiling; its
    value is not checked, which would cost a host sync)."""
    if isinstance(capacity, torch.Tensor):
        if not capacity.is_floating_point() or capacity.dim() != 0:
            raise TypeError(f"capacity must be a number or a 0-d floating tensor, got a tensor of "
                            f"dtype {capacity.dtype} and shape {tuple(capacity.shape)}")
        return capacity
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real):
        raise TypeError(f"capacity must be a real Python number or a 0-d tensor, got {type(capacity).__name__}")
    capacity = _float("capacity", capacity)
    if not capacity >= 0.0:  # also rejects nan
        raise ValueError(f"capacity must be a non-negative number, got {capacity}")
    return capacity


def check_kl_options(capacity, free_bits, reduction):
    """(capacity, free_bits), checked: at most one of them, as check_capacity and
    check_free_bits say."""
    if free_bits is not None:
        return None, check_free_bits(free_bits, reduction, capacity)
    return (None if capacity is None else check_capacity(capacity)), None


def check_free_bits(free_bits, reduction, capacity):
    """`free_bits` lambda (Kingma et al. 2016): a non-negative number or a 0-d floating tensor,
    with "batchmean" or "sum" and without `capacity`."""
    if capacity is not None:
        raise ValueError("free_bits and capacity are two different KL objectives; give one of them")
    if reduction == "none":
        raise ValueError("free_bits needs reduction='batchmean' or 'sum', got 'none': the floor is "
                         "on each latent dimension's KL averaged over the batch, so there is no "
                         "per-example loss")
    if isinstance(free_bits, torch.Tensor):
        if not free_bits.is_floating_point() or free_bits.dim() != 0:
            raise TypeError(f"free_bits must be a number or a 0-d floating tensor, got a tensor of "
                            f"dtype {free_bits.dtype} and shape {tuple(free_bits.shape)}")
        return free_bits
    if isinstance(free_bits, bool) or not isinstance(free_bits, numbers.Real):
        raise TypeError(f"free_bits must be a real Python number or a 0-d tensor, got {type(free_bits).__name__}")
    free_bits = _float("free_bits", free_bits)
    if not free_bits >= 0.0:
        raise ValueError(f"free_bits must be a non-negative number, got {free_bits}")
    return free_bits


def kl_objective(terms: ELBOTerms, beta, capacity, free_bits, reduction, batch: int,
                 floored_kl) -> ELBOTerms:
    """The loss of a KL objective from the plain terms; the terms keep the KL itself.
    capacity C: nll + beta * |kl - C| on the KL as reduced (per example for "none", the batch
    mean for "batchmean", the sum for "sum"); the gradient reaches the fused buffers through the
    terms, d/d(kl) = beta * sign(kl - C).
    free bits: nll + beta * floored_kl() (times B with "sum"), floored_kl() being
    sum_j max(lambda, mean_b KL_bj). Neither: the terms as they are."""
    if free_bits is None and capacity is None:
        return terms
    # a number beta (and the batch factor of "sum") rides on the add as its alpha: one op and
    # one backward node fewer per factor, which is what these tiny terms cost (host time)
    if free_bits is None:
        kl_term = (terms.kl - capacity).abs()
        weight = beta
    else:
        kl_term = floored_kl()
        weight = beta * batch if reduction == "sum" else beta
    if isinstance(weight, torch.Tensor):
        return ELBOTerms(terms.nll + weight * kl_term, terms.nll, terms.kl)
    return ELBOTerms(torch.add(terms.nll, kl_term, alpha=weight), terms.nll, terms.kl)


def is_optimal(recon_logvar, likelihood) -> bool:
    """Is `recon_logvar` the sigma-VAE's "optimal"? Any other string raises, as does "optimal"
    with a likelihood other than the Gaussian."""
    if not isinstance(recon_logvar, str):
        return False
    if recon_logvar != "optimal":
        raise ValueError(f"recon_logvar must be None, a number, a tensor or 'optimal', got {recon_logvar!r}")
    if likelihood != "gaussian":
        raise ValueError(f"recon_logvar='optimal' is the Gaussian decoder's shared variance; it is "
                         f"only used with likelihood='gaussian', got likelihood={likelihood!r}")
    return True


def optimal_gaussian_terms(per: ELBOTerms, pixels: int, full: bool, beta, reduction) -> ELBOTerms:
    """The sigma-VAE calibrated decoder (Rybkin et al. 2021) from the per-example terms of the
    unit-variance Gaussian ELBO without its constant (per.nll = 0.5 * S_b, S_b = sum of squared
    errors of example b): one variance for the batch, sigma*^2 = sum_b S_b / (B * pixels), and
    nll_b = 0.5 * (pixels * log sigma*^2 + S_b / sigma*^2) (+ pixels * 0.5 log 2 pi when full),
    whose sum is (N/2)(log sigma*^2 + 1 [+ log 2 pi]). sigma* is not detached: autograd carries
    its terms, which cancel for a uniform grad_output but not for a per-example one."""
    sse = 2.0 * per.nll
    var = sse.sum() / (sse.shape[0] * pixels)
    nll = 0.5 * (pixels * torch.log(var) + sse / var)
    if full:
        nll = nll + pixels * 0.9189385332046727  # 0.5 * log(2 * pi)
    nll, kl = reduce_terms(nll, reduction), reduce_terms(per.kl, reduction)
    return ELBOTerms(nll + beta * kl, nll, kl)


def optimal_gaussian_reduced(red: ELBOTerms, pixels: int, batch: int, full: bool, beta,
                             reduction) -> ELBOTerms:
    """optimal_gaussian_terms for "sum" and "batchmean", from the reduced terms of the
    unit-variance Gaussian ELBO without its constant (red.nll = 0.5 * sum_b S_b, or that / B):
    the summed NLL is (N/2)(log sigma*^2 + 1 [+ log 2 pi]), N = B * pixels, a function of
    sum_b S_b alone, so autograd through these few scalar ops is exact for any grad_output, and
    the fused op's gradient needs one scale, not one per example."""
    count = pixels if reduction == "batchmean" else batch * pixels  # elements per value: N / B or N
    var = (2.0 * red.nll) / count
    nll = (0.5 * count) * (torch.log(var) + (2.8378770664093453 if full else 1.0))
    return ELBOTerms(nll + beta * red.kl, nll, red.kl)  # 1 + log(2 pi) above when full


def sample_count(recon, target):
    """K when `recon` carries a leading sample dimension over `target`, (K, B, ...) against
    (B, ...): the Monte-Carlo ELBO and IWAE. None otherwise (the plain call checks the rest)."""
    if isinstance(recon, torch.Tensor) and isinstance(target, torch.Tensor) and target.dim() >= 1 \
            and recon.dim() == target.dim() + 1:
        return recon.shape[0]
    return None


def check_samples(recon, target, mu, likelihood, recon_logvar):
    """The checks of a call with K samples: recon (K, B, ...), target (B, ...), mu (B, Z);
    recon_logvar None, a number, or a tensor of recon's shape or one that broadcasts to a
    single sample's. Returns recon_logvar as the kernels take it (None = unit variance)."""
    likelihood = check_likelihood(likelihood)
    if likelihood == DMOL:
        raise ValueError(f"likelihood={DMOL!r} takes no sample dimension (recon (K, B, ...)): "
                         f"call it once per sample")
    check_main("recon", recon)
    check_main("target", target, allow_bool=likelihood != "gaussian")
    if recon.shape[1:] != target.shape:
        raise ValueError(f"target must have the shape of each sample of recon: got target "
                         f"{tuple(target.shape)} and recon (samples, ...) {tuple(recon.shape)}")
    if recon.shape[0] == 0:
        raise ValueError(f"recon has a sample dimension of size 0 (shape {tuple(recon.shape)}); "
                         f"it needs at least one sample")
    check_main("mu", mu)
    check_batch("target", target, "mu", mu)
    if isinstance(recon_logvar, str):
        raise ValueError("recon_logvar='optimal' takes no sample dimension: give recon as (B, ...)")
    if likelihood != "gaussian":
        if recon_logvar is not None:
            raise ValueError(f"recon_logvar is only used with likelihood='gaussian', got likelihood={likelihood!r}")
        return None
    rlv = check_param("recon_logvar", recon_logvar, "recon", recon)
    if isinstance(rlv, torch.Tensor) and rlv.shape != recon.shape and rlv.dim() >= target.dim() \
            and any(n != 1 for n in rlv.shape[:rlv.dim() - target.dim() + 1]):
        raise ValueError(f"recon_logvar of shape {tuple(rlv.shape)} with a sample or batch "
                         f"dimension must have recon's shape {tuple(recon.shape)}")
    return rlv


def parse_sampled_elbo(recon, target, mu, logvar, likelihood, recon_logvar, full, prior_mu,
                       prior_logvar, beta, capacity, free_bits, reduction):
    """The checks of elbo_loss with K samples (both paths); returns (beta, capacity,
    free_bits, recon_logvar) as checked."""
    check_reduction(reduction, ELBO_REDUCTIONS)
    beta = check_beta(beta)
    capacity, free_bits = check_kl_options(capacity, free_bits, reduction)
    rlv = check_samples(recon, target, mu, likelihood, recon_logvar)
    check_full(full, likelihood)
    parse_gaussian_kl(mu, logvar, prior_mu, prior_logvar, "none")
    check_devices(recon=recon, target=target, recon_logvar=rlv, mu=mu, logvar=logvar,
                  prior_mu=prior_mu, prior_logvar=prior_logvar)
    return beta, capacity, free_bits, rlv


def sampled_terms(nll_kb: torch.Tensor, kl_b: torch.Tensor, beta, reduction) -> ELBOTerms:
    """The Monte-Carlo ELBO over K samples: per example, mean_k nll_kb + beta * KL_b, in the
    wider of the two terms' dtypes."""
    dt = torch.promote_types(nll_kb.dtype, kl_b.dtype)
    nll_kb, kl_b = nll_kb.to(dt), kl_b.to(dt)
    nll, kl = reduce_terms(nll_kb.mean(0), reduction), reduce_terms(kl_b, reduction)
    return ELBOTerms(nll + beta * kl, nll, kl)


def sampled_mean_terms(nll: torch.Tensor, kl: torch.Tensor, beta) -> ELBOTerms:
    """The Monte-Carlo ELBO with "batchmean" from its two means (over the K * B rows of the
    NLL, over the B examples of the KL), in the wider of their dtypes."""
    dt = torch.promote_types(nll.dtype, kl.dtype)
    nll, kl = nll.to(dt), kl.to(dt)
    return ELBOTerms(nll + beta * kl, nll, kl)


def parse_iwae(recon, target, z, mu, logvar, likelihood, recon_logvar, full, reduction):
    """The checks of iwae_loss (both paths); returns (recon_logvar, logvar) as checked."""
    check_reduction(reduction, ELBO_REDUCTIONS)
    check_main("recon", recon)
    check_main("target", target, allow_bool=True)
    if sample_count(recon, target) is None:
        raise ValueError(f"recon must be (samples, batch, ...) over target (batch, ...): got recon "
                         f"{tuple(recon.shape)} and target {tuple(target.shape)}")
    rlv = check_samples(recon, target, mu, likelihood, recon_logvar)
    check_full(full, likelihood)
    check_main("z", z)
    if mu.dim() != 2 or z.dim() != 3 or z.shape != (recon.shape[0], *mu.shape):
        raise ValueError(f"z must have shape (samples, batch, latent) = ({recon.shape[0]}, "
                         f"*mu.shape) with mu (batch, latent): got z {tuple(z.shape)} and mu "
                         f"{tuple(mu.shape)}")
    logvar = check_param("logvar", logvar, "mu", mu, allow_none=False)
    check_devices(recon=recon, target=target, recon_logvar=rlv, z=z, mu=mu, logvar=logvar)
    return rlv, logvar


def iwae_latent(z, mu, logvar, dtype) -> torch.Tensor:
    """The latent terms of IWAE's log w_kb (Burda et al. 2016), log N(z_kb; 0, I) -
    log N(z_kb; mu_b, e^logvar_b) summed over Z, (K, B) in `dtype`; their 0.5 log 2 pi cancel."""
    z, mu = z.to(dtype), mu.to(dtype)
    lv = logvar.to(dtype) if isinstance(logvar, torch.Tensor) else torch.tensor(logvar, dtype=dtype, device=z.device)
    return -0.5 * (z * z - lv - (z - mu) ** 2 * torch.exp(-lv)).sum(-1)


def check_full(full, likelihood) -> bool:
    """`full` (keep the Gaussian's 0.5*log(2*pi) per pixel): a bool, and False only where
    there is that constant to drop."""
    if type(full) is not bool:
        raise TypeError(f"full must be a bool, got {type(full).__name__}")
    if not full and likelihood != "gaussian":
        raise ValueError(f"full=False drops the Gaussian's 0.5*log(2*pi) constant; it is only "
                         f"used with likelihood='gaussian', got likelihood={likelihood!r}")
    return full


def parse_elbo(recon, target, mu, logvar, likelihood, recon_logvar, prior_mu, prior_logvar,
               beta, reduction, return_terms, full=True) -> Problem:
    likelihood = check_likelihood(likelihood)
    reduction = check_reduction(reduction, ELBO_REDUCTIONS)
    beta = check_beta(beta)
    check_main("recon", recon)
    check_same_shape("target", target, "recon", recon, allow_bool=likelihood != "gaussian")
    check_main("mu", mu)
    check_batch("recon", recon, "mu", mu)
    logvar = check_param("logvar", logvar, "mu", mu, allow_none=False)
    prior_mu = check_param("prior_mu", prior_mu, "mu", mu)
    prior_logvar = check_param("prior_logvar", prior_logvar, "mu", mu)
    if likelihood == "gaussian":
        recon_logvar = check_param("recon_logvar", recon_logvar, "recon", recon)
        recon_logvar = 0.0 if recon_logvar is None else recon_logvar
    elif recon_logvar is not None:
        raise ValueError(f"recon_logvar is only used with likelihood='gaussian', got likelihood={likelihood!r}")
    full = check_full(full, likelihood)
    return _finish(Problem(likelihood, recon, target, recon_logvar, None, None, full, mu, logvar,
                           prior_mu, prior_logvar, beta, reduction, bool(return_terms)),
                   x="recon", y="target", rlv="recon_logvar", lv="logvar", pmu="prior_mu",
                   plv="prior_logvar")


def parse_bce(input, target, weight, reduction, pos_weight, *, logits: bool) -> Problem:
    check_main("input", input, allow_scalar=True)  # torch's BCE takes 0-d tensors
    check_same_shape("target", target, "input", input, allow_bool=True)
    weight = check_param("weight", weight, "input", input)
    if isinstance(weight, float):
        raise TypeError("weight must be a tensor or None, got float")
    if pos_weight is not None:
        if not logits:
            raise TypeError("pos_weight is only accepted by binary_cross_entropy_with_logits")
        pos_weight = check_param("pos_weight", pos_weight, "input", input)
        if isinstance(pos_weight, float):
            raise TypeError("pos_weight must be a tensor or None, got float")
    reduction = check_reduction(reduction, TORCH_REDUCTIONS)
    kind = "bernoulli" if logits else "bernoulli_probs"
    return _finish(Problem(kind, input, target, None, weight, pos_weight, False, **_NO_KL,
                           reduction="elementwise" if reduction == "none" else reduction),
                   x="input", y="target", w="weight", pw="pos_weight")


def parse_mixture_prior_kl(z, mu, logvar, prior_mu, prior_logvar, prior_logits, reduction):
    """The checks of mixture_prior_kl (both paths); returns (logvar, prior_logvar, reduction)."""
    reduction = check_reduction(reduction, ELBO_REDUCTIONS)
    check_main("z", z)
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (batch, latent), got shape {tuple(z.shape)}")
    check_same_shape("mu", mu, "z", z)
    logvar = check_param("logvar", logvar, "z", z, allow_none=False)
    check_main("prior_mu", prior_mu, allow_scalar=True)
    if prior_mu.dim() != 2 or prior_mu.shape[0] == 0 or prior_mu.shape[1] != z.shape[1]:
        raise ValueError(f"prior_mu must have shape (K, Z) with K >= 1 components and the latent "
                         f"size of z, Z = {z.shape[1]}: got prior_mu {tuple(prior_mu.shape)} "
                         f"and z {tuple(z.shape)}")
    prior_logvar = check_param("prior_logvar", prior_logvar, "prior_mu", prior_mu, allow_none=False)
    if prior_logits is not None:
        if not isinstance(prior_logits, torch.Tensor):
            raise TypeError(f"prior_logits must be a torch.Tensor or None, got "
                            f"{type(prior_logits).__name__}")
        if not prior_logits.is_floating_point():
            raise TypeError(f"prior_logits must be a floating point tensor, got dtype {prior_logits.dtype}")
        if prior_logits.shape != prior_mu.shape[:1]:
            raise ValueError(f"prior_logits must have shape (K,) = ({prior_mu.shape[0]},), one per "
                             f"component of prior_mu {tuple(prior_mu.shape)}: got {tuple(prior_logits.shape)}")
    check_devices(z=z, mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                  prior_logits=prior_logits)
    return logvar, prior_logvar, reduction


def check_num_bins(num_bins, likelihood=DMOL) -> int:
    """The number of bins K of the discretized logistic mixture: an int >= 2 (256 for 8-bit
    data); any other value with another likelihood is an error, not ignored."""
    if likelihood != DMOL:
        if num_bins == 256 and type(num_bins) is int:
            return num_bins
        raise ValueError(f"num_bins is only used with likelihood={DMOL!r}, got likelihood={likelihood!r}")
    if type(num_bins) is not int:
        raise TypeError(f"num_bins must be an int, got {type(num_bins).__name__}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}")
    return num_bins


def dmol_mixtures(params_name: str, params: torch.Tensor, target: torch.Tensor) -> int:
    """Checks (params, target) of the discretized logistic mixture, PyTorch layout (channel
    dim 1): params (B, P, *spatial), target (B, C, *spatial) with C = 3 and P = 10 M, or C = 1
    and P = 3 M; returns M. The target takes no gradient (the data are discrete)."""
    check_main(params_name, params)
    check_main("target", target)
    if params.dim() < 2:
        raise ValueError(f"{params_name} must have shape (B, P, *spatial), got {tuple(params.shape)}")
    if (target.dim() != params.dim() or target.shape[0] != params.shape[0]
            or target.shape[2:] != params.shape[2:]):
        raise ValueError(f"target must have the shape of {params_name} but for the channel "
                         f"dimension (dim 1): got target {tuple(target.shape)} and "
                         f"{params_name} {tuple(params.shape)}")
    c, p = target.shape[1], params.shape[1]
    if c not in (1, 3):
        raise ValueError(f"target must have 1 or 3 channels (dim 1), got {c}")
    per = 10 if c == 3 else 3
    if p == 0 or p % per:
        what = ("M logits, then per colour channel M means, M log-scales, M coefficients"
                if c == 3 else "M logits, M means, M log-scales")
        raise ValueError(f"{params_name} must have {per} * M channels (dim 1) for a {c}-channel "
                         f"target ({what}), got {p}")
    if target.requires_grad:
        raise ValueError("target takes no gradient in the discretized logistic mixture (the "
                         "data are discrete): detach it")
    return p // per


def parse_dmol(params, target, num_bins, reduction) -> int:
    """The checks of discretized_logistic_mixture_nll (both paths); returns M."""
    reduction = check_reduction(reduction)
    num_bins = check_num_bins(num_bins)
    m = dmol_mixtures("params", params, target)
    check_devices(params=params, target=target)
    return m


def parse_dmol_elbo(recon, target, mu, logvar, prior_mu, prior_logvar, beta, reduction, num_bins,
                    recon_logvar, full):
    """The checks of elbo_loss with likelihood='discretized_logistic_mixture'."""
    reduction = check_reduction(reduction, ELBO_REDUCTIONS)
    beta = check_beta(beta)
    check_num_bins(num_bins)
    if recon_logvar is not None:
        raise ValueError(f"recon_logvar is only used with likelihood='gaussian', got likelihood={DMOL!r}")
    check_full(full, DMOL)
    dmol_mixtures("recon", recon, target)
    check_main("mu", mu)
    check_batch("recon", recon, "mu", mu)
    logvar = check_param("logvar", logvar, "mu", mu, allow_none=False)
    prior_mu = check_param("prior_mu", prior_mu, "mu", mu)
    prior_logvar = check_param("prior_logvar", prior_logvar, "mu", mu)
    check_devices(recon=recon, target=target, mu=mu, logvar=logvar, prior_mu=prior_mu,
                  prior_logvar=prior_logvar, beta=beta)
    return beta, logvar, prior_mu, prior_logvar, reduction


def dmol_reduce(per_example: torch.Tensor, reduction: str, dims: int) -> torch.Tensor:
    """(B,) sums of -log p per example, reduced: "mean" divides by the target's element
    count `dims` (nats per dimension; / log 2 for bits per dimension)."""
    if reduction == "none":
        return per_example
    total = per_example.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_example.shape[0]
    return total / dims
