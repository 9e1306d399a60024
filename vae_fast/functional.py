"""The public losses. Each checks its arguments (vae_fast._common), then runs on the backend
that `vae_fast._backend.resolve` picks: the fused op (vae_fast.ops) or the reference twin.

Eager CPU calls of the common case take a shortcut first (`_fast`): one C++ call that checks,
allocates, runs the same fused kernel and attaches a C++ autograd node, with no Python
`autograd.Function` on the way in or out (csrc/eager.cpp). Anything it does not cover, bad
arguments included, goes the general way."""
from __future__ import annotations

import os

import torch

from . import _backend, _common as C, _cpu, ops, reference
from ._common import ELBOTerms, Problem

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_functorch_active = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._get_tracing_state  # a pybind call is invisible to torch.jit.trace
_dispatch_modes = torch._C._len_torch_dispatch_stack  # ... and to make_fx / any other mode
_function_modes = torch._C._len_torch_function_stack
_KINDS = {"bernoulli": 1, "bernoulli_probs": 2, "gaussian": 3}
_REDUCTIONS = {"sum": 0, "batchmean": 1, "mean": 2, "none": 3}
_ELBO_REDUCTIONS = {"sum": 0, "batchmean": 1, "none": 3}
_TORCH_REDUCTIONS = {"sum": 0, "mean": 2}  # the drop-in BCE's "none" is elementwise: general


def _fast(kind, x, y, rlv, mu, lv, pmu, plv, full, reduction, reductions, beta):
    """[loss, nll, kl] from the C++ eager path, or None: not its case, take the general path.

    Its case: nothing that must see the ops (torch.compile, torch.jit.trace, make_fx or any
    other dispatch or torch-function mode), backend "auto" or "cpu" with the extension loaded,
    plain tensors (no subclass), parameters that are tensors, floats or None, a valid
    reduction, a non-negative real beta; csrc/eager.cpp checks the tensors themselves (dtypes,
    shapes, layout, device)."""
    if torch.compiler.is_compiling():
        return None
    op = _cpu.eager_op
    if (op is None or type(reduction) is not str or _functorch_active() or _jit_tracing()
            or _dispatch_modes() or _function_modes()):
        return None
    red = reductions.get(reduction)
    backend = _backend._stack[-1] if _backend._stack else os.environ.get(_backend.ENV) or "auto"
    if red is None or (backend != "auto" and backend != "cpu"):
        return None
    tb = type(beta)
    if not ((tb is float and beta >= 0.0) or (tb is int and 0 <= beta <= 1 << 53)):
        return None
    for t in (x, y, mu, lv):
        if t is not None and type(t) is not _Tensor and type(t) is not _Parameter:
            return None
    consts = [0.0, 0.0, 0.0]
    params = [rlv, pmu, plv]
    for i in range(3):
        p = params[i]
        tp = type(p)
        if tp is float:
            consts[i], params[i] = p, None
        elif p is not None and tp is not _Tensor and tp is not _Parameter:
            return None
    out = op(x, y, params[0], mu, lv, params[1], params[2], kind, full, red, float(beta), *consts)
    return out or None


def _tensor_or_none(p):
    return p if isinstance(p, torch.Tensor) else None


def _const(p, default=0.0) -> float:
    return p if isinstance(p, float) else default


def compute(p: Problem):
    main = p.x if p.x is not None else p.mu
    backend = _backend.resolve(main.device)
    if backend == "reference":
        return reference.compute(p)
    if _jit_tracing():
        raise RuntimeError(
            "vae_fast: torch.jit.trace cannot record the fused kernels; use torch.compile or "
            "torch.export, or trace inside vae_fast.use_backend('reference')")
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
    out = _fast(1, logits, target, None, None, None, None, None, False, reduction, _REDUCTIONS, 1.0)
    if out is not None:
        return out[0]
    return compute(C.parse_bernoulli_nll(logits, target, reduction))


def gaussian_nll(mean, target, logvar=0.0, *, full=True, reduction="batchmean"):
    """Gaussian negative log-likelihood with log-variance `s` (a number, or a tensor that
    broadcasts to `mean`): `0.5*(s + (y-m)^2*exp(-s))` (+ `0.5*log(2*pi)` when `full`)."""
    if logvar is not None and type(full) is bool:
        out = _fast(3, mean, target, logvar, None, None, None, None, full, reduction, _REDUCTIONS, 1.0)
        if out is not None:
            return out[0]
    return compute(C.parse_gaussian_nll(mean, target, logvar, full, reduction))


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, reduction="batchmean"):
    """`KL(N(mu, e^s) || N(mu_p, e^s_p)) = 0.5*(expm1(s-s_p) - (s-s_p) + (mu-mu_p)^2*exp(-s_p))`,
    prior None = N(0, I); prior tensors may broadcast (a learned per-feature `(Z,)` prior)."""
    if logvar is not None:
        out = _fast(0, None, None, None, mu, logvar, prior_mu, prior_logvar, False, reduction,
                    _REDUCTIONS, 1.0)
        if out is not None:
            return out[0]
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
    kind = _KINDS.get(likelihood) if type(likelihood) is str else None
    if kind is not None and (kind == 3 or recon_logvar is None) and logvar is not None:
        out = _fast(kind, recon, target, recon_logvar, mu, logvar, prior_mu, prior_logvar, True,
                    reduction, _ELBO_REDUCTIONS, beta)
        if out is not None:
            return ELBOTerms(*out) if return_terms else out[0]
    return compute(C.parse_elbo(recon, target, mu, logvar, likelihood, recon_logvar, prior_mu,
                                prior_logvar, beta, reduction, return_terms))


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Drop-in for `torch.nn.functional.binary_cross_entropy_with_logits` (same arguments and
    reductions, "none" elementwise); the result is float32 for 16-bit inputs."""
    if weight is None and pos_weight is None:
        out = _fast(1, input, target, None, None, None, None, None, False, reduction,
                    _TORCH_REDUCTIONS, 1.0)
        if out is not None:
            return out[0]
    return compute(C.parse_bce(input, target, weight, reduction, pos_weight, logits=True))


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """Drop-in for `torch.nn.functional.binary_cross_entropy` (log clamped at -100, backward
    `(x-y)/max(x(1-x), 1e-12)`); also runs under autocast. Inputs outside [0, 1] give NaN
    instead of torch's error (checking would cost a host sync)."""
    if weight is None:
        out = _fast(2, input, target, None, None, None, None, None, False, reduction,
                    _TORCH_REDUCTIONS, 1.0)
        if out is not None:
            return out[0]
    return compute(C.parse_bce(input, target, weight, reduction, None, logits=False))
