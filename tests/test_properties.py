"""Property-based tests: every public loss, on every available backend, against the reference.

Hypothesis draws a call (function, shapes 0-D/1-D to 5-D with primes and batch 1, dtypes
including mixed ones and bool targets, reductions, likelihoods, parameters as numbers / full
tensors / broadcast tensors, memory layouts, special values) and a way to differentiate it.
The truth is `vae_fast.reference` evaluated in float64 on the *same rounded inputs*; each
backend's loss and gradients must match it within a tolerance that depends on the dtype:

- losses (float32 for 16-bit inputs, float64 when any input is float64) to `RTOL_ACC` of the
  sum of the absolute per-element terms (a sum with cancellation cannot do better);
- gradients (each in its input's dtype) to `RTOL_GRAD[dtype]` of their value (the rounding of
  16-bit results) plus `RTOL_ACC` times an error floor: the magnitudes of the addends of that
  element's formula (e.g. `1 + |y|` for `sigmoid(z) - y`) times |d objective / d term|,
  summed over the elements a broadcast parameter covers; plus the dtype's smallest normal.
  A 16-bit gradient that overflows must be inf where the float64 truth rounds to inf; NaN
  must appear exactly where the truth has NaN.
- "reference" itself runs as a backend (at the inputs' own dtypes): it checks the dtype
  policy and that the tolerances are not tighter than plain PyTorch can meet.

Non-contiguous layouts are views into storage filled with NaN (or True for bool), so a kernel
that reads one element outside the view poisons the loss.

Profiles: `HYPOTHESIS_PROFILE=ci` (default: derandomized, moderate) and `long` (manual runs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

os.environ.setdefault("TRITON_INTERPRET", "1")  # before vae_fast imports triton (conftest does too)

import vae_fast  # noqa: E402
from vae_fast import _backend, reference  # noqa: E402

F64 = torch.float64
F32 = torch.float32
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# profiles (tests/conftest.py registers the same ones; these are only the fallback)

def _profile():
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
    for prof, kw in (("ci", dict(derandomize=True, database=None, max_examples=40)),
                     ("long", dict(max_examples=600))):
        try:
            settings.get_profile(prof)
        except InvalidArgument:
            settings.register_profile(prof, **common, **kw)
    return settings.get_profile(name)


PROFILE = _profile()


def examples(weight: float) -> settings:
    """The profile's settings with `weight` times its example count (cheap tests run more)."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * weight)),
                    deadline=None, suppress_health_check=[
                        HealthCheck.too_slow, HealthCheck.data_too_large,
                        HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# backends

from conftest import fused_backends  # noqa: E402


# "reference" at the inputs' own dtypes checks the tolerance model and the dtype policy.
BACKENDS = ["reference"] + fused_backends()

# ---------------------------------------------------------------------------------------------
# tolerances

# losses and cancellation floors: relative to the sum of absolute terms, by accumulation dtype
RTOL_ACC = {F32: 3e-5, F64: 1e-11}
# gradient values, by the gradient's dtype (16-bit: the rounding of the stored result)
RTOL_GRAD = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, F32: 3e-5, F64: 1e-11}
# absolute error per addend allowed near float32's underflow: a backend may keep exp(-|z|)
# at >= exp(-84.5) = 2.0e-37 instead of going subnormal (the C++ backend does, documented)
FLUSH = {F32: 2.5e-37, F64: 0.0}

# ---------------------------------------------------------------------------------------------
# the drawn call

SIZES = [1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 31, 32, 61, 64, 127, 128, 257, 509, 1021, 2053,
         4099, 8191]
BATCHES = [1, 2, 3, 4, 5, 7, 8, 13]
SPECIALS = {
    "logit": [0.0, 100.0, -100.0, 30.0, -30.0, 1e-30, -1e-30, 1e-3],
    "prob": [0.0, 1.0, 1e-30, 1e-7, 0.5, 1.0 - 1e-7],
    "unit": [0.0, 1.0],
    "real": [0.0, 1e4, -1e4, 1e-30, -1e-30],
    "logvar": [30.0, -30.0, 0.0, 1e-30],
    "weight": [0.0, 1.0, 1e-30, 1e3],
    "posw": [1.0, 1e-3, 1e2],
}
LAYOUTS = ["contig", "offset", "slice", "transpose", "channels_last"]


@dataclass
class Arg:
    """One tensor argument: its values (already rounded to its dtype), layout, grad flag."""

    master: torch.Tensor
    layout: str
    grad: bool
    partner: str | None = None  # for a parameter: the argument whose shape it broadcasts to


@dataclass
class Case:
    fn: str
    kind: str  # "bernoulli", "bernoulli_probs", "gaussian" or "none" (KL only)
    tensors: dict[str, Arg]
    kw: dict  # everything else (numbers, reduction, flags)
    gout: dict = field(default_factory=dict)  # output index -> weight (number or "tensor")
    seed: int = 0

    def _repr_pretty_(self, printer, cycle):  # hypothesis prints this for a failing example
        printer.text(repr(self))

    def __repr__(self):
        ts = ", ".join(f"{n}={tuple(a.master.shape)}:{str(a.master.dtype)[6:]}:{a.layout}"
                       f"{':grad' if a.grad else ''}" for n, a in self.tensors.items())
        return f"Case({self.fn}, {ts}, kw={self.kw}, gout={self.gout}, seed={self.seed})"


def _values(gen, shape, role, special_frac) -> torch.Tensor:
    if role in ("prob", "unit"):
        v = torch.rand(shape, generator=gen, dtype=F64)
    elif role == "weight":
        v = 2 * torch.rand(shape, generator=gen, dtype=F64)
    elif role == "posw":
        v = 0.1 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    else:
        scale = {"logit": 4.0, "logvar": 2.0, "real": 3.0}[role]
        v = scale * torch.randn(shape, generator=gen, dtype=F64)
    if special_frac and v.numel():
        sp = torch.tensor(SPECIALS[role], dtype=F64)
        pick = sp[torch.randint(len(sp), v.shape, generator=gen)]
        v = torch.where(torch.rand(v.shape, generator=gen, dtype=F64) < special_frac, pick, v)
    return v


@st.composite
def shapes(draw, min_dim=1, max_dim=5, batch=None):
    ndim = draw(st.integers(min_dim, max_dim))
    if ndim == 0:
        return ()
    max_numel = draw(st.sampled_from([64, 1200, 6000, 20000]))
    b = batch if batch is not None else draw(st.sampled_from(BATCHES))
    dims, budget = [b], max(1, max_numel // b)
    for _ in range(ndim - 1):
        s = draw(st.sampled_from([s for s in SIZES if s <= budget] or [1]))
        dims.append(s)
        budget = max(1, budget // s)
    return tuple(dims)


@st.composite
def bcast_shapes(draw, shape):
    """A shape that broadcasts to `shape` without enlarging it: full, 0-d, trailing dims
    (a learned per-feature `(Z,)` prior), or some dims kept (`(C,1,1)`, `(B,1,H,1)`)."""
    how = draw(st.sampled_from(["full", "scalar", "trailing", "some"]))
    if how == "full" or not shape:
        return tuple(shape)
    if how == "scalar":
        return ()
    if how == "trailing":
        return tuple(shape[-draw(st.integers(1, len(shape))):])
    keep = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    out = [s if k else 1 for s, k in zip(shape, keep)]
    lead = 0
    while lead < len(out) and out[lead] == 1:
        lead += 1
    return tuple(out[draw(st.integers(0, lead)):])


class _Builder:
    """Collects the tensors of one drawn case."""

    def __init__(self, draw, seed):
        self.draw = draw
        self.gen = torch.Generator().manual_seed(seed)
        self.special = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
        self.mixed = draw(st.booleans())
        self.dtype = draw(st.sampled_from(FLOATS))
        self.grad_mode = draw(st.sampled_from(["all", "all", "none", "some"]))
        self.tensors: dict[str, Arg] = {}

    def add(self, name, shape, role, *, partner=None, allow_bool=False):
        draw = self.draw
        dtype = draw(st.sampled_from(FLOATS)) if self.mixed else self.dtype
        if allow_bool and draw(st.integers(0, 3)) == 0:
            master = torch.rand(shape, generator=self.gen) < 0.5
        else:
            master = _values(self.gen, shape, role, self.special).to(dtype)
        if master.dim() >= 2:
            layout = draw(st.sampled_from(LAYOUTS))
        elif master.dim() == 1:
            layout = draw(st.sampled_from(LAYOUTS[:3]))
        else:
            layout = "contig"
        grad = master.is_floating_point() and (
            self.grad_mode == "all" or (self.grad_mode == "some" and draw(st.booleans())))
        self.tensors[name] = Arg(master, layout, grad, partner)

    def param(self, name, partner_shape, role, partner, *, numbers, allow_none=False):
        """None, a Python number from `numbers`, or a tensor of a broadcast shape."""
        choices = (["none"] if allow_none else []) + (["number"] if numbers else []) + ["tensor"]
        how = self.draw(st.sampled_from(choices))
        if how == "none":
            return None
        if how == "number":
            return self.draw(st.sampled_from(numbers))
        self.add(name, self.draw(bcast_shapes(partner_shape)), role, partner=partner)
        return "tensor"


LOGVAR_NUMBERS = [0.0, 0.1, -1.3, 30.0, -30.0]
PRIOR_MU_NUMBERS = [0.0, 0.5, -2.0]


@st.composite
def cases(draw, fn):
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(draw, seed)
    kw: dict = {}
    kind = "none"
    if fn in ("bernoulli_nll", "gaussian_nll", "elbo_loss"):
        shape = draw(shapes())
    if fn == "bernoulli_nll":
        kind = "bernoulli"
        b.add("logits", shape, "logit")
        b.add("target", shape, "unit", allow_bool=True)
        kw["reduction"] = draw(st.sampled_from(["batchmean", "sum", "mean", "none"]))
    elif fn == "gaussian_nll":
        kind = "gaussian"
        b.add("mean", shape, "real")
        b.add("target", shape, "real")
        lv = b.param("logvar", shape, "logvar", "mean", numbers=LOGVAR_NUMBERS)
        if lv != "tensor":
            kw["logvar"] = lv
        kw["full"] = draw(st.booleans())
        kw["reduction"] = draw(st.sampled_from(["batchmean", "sum", "mean", "none"]))
    elif fn in ("gaussian_kl", "elbo_loss"):
        if fn == "elbo_loss":
            kind = draw(st.sampled_from(["bernoulli", "bernoulli_probs", "gaussian", "continuous_bernoulli"]))
            kw["likelihood"] = kind
            role = {"bernoulli": "logit", "bernoulli_probs": "prob", "gaussian": "real",
                    "continuous_bernoulli": "logit"}[kind]
            b.add("recon", shape, role)
            b.add("target", shape, "real" if kind == "gaussian" else "unit",
                  allow_bool=kind != "gaussian")
            if kind == "gaussian":
                rlv = b.param("recon_logvar", shape, "logvar", "recon", numbers=LOGVAR_NUMBERS,
                              allow_none=True)
                if rlv != "tensor":
                    kw["recon_logvar"] = rlv
            zshape = draw(shapes(max_dim=4, batch=shape[0]))
            beta = draw(st.sampled_from([1.0, 0.0, 0.5, 3.7, 1e-3, "tensor"]))
            if beta == "tensor":  # a 0-d tensor (KL annealing), maybe requiring grad
                b.add("beta", (), "weight")
            else:
                kw["beta"] = beta
            kw["return_terms"] = draw(st.booleans())
            kw["reduction"] = draw(st.sampled_from(["batchmean", "sum", "none"]))
        else:
            zshape = draw(shapes(max_dim=4))
            kw["reduction"] = draw(st.sampled_from(["batchmean", "sum", "mean", "none"]))
        b.add("mu", zshape, "real")
        lv = b.param("logvar", zshape, "logvar", "mu", numbers=LOGVAR_NUMBERS)
        if lv != "tensor":
            kw["logvar"] = lv
        for name, role, numbers in (("prior_mu", "real", PRIOR_MU_NUMBERS),
                                    ("prior_logvar", "logvar", LOGVAR_NUMBERS)):
            p = b.param(name, zshape, role, "mu", numbers=numbers, allow_none=True)
            if p != "tensor":
                kw[name] = p
    else:  # the drop-in BCE functions
        kind = "bernoulli" if fn == "binary_cross_entropy_with_logits" else "bernoulli_probs"
        shape = draw(shapes(min_dim=0))
        b.add("input", shape, "logit" if kind == "bernoulli" else "prob")
        b.add("target", shape, "unit", allow_bool=True)
        b.param("weight", shape, "weight", "input", numbers=None, allow_none=True)
        if kind == "bernoulli":
            b.param("pos_weight", shape, "posw", "input", numbers=None, allow_none=True)
        kw["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    n_out = 3 if kw.get("return_terms") else 1
    weights = [draw(st.sampled_from([None, 1.0, 1.0, 0.37, -2.0, "tensor"])) for _ in range(n_out)]
    if all(w is None for w in weights):
        weights[0] = 1.0
    gout = {i: w for i, w in enumerate(weights) if w is not None}
    return Case(fn, kind, b.tensors, kw, gout, seed)


# ---------------------------------------------------------------------------------------------
# running a case

def _lay(m: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of `m` in `layout`; views sit in storage filled with NaN (True for bool)."""
    if layout == "contig" or m.dim() == 0 or m.numel() == 0:
        return m.clone()
    fill = True if m.dtype == torch.bool else float("nan")
    if layout == "offset":
        v = torch.full((m.numel() + 2,), fill, dtype=m.dtype)[1:-1].view(m.shape)
    elif layout == "slice":
        v = torch.full((*m.shape[:-1], 2 * m.shape[-1] + 1), fill, dtype=m.dtype)[..., 1::2]
    elif layout == "transpose":
        v = torch.full(m.shape[::-1], fill, dtype=m.dtype).permute(*reversed(range(m.dim())))
    elif m.dim() in (4, 5):
        fmt = torch.channels_last if m.dim() == 4 else torch.channels_last_3d
        v = torch.full(m.shape, fill, dtype=m.dtype).contiguous(memory_format=fmt)
    else:
        v = torch.full(m.shape, fill, dtype=m.dtype)
    return v.copy_(m)


def _shape_of(case: Case, name: str):
    return tuple(case.tensors[name].master.shape)


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _grad_outputs(case: Case, outs):
    """(tensors, grads) for torch.autograd.backward, the same values for every backend."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    ts, gs = [], []
    for i, w in case.gout.items():
        o = outs[i]
        if w == "tensor":  # per row / per element; a row at exactly 1 takes the early exit
            g = torch.where(torch.rand(o.shape, generator=gen) < 0.3, 1.0,
                            torch.randn(o.shape, generator=gen, dtype=F64).to(F32).to(F64))
        else:
            g = torch.full(o.shape, w, dtype=F64)
        ts.append(o)
        gs.append(g.to(o.dtype))
    return ts, gs


def _run(fn_module, case: Case, *, truth: bool):
    """Call the case; return (outputs, grads by name). truth=True: contiguous float64 inputs."""
    leaves = {}
    for name, a in case.tensors.items():
        if truth:
            t = a.master.to(F64, copy=True) if a.master.is_floating_point() else a.master.clone()
        else:
            t = _lay(a.master, a.layout)
        leaves[name] = t.requires_grad_(a.grad)
    outs = _outputs(getattr(fn_module, case.fn)(**leaves, **case.kw))
    grads = {}
    if any(o.requires_grad for o in outs):
        ts, gs = _grad_outputs(case, outs)
        keep = [(t, g) for t, g in zip(ts, gs) if t.requires_grad]
        torch.autograd.backward([t for t, _ in keep], [g for _, g in keep])
        grads = {n: t.grad for n, t in leaves.items() if case.tensors[n].grad}
    return [o.detach() for o in outs], grads


def _main_name(case: Case) -> str | None:
    for n in ("logits", "mean", "recon", "input"):
        if n in case.tensors:
            return n
    return None


def _magnitudes(case: Case):
    """Float64 elementwise bounds of |each addend| of the formulas, broadcast to the partner's
    shape: (recon terms, kl terms, {input name: its gradient's addends})."""
    t = {n: a.master.to(F64) for n, a in case.tensors.items()}
    kw = case.kw

    def p(name, default=0.0):
        v = t.get(name, kw.get(name))
        return torch.as_tensor(default if v is None else v, dtype=F64)

    recon = kl = None
    comp = {}
    xn = _main_name(case)
    if xn is not None:
        x, y = t[xn], t["target"]
        w = t["weight"].abs() if "weight" in t else torch.ones((), dtype=F64)
        if case.kind == "bernoulli":
            recon = F.softplus(x) + F.softplus(-x) + x.abs() * (1 + y.abs())
            if "pos_weight" in t:
                lw = 1 + (t["pos_weight"] - 1) * y
                recon = recon + lw.abs() * F.softplus(-x)
                comp[xn] = (1 - y).abs() + lw.abs()
                comp["target"] = (t["pos_weight"] - 1).abs() * F.softplus(-x) + x.abs()
                comp["pos_weight"] = y.abs() * F.softplus(-x)
            else:
                comp[xn] = 1 + y.abs()
                comp["target"] = x.abs()
        elif case.kind == "bernoulli_probs":
            lx, l1x = torch.log(x), torch.log1p(-x)
            recon = y.abs() * (-lx).clamp_max(100) + (1 - y).abs() * (-l1x).clamp_max(100)
            comp[xn] = (x.abs() + y.abs()) / (x * (1 - x)).clamp_min(1e-12)
            comp["target"] = lx.abs() + l1x.abs()
        else:
            s = p("recon_logvar") if case.fn == "elbo_loss" else p("logvar")
            inv = torch.exp(-s)
            q = (y - x) ** 2 * inv
            recon = 0.5 * (s.abs() + q) + math.log(2 * math.pi) / 2
            comp[xn] = comp["target"] = (y - x).abs() * inv
            comp["recon_logvar" if case.fn == "elbo_loss" else "logvar"] = 0.5 * (1 + q)
        comp = {n: (c * w).expand(x.shape) for n, c in comp.items()}
        comp["weight"] = recon.expand(x.shape)
        recon = (recon * w).expand(x.shape)
    if "mu" in t:
        mu = t["mu"]
        lv, pmu, plv = p("logvar"), p("prior_mu"), p("prior_logvar")
        d = lv - plv
        em1 = torch.expm1(d)
        q = (mu - pmu) ** 2 * torch.exp(-plv)
        kl = (0.5 * (em1.abs() + d.abs() + q)).expand(mu.shape)
        comp["mu"] = comp["prior_mu"] = ((mu - pmu).abs() * torch.exp(-plv)).expand(mu.shape)
        # the reference differentiates expm1(d) - d as exp(d) - 1: cancellation for tiny d
        comp["logvar"] = (0.5 * (em1.abs() + 1)).expand(mu.shape)
        comp["prior_logvar"] = (0.5 * (em1.abs() + 1 + q)).expand(mu.shape)
    return recon, kl, comp


def _reduction_scale(case: Case, n_elem: int, batch: int) -> float:
    red = case.kw["reduction"]
    if red in ("sum", "none"):
        return 1.0
    if red == "mean" or case.fn.startswith("binary_cross_entropy"):
        return 1.0 / max(n_elem, 1)
    return 1.0 / max(batch, 1)


def _reduce_mag(m: torch.Tensor, reduction: str, torch_api: bool):
    if reduction == "none":
        return m if torch_api else m.reshape(m.shape[0], -1).sum(1)
    total = m.sum()
    if reduction == "sum":
        return total
    if reduction == "mean" or torch_api:
        return total / max(m.numel(), 1)
    return total / m.shape[0]


def _beta(case: Case) -> float:
    if "beta" in case.tensors:
        return float(case.tensors["beta"].master)
    return case.kw.get("beta", 1.0)


def _coefficients(case: Case, outs, shape, stream: str):
    """|d objective / d term| for each element of a stream ("r" or "k") of `shape`."""
    if case.fn == "elbo_loss":
        factors = [1.0, 1.0, 0.0] if stream == "r" else [_beta(case), 0.0, 1.0]
    else:
        factors = [1.0]
    total = torch.zeros((), dtype=F64)
    ts, gs = _grad_outputs(case, outs)
    for i, g in zip(case.gout, gs):
        g = g.to(F64)
        if g.dim() == 1 and case.kw["reduction"] == "none" and not case.fn.startswith("binary"):
            g = g.reshape((-1,) + (1,) * (len(shape) - 1))
        total = total + factors[i] * g
    n = math.prod(shape)
    return (total.abs() * _reduction_scale(case, n, shape[0] if shape else 1)).expand(shape)


def _expected_dtype(case: Case):
    """float64 when any input is float64, else float32 (a tensor beta does not count)."""
    inputs = [a for n, a in case.tensors.items() if n != "beta"]
    return F64 if any(a.master.dtype == F64 for a in inputs) else F32


def _assert_close(actual, expected, tol, what, *, overflow_rtol=0.0):
    """|actual - expected| <= tol elementwise; NaN exactly where expected is NaN; infinities
    equal, except that a value rounding past the dtype's max may be inf or its max."""
    a = actual.detach().to(F64)
    e_full = expected.detach().to(F64)
    e = e_full.to(actual.dtype).to(F64) if actual.dtype != F64 else e_full
    tol = torch.as_tensor(tol, dtype=F64).expand(e.shape)
    bad_nan = a.isnan() != e.isnan()
    both_inf = a.isinf() & e.isinf() & (a == e)
    one_inf = (a.isinf() | e.isinf()) & ~both_inf & ~a.isnan() & ~e.isnan()
    big = torch.finfo(actual.dtype).max * (1 - 2 * overflow_rtol)
    ok_inf = one_inf & (e_full.abs() >= big) & (a.abs() >= big) & (a.sign() == e_full.sign())
    fin = a.isfinite() & e.isfinite()
    bad_val = fin & ((a - e).abs() > tol)
    bad = bad_nan | (one_inf & ~ok_inf) | bad_val
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist()) if bad.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} differ; first at {idx}: got "
            f"{a[idx].item()!r}, expected {e_full[idx].item()!r} (tol {tol[idx].item():.3g})")


def check_case(case: Case, backends=BACKENDS):
    truth_outs, truth_grads = _run(reference, case, truth=True)
    acc = _expected_dtype(case)
    torch_api = case.fn.startswith("binary_cross_entropy")
    red = case.kw["reduction"]
    mag_r, mag_k, comp = _magnitudes(case)
    out_r = None if mag_r is None else _reduce_mag(mag_r, red, torch_api)
    out_k = None if mag_k is None else _reduce_mag(mag_k, red, torch_api)
    if case.fn == "elbo_loss":
        out_mags = [out_r + _beta(case) * out_k, out_r, out_k]
    else:
        out_mags = [out_r if out_r is not None else out_k]
    main = case.tensors[_main_name(case) or "mu"].master
    if red == "none":
        want_shape = tuple(main.shape) if torch_api else (main.shape[0],)
    else:
        want_shape = ()
    # error floors of the gradients: addends x |coefficient|, summed over broadcasts
    floors = {}
    if truth_grads:
        coef = {}
        if mag_r is not None:
            coef["r"] = _coefficients(case, truth_outs, tuple(mag_r.shape), "r")
        if mag_k is not None:
            coef["k"] = _coefficients(case, truth_outs, tuple(mag_k.shape), "k")
        for name in truth_grads:
            a = case.tensors[name]
            if name == "beta":  # d objective / d beta = sum of g_loss * kl
                g0 = _grad_outputs(case, truth_outs)[1][0] if 0 in case.gout else 0.0
                floors[name] = (torch.as_tensor(g0, dtype=F64).abs() * out_k).sum()
                continue
            stream = "k" if name in ("mu", "prior_mu", "prior_logvar") or (
                name == "logvar" and "mu" in case.tensors) else "r"
            f = (comp[name] * coef[stream]).nan_to_num(nan=0.0, posinf=0.0)
            floors[name] = f.sum_to_size(a.master.shape) if tuple(f.shape) != tuple(
                a.master.shape) else f

    for backend in backends:
        with vae_fast.use_backend(backend):
            outs, grads = _run(vae_fast, case, truth=False)
        where = f"[{backend}] {case.fn}"
        assert len(outs) == len(truth_outs), where
        for i, (o, e, m) in enumerate(zip(outs, truth_outs, out_mags)):
            assert o.dtype == acc, f"{where} output {i}: dtype {o.dtype}, expected {acc}"
            assert tuple(o.shape) == want_shape, f"{where} output {i}: shape {tuple(o.shape)}"
            _assert_close(o, e, RTOL_ACC[acc] * m + 1e-300, f"{where} output {i}")
        for name, a in case.tensors.items():
            if not a.grad:
                continue
            g, e = grads.get(name), truth_grads.get(name)
            if e is None:  # no path from the outputs used: None, or zeros
                assert g is None or not g.any(), f"{where} grad {name}: nonzero, expected none"
                continue
            assert g is not None, f"{where} grad {name}: missing"
            assert g.dtype == a.master.dtype, f"{where} grad {name}: dtype {g.dtype}"
            assert tuple(g.shape) == tuple(a.master.shape), f"{where} grad {name}: shape"
            gd = g.dtype
            summed = max(1, sum(t.master.numel() for t in case.tensors.values()) // max(
                1, a.master.numel()))  # elements behind one gradient element (broadcasts)
            tol = (RTOL_GRAD[gd] * e.abs().nan_to_num(posinf=0.0)
                   + RTOL_ACC[acc] * floors[name] + torch.finfo(gd).tiny
                   + FLUSH[acc] * summed)
            _assert_close(g, e, tol, f"{where} grad {name}", overflow_rtol=RTOL_GRAD[gd])


# ---------------------------------------------------------------------------------------------
# the properties

@given(case=cases("bernoulli_nll"))
@examples(1.0)
def test_bernoulli_nll(case):
    check_case(case)


@given(case=cases("gaussian_nll"))
@examples(1.0)
def test_gaussian_nll(case):
    check_case(case)


@given(case=cases("gaussian_kl"))
@examples(1.0)
def test_gaussian_kl(case):
    check_case(case)


@given(case=cases("elbo_loss"))
@examples(2.0)
def test_elbo_loss(case):
    check_case(case)


@given(case=cases("binary_cross_entropy_with_logits"))
@examples(1.0)
def test_binary_cross_entropy_with_logits(case):
    check_case(case)


@given(case=cases("binary_cross_entropy"))
@examples(1.0)
def test_binary_cross_entropy(case):
    check_case(case)


@given(case=st.one_of(cases("binary_cross_entropy_with_logits"), cases("binary_cross_entropy")))
@examples(1.0)
def test_reference_bce_is_torch(case):
    """The oracle of the drop-in functions is torch itself (float64, in-range inputs)."""
    args = {n: (a.master.to(F64) if a.master.is_floating_point() else a.master.to(F64))
            for n, a in case.tensors.items()}
    ours = getattr(reference, case.fn)(**args, **case.kw)
    theirs = getattr(F, case.fn)(**args, **case.kw)
    # torch's logits formula log(1 + exp(-|z|)) is less exact than log1p for tiny losses
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-9, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# determinism

def _det_case(config: str) -> Case:
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=F64)  # noqa: E731
    if config == "elbo_bernoulli":  # 3 rows x 7001: several tiles per chunk, several chunks
        return Case("elbo_loss", "bernoulli",
                    {"recon": Arg(r(3, 7001).float(), "contig", True),
                     "target": Arg(u(3, 7001).float(), "contig", False),
                     "mu": Arg(r(3, 33).float(), "contig", True),
                     "logvar": Arg(r(3, 33).float(), "contig", True)},
                    dict(likelihood="bernoulli", beta=0.7, reduction="batchmean"), {0: 0.37})
    if config == "gaussian_rows":
        return Case("gaussian_nll", "gaussian",
                    {"mean": Arg(r(5, 3, 41, 7).bfloat16(), "channels_last", True),
                     "target": Arg(r(5, 3, 41, 7).float(), "contig", True),
                     "logvar": Arg(r(3, 1, 1).float(), "contig", True, "mean")},
                    dict(reduction="none"), {0: "tensor"})
    if config == "kl_prior":
        return Case("gaussian_kl", "none",
                    {"mu": Arg(r(6, 1037).float(), "contig", True),
                     "logvar": Arg(r(6, 1037).float(), "contig", True),
                     "prior_mu": Arg(r(1037).float(), "contig", True, "mu"),
                     "prior_logvar": Arg(r(1037).float(), "contig", True, "mu")},
                    dict(reduction="sum"), {0: 1.0})
    return Case("binary_cross_entropy_with_logits", "bernoulli",
                {"input": Arg(r(4, 2500).half(), "contig", True),
                 "target": Arg(u(4, 2500).half(), "contig", True),
                 "weight": Arg(u(2500).float(), "contig", True, "input"),
                 "pos_weight": Arg(u(2500).float() + 0.5, "contig", True, "input")},
                dict(reduction="none"), {0: "tensor"})


DET_CONFIGS = ["elbo_bernoulli", "gaussian_rows", "kl_prior", "bce_elementwise"]


def _run_backend(backend, case):
    with vae_fast.use_backend(backend):
        outs, grads = _run(vae_fast, case, truth=False)
    return outs + [grads[n] for n in sorted(grads)]


def _bitwise_equal(a, b):
    def bits(t):
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))
        for x, y in zip(a, b))


@pytest.mark.parametrize("config", DET_CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_repeatable(backend, config):
    """The same inputs give bitwise the same losses and gradients, run after run."""
    case = _det_case(config)
    first = _run_backend(backend, case)
    second = _run_backend(backend, case)
    assert _bitwise_equal(first, second)


@pytest.mark.parametrize("config", DET_CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count(backend, config):
    """Behaviour across CPU thread counts (torch.set_num_threads(1) vs 2):

    - "triton": bitwise equal. The interpreter runs programs one after another and the
      per-block partials are added in a fixed order by the finalize kernel; on a GPU the
      CPU thread count plays no part at all.
    - "cpu": must be bitwise equal too: the C++ backend's reduction order may not depend on
      the number of threads (fixed blocks, partials added in block order).
    - "reference": only close, not bitwise: torch's own CPU `sum` splits its work by thread
      count (measured on torch 2.13: a 1e6-element float32 sum differs in the last bits
      between 1 and 2 threads). The reference is an oracle, not a reproducibility promise.
    """
    case = _det_case(config)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_backend(backend, case)
        torch.set_num_threads(2)
        two = _run_backend(backend, case)
    finally:
        torch.set_num_threads(old)
    if backend == "reference":
        for a, b in zip(one, two):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert _bitwise_equal(one, two)


def _launched_kernels():
    from vae_fast import triton_kernels as tk

    return {n: k for n, k in vars(tk).items() if n.endswith("_kernel") and hasattr(k, "run")}


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_f64_survives_gpu_scalar_arguments(monkeypatch, reduction):
    """float64 results stay float64-accurate when Python-float kernel arguments are fp32.

    Triton types a Python float argument as fp32 on a GPU; the interpreter keeps float64, so
    here a `1/B` scale, `beta` or a constant log-variance passed as a plain float would look
    right and be off by ~1e-8 on a GPU. This test launches the kernels with every float
    argument rounded to fp32, as a GPU would see it, and wants float64 accuracy."""
    import numpy as np

    from vae_fast import triton_kernels as tk

    def as_on_gpu(run):
        def fp32_floats(*args, **kwargs):
            r = lambda v: float(np.float32(v)) if type(v) is float else v  # noqa: E731
            return run(*map(r, args), **{k: r(v) for k, v in kwargs.items()})
        return fp32_floats

    for kernel in _launched_kernels().values():
        monkeypatch.setattr(kernel, "run", as_on_gpu(kernel.run))
    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=gen, dtype=F64) for s in ((3, 5), (3, 5), (3, 4), (3, 4))]
    kw = dict(likelihood="gaussian", recon_logvar=0.1, prior_mu=-0.7, prior_logvar=0.3, beta=0.1,
              reduction=reduction)
    results = []
    for backend in ("reference", "triton"):
        leaves = [a.clone().requires_grad_() for a in args]
        with vae_fast.use_backend(backend):
            loss = vae_fast.elbo_loss(*leaves, **kw)
        (loss * 0.3).sum().backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for ours, truth in zip(results[1], results[0]):
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# minimal repros of what the properties found (each also falls out of the properties above)

@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_with_float64_partner(backend):
    """bfloat16 logits with a float64 target: the logits' gradient is stored as bfloat16 from
    a float64 value. (The Triton interpreter's float64 -> bfloat16 cast yields garbage.)"""
    x = torch.tensor([[6.15625, -1.0, 0.5]], dtype=torch.bfloat16, requires_grad=True)
    y = torch.tensor([[0.4594, 0.2, 0.9]], dtype=F64)
    with vae_fast.use_backend(backend):
        vae_fast.bernoulli_nll(x, y).backward(torch.tensor(0.5, dtype=F64))
    want = 0.5 * (torch.sigmoid(x.detach().double()) - y)
    torch.testing.assert_close(x.grad.double(), want, rtol=1.6e-2, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_number_logvar_is_not_rounded_to_16_bits(backend, dtype):
    """`gaussian_kl(mu, logvar=-1.3)` with 16-bit mu: the number -1.3 is exact in the float32
    sum, as in the reference (not first rounded to mu's dtype)."""
    mu = torch.tensor([[-0.87890625]], dtype=dtype)
    with vae_fast.use_backend(backend):
        got = vae_fast.gaussian_kl(mu, -1.3)
    d = -1.3
    want = 0.5 * (math.expm1(d) - d + float(mu) ** 2)
    assert abs(got.item() - want) <= 1e-6 * abs(want), (got.item(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [65536.0, 1e-3], ids=["grad_scaler", "small"])
def test_float16_gradients_keep_their_range_under_scaling(backend, scale):
    """float16 gradients times a grad_output far from 1: AMP's GradScaler multiplies the loss
    by 65536 precisely so that tiny float16 gradients do not flush to zero; a small
    grad_output must not turn a representable gradient into inf. The reference scales in
    float32 and rounds once; a backend that stores the unscaled float16 gradient in the
    forward flushes (x = -16: sigmoid = 1.1e-7, / B below float16's range) or overflows
    (probability 1e-7: d/dx = -7.5e6) before the scale is applied."""
    cases = [
        ("bernoulli_nll", torch.full((4, 8), -16.0, dtype=torch.float16),
         torch.zeros(4, 8, dtype=torch.float16), {}),
        ("binary_cross_entropy", torch.tensor([[1e-7, 0.5]], dtype=torch.float16),
         torch.tensor([[0.9, 0.5]], dtype=torch.float16), {"reduction": "sum"}),
    ]
    for fn, x0, y, kw in cases:
        got = []
        for be in (backend, "reference"):
            x = x0.clone().requires_grad_()
            with vae_fast.use_backend(be):
                loss = getattr(vae_fast, fn)(x, y, **kw)
            (loss * scale).backward()
            got.append(x.grad)
        if got[1].abs().max() > 60000 or not got[1].isfinite().all():
            continue  # the true gradient itself overflows float16 at this scale
        torch.testing.assert_close(got[0], got[1], rtol=2e-3, atol=0, msg=f"{fn} x {scale}")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("side", ["y0", "y1", "y0_pos_weight"])
def test_confident_logits_keep_relative_precision(backend, dtype, side):
    """Binary targets with confident logits (the bulk of a trained model's pixels): the loss
    softplus(z) - y*z and its gradient sigmoid(z) - y are tiny and must keep their relative
    precision. Written as max(z, 0) - y*z + log1p(exp(-|z|)) and, for the gradient,
    (1 - y) - e*r (z >= 0) or e*r - y (z < 0) with e = exp(-|z|), r = 1/(1 + e), nothing
    cancels; `(1 - y)*z + softplus(-z)` or `1 - (1 - sigmoid(z)) - y` lose everything below
    ulp(|z|) (float32: the loss of z = -16 becomes 0, gradients of z < -17 become 0)."""
    z = torch.tensor([[-16.0, -20.0, -30.0, -40.0, -3.0]], dtype=F64)
    if side == "y1":
        z = -z
    y = torch.full_like(z, 1.0 if side == "y1" else 0.0)
    kw = {"pos_weight": torch.full((5,), 3.0, dtype=dtype)} if side == "y0_pos_weight" else {}
    # (y = 0: the pos_weight form (1 - y) z + (1 + (pw - 1) y) softplus(-z) is the same loss)
    # float64 truth in the same cancellation-free form (y is 0 or 1, so pos_weight = 1 here)
    e = torch.exp(-z.abs())
    r = 1 / (1 + e)
    loss_true = z.clamp_min(0) - y * z + torch.log1p(e)
    grad_true = torch.where(z >= 0, (1 - y) - e * r, e * r - y)
    x = z.to(dtype).requires_grad_()
    with vae_fast.use_backend(backend):
        loss = vae_fast.binary_cross_entropy_with_logits(x, y.to(dtype), reduction="none", **kw)
    loss.sum().backward()
    rtol = 1e-5 if dtype == F32 else 1e-12
    torch.testing.assert_close(loss.detach().double(), loss_true, rtol=rtol, atol=0)
    torch.testing.assert_close(x.grad.double(), grad_true, rtol=rtol, atol=0)
