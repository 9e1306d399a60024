"""The fused C++ CPU kernels, called through the raw operator, against float64 torch formulas.

`torch.ops.vae_fast.fused_fwd(..., api=RAW, backend=CPU, needs)` is the whole host path below
the public functions: the op checks its arguments, plans the call (broadcast geometry, dtype
policy, stored-gradient shapes, reduction scales; csrc/plan.cpp) and runs the C++ kernels
(csrc/run.cpp, csrc/kernels_impl.h). These tests check that contract for every likelihood,
reduction, parameter read mode and dtype, the accuracy of the vector math, NaN/Inf behaviour,
determinism across runs and thread counts, and the backward's in-place scaling, which lives in
the autograd node of `torch.ops.vae_fast.fused_loss` and is tested through `.backward(g)`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vae_fast import _ext
from vae_fast._enums import Api, Backend, Likelihood, ParamMode, Reduction

from conftest import IN_CI  # noqa: E402

if _ext.module is None:
    if IN_CI:  # built at install time: not loading in CI is a failure, never a silent skip
        pytest.fail(f"vae_fast._C must load in CI: {_ext.reason}", pytrace=False)
    pytest.skip(f"vae_fast._C unavailable: {_ext.reason}", allow_module_level=True)

OPS = torch.ops.vae_fast
NONE = int(Likelihood.NONE)
BERN_LOGITS, BERN_PROBS, GAUSS = (int(Likelihood.BERNOULLI), int(Likelihood.BERNOULLI_PROBS),
                                  int(Likelihood.GAUSSIAN))
SUM, BATCHMEAN, MEAN, PER_SAMPLE, ELEMENTWISE = (int(r) for r in Reduction)
REDUCTIONS = [SUM, BATCHMEAN, MEAN, PER_SAMPLE, ELEMENTWISE]
RED_IDS = ["sum", "batchmean", "mean", "per_sample", "elementwise"]
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
NAMES = ("x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv")
RECON_SLOTS = NAMES[:5]
PARAM_SLOTS = ("rlv", "w", "pw", "lv", "pmu", "plv")
CONST_SLOTS = ("rlv", "lv", "pmu", "plv")  # slots whose absent value is a number (*_c)
SNAN = 0x7F800001  # float32 signalling NaN: any multiply (even by 1) quiets it


# ---------------------------------------------------------------------------------------------
# Calling the op, and the float64 oracle
# ---------------------------------------------------------------------------------------------
def op_args(kind, x=None, y=None, rlv=None, w=None, pw=None, mu=None, lv=None, pmu=None,
            plv=None, *, reduction=SUM, full=False, beta=1.0, beta_t=None, api=int(Api.RAW),
            backend=int(Backend.CPU)):
    """The 20 arguments of fused_loss (fused_fwd and plan add `needs`). A parameter given as
    a number goes to its *_c constant (rlv, lv, pmu, plv only; w and pw default to 1)."""
    consts = dict.fromkeys(CONST_SLOTS, 0.0)
    slots = []
    for name, p in zip(NAMES, (x, y, rlv, w, pw, mu, lv, pmu, plv)):
        if isinstance(p, (int, float)):
            assert name in CONST_SLOTS, name
            consts[name] = float(p)
            p = None
        slots.append(p)
    return (*slots, beta_t, api, kind, reduction, full, consts["rlv"], consts["lv"],
            consts["pmu"], consts["plv"], float(beta), backend)


def needs_of(want):
    return sum(1 << NAMES.index(n) for n in want)


def is_tensor(p):
    return isinstance(p, torch.Tensor)


def acc_of(tensors):
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(is_tensor(t) and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def grad_spec(name, p, partner_shape, reduction, acc):
    """(shape, dtype) of the gradient fused_fwd returns for slot `name` holding tensor `p`."""
    partner_shape = tuple(partner_shape)
    if tuple(p.shape) == partner_shape:  # full size: the input's own dtype (float16: float32)
        return partner_shape, torch.float32 if p.dtype == torch.float16 else p.dtype
    assert name in PARAM_SLOTS
    if reduction == ELEMENTWISE:
        return partner_shape, acc
    if reduction == PER_SAMPLE:
        padded = (1,) * (len(partner_shape) - p.dim()) + tuple(p.shape)
        return (partner_shape[0],) + padded[1:], acc
    return tuple(p.shape), acc


def scales_of(kind, x, mu, reduction):
    """(scale_r, scale_k) the op must apply: 1, 1/batch or 1/elements; an absent term keeps 1."""
    inv = lambda n: 1.0 / n if n else math.inf  # noqa: E731  (an empty mean is nan, as torch's)
    main = x if kind else mu
    if reduction == BATCHMEAN:
        sr = sk = inv(main.shape[0])
    elif reduction == MEAN:
        sr = inv(x.numel()) if kind else 1.0
        sk = inv(mu.numel()) if mu is not None else 1.0
    else:
        sr = sk = 1.0
    return (sr if kind else 1.0), (sk if mu is not None else 1.0)


def run(kind, x=None, y=None, rlv=None, w=None, pw=None, mu=None, lv=None, pmu=None, plv=None,
        *, reduction=SUM, full=False, beta=1.0, beta_t=None, want=()):
    """fused_fwd with the gradients of `want`; checks the shapes and dtypes of all 12 outputs
    and returns (loss, nll, kl, {name: grad})."""
    args = (x, y, rlv, w, pw, mu, lv, pmu, plv)
    out = OPS.fused_fwd(*op_args(kind, *args, reduction=reduction, full=full, beta=beta,
                                 beta_t=beta_t), needs_of(want))
    assert len(out) == 12
    loss, nll, kl = out[:3]
    acc = acc_of(args)
    main = x if kind else mu
    for t in (loss, nll, kl):
        assert t.dtype == acc
    if reduction == ELEMENTWISE:
        assert loss.shape == x.shape and nll.numel() == 0 and kl.numel() == 0
    else:
        shape = (main.shape[0],) if reduction == PER_SAMPLE else ()
        assert loss.shape == nll.shape == kl.shape == shape
    grads = {}
    for name, p, g in zip(NAMES, args, out[3:]):
        if name not in want:
            assert g.numel() == 0, name
            continue
        partner = x if name in RECON_SLOTS else mu
        shape, dtype = grad_spec(name, p, partner.shape, reduction, acc)
        assert (tuple(g.shape), g.dtype) == (shape, dtype), (name, g.shape, g.dtype, shape, dtype)
        grads[name] = g
    return loss, nll, kl, grads


def plan(kind, *args, reduction=SUM, want=(), **kw):
    """The plan's numbers: {rows, row_len_r, row_len_k, red_mode, acc64, mem_r, mem_k,
    mode/inner/count: {slot: n}, scale_r, scale_k}."""
    ints, floats = OPS.plan(*op_args(kind, *args, reduction=reduction, **kw), needs_of(want))
    keys = ("rows", "row_len_r", "row_len_k", "red_mode", "acc64", "mem_r", "mem_k")
    info = dict(zip(keys, ints[:7]))
    for k, part in (("mode", 0), ("inner", 1), ("count", 2)):
        info[k] = dict(zip(NAMES, ints[7 + 9 * part: 16 + 9 * part]))
    info["scale_r"], info["scale_k"] = floats
    return info


def full64(p, shape, default):
    if p is None:
        return torch.full(shape, float(default), dtype=torch.float64)
    if isinstance(p, (int, float)):
        return torch.full(shape, float(p), dtype=torch.float64)
    return p.double().expand(shape).clone()


def oracle(kind, x, y, rlv, w, pw, mu, lv, pmu, plv, full):
    """Per-element losses and (unscaled) gradients in float64, from the docs/design.md formulas."""
    out = {}
    if kind:
        shape = tuple(x.shape)
        z, t = x.double(), y.double()
        s, ww, pp = full64(rlv, shape, 0.0), full64(w, shape, 1.0), full64(pw, shape, 1.0)
        if kind == BERN_LOGITS:
            mz, sp = (-z).clamp(min=0), torch.log1p(torch.exp(-z.abs()))
            spn = mz + sp  # softplus(-z)
            lw = 1 + (pp - 1) * t
            lu = ((1 - t) * z + lw * mz) + lw * sp  # no cancellation of the small sp
            sig = torch.sigmoid(z)
            out["l"] = ww * lu
            out["x"] = ww * ((1 - t) - lw * (1 - sig))
            out["y"] = ww * (-z + (pp - 1) * spn)
            out["w"] = lu
            out["pw"] = ww * t * spn
        elif kind == BERN_PROBS:
            lx, l1x = torch.log(z), torch.log1p(-z)
            lu = -(t * lx.clamp(min=-100) + (1 - t) * l1x.clamp(min=-100))
            out["l"] = ww * lu
            out["x"] = ww * (z - t) / (z * (1 - z)).clamp(min=1e-12)
            out["y"] = ww * (l1x - lx)
            out["w"] = lu
        else:
            d = t - z
            q = d * d * torch.exp(-s)
            out["l"] = 0.5 * (s + q) + (HALF_LOG_2PI if full else 0.0)
            out["x"] = -d * torch.exp(-s)
            out["y"] = d * torch.exp(-s)
            out["rlv"] = 0.5 * (1 - q)
    if mu is not None:
        shape = tuple(mu.shape)
        m = mu.double()
        v, pm, pv = full64(lv, shape, 0.0), full64(pmu, shape, 0.0), full64(plv, shape, 0.0)
        d = v - pv
        q = (m - pm) ** 2 * torch.exp(-pv)
        out["k"] = 0.5 * (torch.expm1(d) - d + q)
        out["mu"] = (m - pm) * torch.exp(-pv)
        out["lv"] = 0.5 * torch.expm1(d)
        out["pmu"] = -(m - pm) * torch.exp(-pv)
        out["plv"] = 0.5 * (-torch.expm1(d) - q)
    return out


def reduce_rows(v, reduction, rows, scale):
    if v is None:
        return torch.zeros((rows,) if reduction == PER_SAMPLE else (), dtype=torch.float64)
    if reduction == PER_SAMPLE:
        return scale * v.reshape(rows, -1).sum(1)
    return scale * v.sum()


def expected(kind, args, reduction, beta, full=False):
    """(loss, nll, kl, per-element oracle, (scale_r, scale_k)) in float64."""
    o = oracle(kind, *args, full)
    x, mu = args[0], args[5]
    rows = (x if kind else mu).shape[0]
    sr, sk = scales_of(kind, x, mu, reduction)
    nll = reduce_rows(o.get("l"), reduction, rows, sr)
    kl = reduce_rows(o.get("k"), reduction, rows, sk)
    return nll + beta * kl, nll, kl, o, (sr, sk)


def expected_grad(name, o, p, partner_shape, reduction, scale, coef=1.0):
    """The stored gradient of `name`: scale * coef * the per-element gradient, summed down as
    the op sums a broadcast parameter's; also the sum of absolute terms (for tolerances)."""
    acc = torch.float64
    shape, _ = grad_spec(name, p, partner_shape, reduction, acc)
    e = scale * coef * o[name]
    return e.sum_to_size(shape), e.abs().sum_to_size(shape)


def assert_close(actual, expect, rtol, atol=0.0, what=""):
    a = actual.double()
    e = expect.double()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def tol(dtype):
    """(rtol on sums, rtol on per-element values) for results computed from `dtype` inputs."""
    return {
        torch.float64: (1e-12, 1e-10),
        torch.float32: (2e-6, 1e-5),
        torch.bfloat16: (2e-6, 1e-5),  # inputs are exact in float; math runs in float32
        torch.float16: (2e-6, 1e-5),
    }[dtype]


def grad_rtol(buf_dtype, compute_dtype):
    if buf_dtype == torch.bfloat16:
        return 8e-3
    if buf_dtype == torch.float16:
        return 1e-3
    if buf_dtype == torch.float32:  # float64 math, rounded to float32 at the end
        return tol(torch.float32)[1]
    return tol(compute_dtype)[1]


def make_inputs(kind, shape_r, shape_k, dtype, gen, *, bool_target=False):
    def rnd(shape, lo, hi):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    x = y = mu = None
    if kind == BERN_LOGITS:
        x = (torch.randn(shape_r, generator=gen, dtype=torch.float64) * 4).to(dtype)
        y = torch.rand(shape_r, generator=gen) < 0.3 if bool_target else rnd(shape_r, 0, 1)
    elif kind == BERN_PROBS:
        x = rnd(shape_r, 0.02, 0.98)
        y = torch.rand(shape_r, generator=gen) < 0.3 if bool_target else rnd(shape_r, 0, 1)
    elif kind == GAUSS:
        x = torch.randn(shape_r, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(shape_r, generator=gen, dtype=torch.float64).to(dtype)
    if shape_k is not None:
        mu = torch.randn(shape_k, generator=gen, dtype=torch.float64).to(dtype)
    return x, y, mu


def check_case(kind, args, *, reduction, want, full=False, beta=0.8):
    """fused_fwd against the oracle: losses, every gradient of `want`, and the plan's scales."""
    loss, nll, kl, grads = run(kind, *args, reduction=reduction, full=full, beta=beta,
                               want=want)
    compute = acc_of(args)
    rs, re = tol(compute)
    e_loss, e_nll, e_kl, o, (sr, sk) = expected(kind, args, reduction, beta, full)
    p = plan(kind, *args, reduction=reduction, full=full, beta=beta, want=want)
    assert (p["scale_r"], p["scale_k"]) == (sr, sk)
    if reduction == ELEMENTWISE:
        assert_close(loss, sr * o["l"], re, 1e-30, "elementwise loss")
    else:
        # atol: a sum of mixed-sign terms can be small next to its terms
        scale_terms = lambda v, s: s * v.abs().sum() if v is not None else 0.0  # noqa: E731
        at_r = float(scale_terms(o.get("l"), sr)) * rs
        at_k = float(scale_terms(o.get("k"), sk)) * rs
        assert_close(nll, e_nll, rs, at_r, "nll")
        assert_close(kl, e_kl, rs, at_k, "kl")
        assert_close(loss, e_loss, rs, at_r + beta * at_k, "loss")
    for name, g in grads.items():
        recon = name in RECON_SLOTS
        partner = args[0] if recon else args[5]
        e, e_abs = expected_grad(name, o, args[NAMES.index(name)], partner.shape, reduction,
                                 sr if recon else sk)
        r = grad_rtol(g.dtype, compute)
        # atol relative to the gradient's magnitude: cancellation (sigmoid(z) - y) is absolute;
        # a summed parameter gradient: relative to the sum of its terms
        atol = r * max(float(e.abs().max()), float(e_abs.max()) if e.shape != o[name].shape
                       else 0.0) + 1e-30
        assert_close(g, e, r, atol, f"grad {name}")
    return loss, nll, kl, grads


# ---------------------------------------------------------------------------------------------
# Every likelihood x reduction x dtype
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_IDS)
@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS, GAUSS], ids=["logits", "probs", "gauss"])
def test_kinds_reductions_dtypes(kind, reduction, dtype):
    gen = torch.Generator().manual_seed(100 * kind + 10 * reduction + DTYPES.index(dtype))
    shape_r, shape_k = (3, 5, 7, 11), (3, 13)  # odd sizes: vector and tile tails everywhere
    x, y, mu = make_inputs(kind, shape_r, None if reduction == ELEMENTWISE else shape_k, dtype,
                           gen)
    lv = None if mu is None else (torch.randn(shape_k, generator=gen) * 0.5).to(dtype)
    rlv = (torch.randn(shape_r, generator=gen) * 0.5).to(dtype) if kind == GAUSS else None
    want = ["x", "y"] + (["rlv"] if kind == GAUSS else []) + ([] if mu is None else ["mu", "lv"])
    args = (x, y, rlv, None, None, mu, lv, None, None)
    _, _, _, grads = check_case(kind, args, reduction=reduction, want=want, full=kind == GAUSS)
    # gradients in the input's own dtype; float16 ones stay float32 until grad_output
    buf = torch.float32 if dtype == torch.float16 else dtype
    assert all(g.dtype == buf for g in grads.values())


@pytest.mark.parametrize("reduction", [SUM, MEAN, PER_SAMPLE], ids=["sum", "mean", "per_sample"])
def test_multi_chunk_rows(reduction):
    """Rows longer than a chunk (8192) and not a multiple of the tile (512) or vector width."""
    gen = torch.Generator().manual_seed(7)
    shape_r, shape_k = (3, 20011), (3, 9001)
    x, y, mu = make_inputs(BERN_LOGITS, shape_r, shape_k, torch.float32, gen)
    lv = torch.randn(shape_k, generator=gen) * 0.3
    args = (x, y, None, None, None, mu, lv, None, None)
    check_case(BERN_LOGITS, args, reduction=reduction, want=["x", "mu", "lv"])


def test_no_kl_stream_and_kl_only():
    gen = torch.Generator().manual_seed(8)
    x, y, mu = make_inputs(BERN_LOGITS, (4, 33), (4, 9), torch.float32, gen)
    lv = torch.randn(4, 9, generator=gen)
    for reduction in (SUM, MEAN):  # the absent KL is 0, not 0 * (1/0)
        loss, nll, kl, _ = check_case(BERN_LOGITS, (x, y, None, None, None, None, None, None, None),
                                      reduction=reduction, want=["x"])
        assert kl.item() == 0.0 and loss.item() == nll.item()
    for reduction in (PER_SAMPLE, MEAN):
        loss, nll, kl, _ = check_case(NONE, (None, None, None, None, None, mu, lv, None, None),
                                      reduction=reduction, want=["mu", "lv"])
        assert (nll == 0).all()
        torch.testing.assert_close(loss, 0.8 * kl, rtol=3e-7, atol=0)


def test_empty_batch_and_empty_rows():
    x, y, mu, lv = torch.empty(0, 3, 4), torch.empty(0, 3, 4), torch.empty(0, 5), torch.empty(0, 5)
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, want=["x", "mu"])
    assert loss.item() == 0 and nll.item() == 0 and kl.item() == 0
    assert grads["x"].shape == (0, 3, 4) and grads["mu"].shape == (0, 5)
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, reduction=PER_SAMPLE, want=["x"])
    assert loss.shape == (0,) and grads["x"].shape == (0, 3, 4)
    # the mean of nothing is nan, as torch's
    for reduction in (BATCHMEAN, MEAN):
        loss, nll, kl, _ = run(BERN_LOGITS, x, y, mu=mu, lv=lv, reduction=reduction)
        assert torch.isnan(loss) and torch.isnan(nll) and torch.isnan(kl)
        assert torch.isnan(F.binary_cross_entropy_with_logits(x, y, reduction="mean"))
    # an empty broadcast parameter gradient: zeros of the parameter's shape
    _, _, _, grads = run(BERN_LOGITS, x, y, w=torch.ones(3, 1), reduction=SUM, want=["w"])
    assert torch.equal(grads["w"], torch.zeros(3, 1))
    le, *_ = run(GAUSS, x, y, reduction=ELEMENTWISE)
    assert le.shape == (0, 3, 4)
    # rows of length 0
    mu2 = torch.randn(3, 2)
    loss, nll, kl, grads = run(BERN_LOGITS, torch.empty(3, 0), torch.empty(3, 0), mu=mu2,
                               lv=torch.zeros(3, 2), reduction=PER_SAMPLE, want=["x", "mu"])
    assert (nll == 0).all() and (kl > 0).all() and grads["x"].shape == (3, 0)
    torch.testing.assert_close(grads["mu"], mu2)
    _, nll, kl, _ = run(BERN_LOGITS, torch.empty(3, 0), torch.empty(3, 0), mu=mu2,
                        lv=torch.zeros(3, 2), reduction=MEAN)
    assert torch.isnan(nll) and kl.item() > 0


# ---------------------------------------------------------------------------------------------
# Parameter read modes: constant, full, periodic scalar / per-feature / per-channel / per-row,
# and any other broadcast (expanded)
# ---------------------------------------------------------------------------------------------
def _param_variants(shape, gen, lo, hi, dtype=torch.float32):
    """name -> parameter in every read mode, for a stream of `shape` (B, C, H, W) or (B, Z)."""
    def rnd(*s):
        return (torch.rand(s, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    v = {
        "const": float(lo + 0.3 * (hi - lo)),
        "scalar": rnd(),
        "one": rnd(1),
        "full": rnd(*shape),
        "feature": rnd(*shape[1:]),
    }
    if len(shape) == 4:
        v["channel"] = rnd(shape[1], 1, 1)
        v["row"] = rnd(shape[0], 1, 1, 1)
        v["expand"] = rnd(shape[1], 1, shape[3])  # a 1 inside the run: materialized
    return v


def _expected_read(mode, shape):
    """(ParamMode, inner, count) the plan must pick for a variant against `shape`."""
    B, rest = shape[0], shape[1:]
    return {
        "const": (ParamMode.CONST, 1, 1),
        "scalar": (ParamMode.PERIODIC, 1, 1),
        "one": (ParamMode.PERIODIC, 1, 1),
        "full": (ParamMode.FULL, 1, 1),
        "feature": (ParamMode.PERIODIC, 1, math.prod(rest)),
        "channel": (ParamMode.PERIODIC, math.prod(shape[2:]), shape[1]),
        "row": (ParamMode.PERIODIC, math.prod(rest), B),
        "expand": (ParamMode.EXPAND, 1, 1),
    }[mode]


def _check_read(kind, args, name, mode, shape):
    p = plan(kind, *args)
    got = (p["mode"][name], p["inner"][name], p["count"][name])
    assert got == tuple(int(v) for v in _expected_read(mode, shape)), (name, mode, got)


BCE_MODES = ["const", "scalar", "one", "full", "feature", "channel", "row", "expand"]


@pytest.mark.parametrize("mode", BCE_MODES)
def test_param_modes_bernoulli_weights(mode):
    gen = torch.Generator().manual_seed(11)
    shape = (3, 4, 5, 7)
    x, y, _ = make_inputs(BERN_LOGITS, shape, None, torch.float32, gen)
    if mode == "const":
        w = pw = None  # no tensor: w = pw = 1
    else:
        w = _param_variants(shape, gen, 0.2, 2.0)[mode]
        pw = _param_variants(shape, gen, 0.5, 3.0)[mode]
    args = (x, y, None, w, pw, None, None, None, None)
    _check_read(BERN_LOGITS, args, "w", mode, shape)
    _check_read(BERN_LOGITS, args, "pw", mode, shape)
    want = ["x", "y"] + ([] if mode == "const" else ["w", "pw"])
    for reduction in (SUM, MEAN, PER_SAMPLE, ELEMENTWISE):  # each summed-gradient shape
        check_case(BERN_LOGITS, args, reduction=reduction, want=want)
    # weight without pos_weight, and bool targets with both
    if mode != "const":
        check_case(BERN_LOGITS, (x, y, None, w, None, None, None, None, None), reduction=SUM,
                   want=["x", "y", "w"])
        yb = torch.rand(shape, generator=gen) < 0.5
        check_case(BERN_LOGITS, (x, yb, None, w, pw, None, None, None, None),
                   reduction=PER_SAMPLE, want=["x", "w", "pw"])
        check_case(BERN_LOGITS, (x, y, None, None, pw, None, None, None, None), reduction=SUM,
                   want=["x", "y", "pw"])


@pytest.mark.parametrize("mode", ["scalar", "full", "feature", "channel", "expand"])
def test_param_modes_probs_weight(mode):
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 4, 9)
    x, y, _ = make_inputs(BERN_PROBS, shape, None, torch.float32, gen)
    w = _param_variants(shape, gen, 0.2, 2.0)[mode]
    args = (x, y, None, w, None, None, None, None, None)
    _check_read(BERN_PROBS, args, "w", mode, shape)
    for reduction in (SUM, PER_SAMPLE):
        check_case(BERN_PROBS, args, reduction=reduction, want=["x", "y", "w"])


@pytest.mark.parametrize("mode", ["const", "scalar", "full", "feature", "channel", "row"])
def test_param_modes_gaussian_logvar(mode):
    gen = torch.Generator().manual_seed(13)
    shape = (3, 2, 5, 6)
    x, y, _ = make_inputs(GAUSS, shape, None, torch.float32, gen)
    rlv = _param_variants(shape, gen, -2.0, 2.0)[mode]  # "const": a number (rlv_c)
    args = (x, y, rlv, None, None, None, None, None, None)
    _check_read(GAUSS, args, "rlv", mode, shape)
    want = ["x", "y"] + ([] if mode == "const" else ["rlv"])
    for full in (False, True):
        check_case(GAUSS, args, reduction=PER_SAMPLE, want=want, full=full)
    check_case(GAUSS, args, reduction=BATCHMEAN, want=want, full=True)


@pytest.mark.parametrize("mode", ["const", "scalar", "one", "full", "feature"])
def test_param_modes_kl_prior(mode):
    gen = torch.Generator().manual_seed(14)
    shape = (5, 37)
    mu = torch.randn(shape, generator=gen)
    lv_variants = _param_variants(shape, gen, -2.0, 1.0)
    lv = lv_variants["full"] if mode == "const" else lv_variants[mode]
    pmu = _param_variants(shape, gen, -1.0, 1.0)[mode]
    plv = _param_variants(shape, gen, -1.5, 1.5)[mode]
    args = (None, None, None, None, None, mu, lv, pmu, plv)
    for name in ("pmu", "plv"):
        _check_read(NONE, args, name, mode, shape)
    want = ["mu", "lv"] + ([] if mode == "const" else ["pmu", "plv"])
    for reduction in (SUM, BATCHMEAN, PER_SAMPLE):
        check_case(NONE, args, reduction=reduction, want=want)
    if mode == "const":  # a constant posterior log-variance too (lv_c)
        check_case(NONE, (None, None, None, None, None, mu, -0.4, pmu, plv), reduction=SUM,
                   want=["mu"])


def test_mixed_dtypes():
    gen = torch.Generator().manual_seed(15)
    shape = (2, 3, 8, 8)
    # bf16 logits, float32 target, float16 per-channel weight: float32 math
    x = (torch.randn(shape, generator=gen) * 3).bfloat16()
    y = torch.rand(shape, generator=gen)
    w = (torch.rand(3, 1, 1, generator=gen) + 0.5).half()
    mu = torch.randn(2, 16, generator=gen).half()
    lv = torch.randn(2, 16, generator=gen).bfloat16()
    *_, grads = check_case(BERN_LOGITS, (x, y, None, w, None, mu, lv, None, None),
                           reduction=PER_SAMPLE, want=["x", "y", "w", "mu", "lv"])
    assert {n: g.dtype for n, g in grads.items()} == {
        "x": torch.bfloat16, "y": torch.float32, "w": torch.float32,  # broadcast: accumulation
        "mu": torch.float32, "lv": torch.bfloat16}  # float16 mu: a float32 buffer
    assert grads["w"].shape == (2, 3, 1, 1)  # per sample: (B,) + padded parameter dims
    # a float64 target makes everything float64; the logits gradient stays bf16
    y64 = y.double()
    loss, *_, grads = check_case(BERN_LOGITS, (x, y64, None, None, None, None, None, None, None),
                                 reduction=SUM, want=["x", "y"])
    assert loss.dtype == torch.float64 and grads["x"].dtype == torch.bfloat16
    assert grads["y"].dtype == torch.float64
    # a float64 broadcast parameter: float64 accumulation for the float32 KL stream
    plv = torch.randn(16, generator=gen, dtype=torch.float64)
    *_, grads = check_case(NONE, (None, None, None, None, None, mu.float(), lv, None, plv),
                           reduction=SUM, want=["mu", "lv", "plv"])
    assert grads["mu"].dtype == torch.float32 and grads["plv"].dtype == torch.float64


@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS])
def test_bool_targets(kind):
    gen = torch.Generator().manual_seed(16)
    x, y, mu = make_inputs(kind, (4, 3, 17), (4, 5), torch.float32, gen, bool_target=True)
    assert y.dtype == torch.bool
    lv = torch.randn(4, 5, generator=gen)
    for reduction in (SUM, PER_SAMPLE):
        check_case(kind, (x, y, None, None, None, mu, lv, None, None), reduction=reduction,
                   want=["x", "mu", "lv"])
    check_case(kind, (x, y, None, None, None, None, None, None, None), reduction=ELEMENTWISE,
               want=["x"])


def test_layouts():
    """Non-contiguous inputs are read right; a channels_last stream is walked in memory order
    (its gradients and elementwise loss keep the layout), unless a parameter needs the logical
    index (per-channel), in which case it is copied."""
    gen = torch.Generator().manual_seed(24)
    x, y, _ = make_inputs(GAUSS, (6, 40), None, torch.float32, gen)
    xt, yt = x.t().contiguous().t(), y.t().contiguous().t()  # column-major
    assert not xt.is_contiguous()
    check_case(GAUSS, (xt, yt, 0.3, None, None, None, None, None, None), reduction=PER_SAMPLE,
               want=["x", "y"])
    mu = torch.randn(6, 10, generator=gen)[:, ::2]  # strided
    check_case(NONE, (None, None, None, None, None, mu, torch.zeros(5), None, None),
               reduction=PER_SAMPLE, want=["mu", "lv"])
    cl = torch.channels_last
    x, y, _ = make_inputs(BERN_LOGITS, (3, 4, 5, 6), None, torch.float32, gen)
    xc, yc = x.to(memory_format=cl), y.to(memory_format=cl)
    wf = (torch.rand(3, 4, 5, 6, generator=gen) + 0.5).to(memory_format=cl)
    ws = torch.rand((), generator=gen) + 0.5
    wc = torch.rand(4, 1, 1, generator=gen) + 0.5
    for w, mem in ((wf, 1), (ws, 1), (wc, 0), (None, 1)):
        args = (xc, yc, None, w, None, None, None, None, None)
        assert plan(BERN_LOGITS, *args)["mem_r"] == mem
        want = ["x", "y"] + ([] if w is None else ["w"])
        for reduction in (SUM, PER_SAMPLE, ELEMENTWISE):
            loss, _, _, grads = check_case(BERN_LOGITS, args, reduction=reduction, want=want)
            if mem:
                assert grads["x"].is_contiguous(memory_format=cl)
                if reduction == ELEMENTWISE:
                    assert loss.is_contiguous(memory_format=cl)


def test_matches_torch_functional():
    """The float32 sums agree with torch's own float32 results to ~1e-6."""
    gen = torch.Generator().manual_seed(17)
    B = 16
    x = torch.randn(B, 3, 32, 32, generator=gen) * 5
    y = torch.rand(B, 3, 32, 32, generator=gen)
    mu = torch.randn(B, 64, generator=gen)
    lv = torch.randn(B, 64, generator=gen)
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, reduction=BATCHMEAN, want=["x"])
    t_nll = F.binary_cross_entropy_with_logits(x, y, reduction="sum") / B
    t_kl = (-0.5 * (1 + lv - mu**2 - lv.exp())).sum() / B
    assert abs(nll.item() / t_nll.item() - 1) < 1e-6
    assert abs(kl.item() / t_kl.item() - 1) < 1e-6
    xr = x.clone().requires_grad_()
    (F.binary_cross_entropy_with_logits(xr, y, reduction="sum") / B).backward()
    torch.testing.assert_close(grads["x"], xr.grad, rtol=1e-5, atol=1e-8)
    # the elementwise drop-in, with weight and pos_weight
    w, pw = torch.rand(3, 1, 1, generator=gen) + 0.5, torch.rand(32, generator=gen) + 0.5
    le, *_ = run(BERN_LOGITS, x, y, w=w, pw=pw, reduction=ELEMENTWISE)
    torch.testing.assert_close(le, F.binary_cross_entropy_with_logits(
        x, y, weight=w, pos_weight=pw, reduction="none"), rtol=1e-5, atol=1e-5)
    _, nll, _, _ = run(BERN_LOGITS, x, y, w=w, pw=pw, reduction=MEAN)
    t = F.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw, reduction="mean")
    assert abs(nll.item() / t.item() - 1) < 1e-6
    # probabilities and Gaussian
    p = torch.rand(B, 100, generator=gen) * 0.98 + 0.01
    yp = y.reshape(B, -1)[:, :100].contiguous()
    _, nll, _, _ = run(BERN_PROBS, p, yp)
    t = F.binary_cross_entropy(p, yp, reduction="sum")
    assert abs(nll.item() / t.item() - 1) < 1e-6
    _, nll, _, _ = run(BERN_PROBS, p, yp, reduction=MEAN)
    assert abs(nll.item() / F.binary_cross_entropy(p, yp).item() - 1) < 1e-6
    m, tg, s = (torch.randn(B, 50, generator=gen) for _ in range(3))
    _, nll, _, _ = run(GAUSS, m, tg, s, full=True)
    t = F.gaussian_nll_loss(m, tg, s.exp(), full=True, reduction="sum", eps=0)
    assert abs(nll.item() / t.item() - 1) < 1e-6


# ---------------------------------------------------------------------------------------------
# Accuracy of the vector math over the whole input range
# ---------------------------------------------------------------------------------------------
def bce_logits64(z, t):
    """(1-t) z + softplus(-z) in float64 without cancelling the log1p(exp(-|z|)) term."""
    z = z.double()
    return ((1 - t) * z + (-z).clamp(min=0)) + torch.log1p(torch.exp(-z.abs()))


def _ulp_err(actual, exact):
    a = actual.double()
    e32 = exact.float()
    ulp = (torch.nextafter(e32.abs(), torch.tensor(float("inf"))) - e32.abs()).double()
    return ((a - exact) / ulp).abs()


@pytest.mark.parametrize("pos_weight", [None, 3.0])
@pytest.mark.parametrize("target", [0.0, 1.0])
def test_softplus_sigmoid_accuracy_sweep(target, pos_weight):
    """Binary targets, logits in [-84, 84] (the bulk of a trained model's pixels are confident):
    the loss and the logits gradient keep their relative precision everywhere, within 3 and 4
    ulp of float32 (measured: 2.5 and 3.4), even where they are tiny (sigmoid(z) - y is formed
    without subtracting numbers close to 1)."""
    z = torch.cat([torch.linspace(-84, 84, 400_003), torch.logspace(-30, 1.9, 20001),
                   -torch.logspace(-30, 1.9, 20001)]).reshape(1, -1)
    y = torch.full_like(z, target)
    pw = None if pos_weight is None else torch.tensor([pos_weight])
    loss, _, _, grads = run(BERN_LOGITS, z, y, pw=pw, reduction=ELEMENTWISE, want=["x"])
    zd = z.double()
    exact = oracle(BERN_LOGITS, zd, y.double(), None, None, None if pw is None else pw.double(),
                   None, None, None, None, False)["l"]
    err = _ulp_err(loss, exact)
    assert err.max().item() <= 3.0, (err.max().item(), zd.reshape(-1)[err.argmax()].item())
    e = torch.exp(-zd.abs())
    r = 1 / (1 + e)
    sig_minus_y = torch.where(zd >= 0, (1 - target) - e * r, e * r - target)
    one_minus_sig = torch.where(zd >= 0, e * r, r)
    eg = sig_minus_y - ((pos_weight or 1.0) - 1) * target * one_minus_sig
    gerr = _ulp_err(grads["x"], eg)
    assert gerr.max().item() <= 4.0, (gerr.max().item(), zd.reshape(-1)[gerr.argmax()].item())


def test_extreme_logits_clamp():
    """|z| up to 100: no NaN; exp(-|z|) stops at exp(-84.5) instead of going subnormal, so
    the loss and sigmoid are off by < 2.1e-37 absolutely there."""
    z = torch.tensor([[-100.0, -90.0, -84.0, -85.0, 84.0, 85.0, 90.0, 100.0, 0.0, -0.0]])
    for target in (0.0, 1.0):
        y = torch.full_like(z, target)
        loss, _, _, grads = run(BERN_LOGITS, z, y, reduction=ELEMENTWISE, want=["x", "y"])
        zd = z.double()
        exact = bce_logits64(zd, target)
        assert torch.isfinite(loss).all()
        assert ((loss.double() - exact).abs() <= 2.1e-37 + 1e-7 * exact.abs()).all()
        assert ((grads["x"].double() - (torch.sigmoid(zd) - target)).abs() <= 1e-7).all()


def test_exp_expm1_accuracy_gaussian_kl():
    """Gaussian NLL with log-variances in [-30, 30] and KL with log-variance gaps in [-30, 30]."""
    s = torch.linspace(-30, 30, 100_001, dtype=torch.float32)
    m = torch.zeros_like(s)
    y = torch.full_like(s, 0.75)
    loss, _, _, grads = run(GAUSS, m.reshape(1, -1), y.reshape(1, -1), s.reshape(1, -1),
                            reduction=ELEMENTWISE, want=["x", "rlv"])
    sd = s.double()
    exact = 0.5 * (sd + 0.5625 * torch.exp(-sd))
    err = _ulp_err(loss.reshape(-1), exact)
    # 0.5*(s + q) cancels when s ~ -q: measure relative to the terms
    rel = (loss.reshape(-1).double() - exact).abs() / (0.5 * (sd.abs() + 0.5625 * torch.exp(-sd)))
    assert ((err <= 3.0) | (rel <= 1.2e-7)).all()
    gx = grads["x"].reshape(-1).double()
    assert _ulp_err(gx, -0.75 * torch.exp(-sd)).max() <= 3.0
    # KL: expm1(d) - d accurate even for tiny d (no cancellation), and for |d| up to 30.
    # One element per row, so the per-row KL is the element's own value.
    d = torch.cat([torch.linspace(-30, 30, 100_001), torch.logspace(-20, 0, 2001),
                   -torch.logspace(-20, 0, 2001)])
    mu = torch.zeros(d.numel(), 1)
    _, _, kl, grads = run(NONE, mu=mu, lv=d.reshape(-1, 1), reduction=PER_SAMPLE, want=["lv"])
    dd = d.double()
    series = dd * dd / 2 + dd**3 / 6 + dd**4 / 24 + dd**5 / 120
    exact = 0.5 * torch.where(dd.abs() < 1e-3, series, torch.expm1(dd) - dd)
    err = _ulp_err(kl, exact)
    assert err.max().item() <= 8.0, (err.max().item(), d[err.argmax()].item())
    assert (err[dd.abs() <= 0.34] <= 3.0).all()
    assert _ulp_err(grads["lv"].reshape(-1), 0.5 * torch.expm1(dd)).max() <= 3.0


def test_kl_expm1_finite_near_float_max():
    """Posterior log-variance in [88.38, 88.72] (float32): expm1(d) is still finite (up to
    ln(FLT_MAX) = 88.7228) although 2^n of its range reduction (n = 128) is not; the KL and
    its gradients stay finite and float32-accurate (the old kernel gave NaN there). Past
    ln(FLT_MAX) the KL overflows to inf, never NaN."""
    d = torch.linspace(88.38, 88.72, 20001)
    n = d.numel()
    mu = torch.zeros(n, 1)
    plv = torch.zeros(n, 1)
    _, _, kl, grads = run(NONE, mu=mu, lv=d.reshape(-1, 1), plv=plv, reduction=PER_SAMPLE,
                          want=["lv", "plv"])
    dd = d.double()
    em1 = torch.expm1(dd)
    for name, got, exact in (("kl", kl, 0.5 * (em1 - dd)), ("lv", grads["lv"], 0.5 * em1),
                             ("plv", grads["plv"], -0.5 * em1)):
        got = got.reshape(-1)
        assert torch.isfinite(got).all(), name
        err = _ulp_err(got, exact)
        assert err.max().item() <= 4.0, (name, err.max().item(), d[err.argmax()].item())
    # the same values summed in one total: finite too (2e4 of them overflow float32: inf)
    _, _, kl, _ = run(NONE, mu=mu[:1], lv=d[-1:].reshape(1, 1))
    assert torch.isfinite(kl) and abs(kl.item() / (0.5 * (em1[-1] - dd[-1])).item() - 1) < 1e-6
    # beyond ln(FLT_MAX): inf, not NaN
    big = torch.tensor([[88.73], [88.9], [89.0], [100.0]])
    _, _, kl, grads = run(NONE, mu=torch.zeros(4, 1), lv=big, reduction=PER_SAMPLE, want=["lv"])
    assert (kl == math.inf).all() and (grads["lv"] == math.inf).all()


# ---------------------------------------------------------------------------------------------
# NaN / Inf, limits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS, GAUSS], ids=["logits", "probs", "gauss"])
def test_nan_propagates(kind):
    gen = torch.Generator().manual_seed(18)
    x, y, mu = make_inputs(kind, (2, 40), (2, 8), torch.float32, gen)
    rlv = torch.zeros(2, 40) if kind == GAUSS else None
    x[1, 17] = float("nan")
    loss, nll, kl, grads = run(kind, x, y, rlv, mu=mu, lv=torch.zeros(2, 8), reduction=PER_SAMPLE,
                               want=["x", "y"])
    assert not torch.isnan(nll[0]) and torch.isnan(nll[1]) and torch.isnan(loss[1])
    assert not torch.isnan(kl).any()
    assert torch.isnan(grads["x"][1, 17]) and torch.isnan(grads["y"][1, 17])
    g = grads["x"].clone()
    g[1, 17] = 0
    assert torch.isfinite(g).all()
    # NaN in the KL stream and in a parameter
    mu[0, 3] = float("nan")
    lv = torch.zeros(2, 8)
    lv[1, 5] = float("nan")
    _, _, kl, grads = run(NONE, mu=mu, lv=lv, reduction=PER_SAMPLE, want=["mu", "lv"])
    assert torch.isnan(kl).all()
    assert torch.isnan(grads["mu"][0, 3]) and torch.isnan(grads["lv"][1, 5])
    assert torch.isnan(grads["mu"]).sum() == 1 and torch.isnan(grads["lv"]).sum() == 1
    # NaN in a broadcast parameter reaches its summed gradient
    plv = torch.zeros(8)
    plv[2] = float("nan")
    _, _, kl, grads = run(NONE, mu=mu.nan_to_num(), plv=plv, reduction=SUM, want=["plv"])
    assert torch.isnan(kl) and torch.isnan(grads["plv"]).tolist() == [i == 2 for i in range(8)]
    # elementwise: NaN only where the input is NaN
    le, *_ = run(kind, x, y, rlv, reduction=ELEMENTWISE)
    assert torch.isnan(le).sum() == 1 and torch.isnan(le[1, 17])


def test_inf_and_limits():
    inf = float("inf")
    # finite logits of any size: torch's results ((1-y) z + softplus(-z))
    z = torch.tensor([[1e30, -1e30, 1e30, -1e30, 100.0, -100.0, 88.0, -88.0]])
    y = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5]])
    le, _, _, grads = run(BERN_LOGITS, z, y, reduction=ELEMENTWISE, want=["x"])
    torch.testing.assert_close(le, F.binary_cross_entropy_with_logits(z, y, reduction="none"))
    torch.testing.assert_close(grads["x"], torch.sigmoid(z) - y)
    # probabilities at the edges: clamped logs give 100 per element, no inf
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    le, _, _, grads = run(BERN_PROBS, p, t, reduction=ELEMENTWISE, want=["x"])
    torch.testing.assert_close(le, F.binary_cross_entropy(p, t, reduction="none"))
    assert torch.isfinite(grads["x"]).all()
    # Gaussian: exp(-s) overflows to inf for s < -88.7, loss follows
    le, *_ = run(GAUSS, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[-100.0, 100.0]]),
                 reduction=ELEMENTWISE)
    assert le[0, 0] == inf and le[0, 1] == 50.0
    # KL: huge log-variance gap overflows to inf, not NaN; infinite log-variances (and
    # prior log-variances) give what the unfused formula gives
    _, _, kl, _ = run(NONE, mu=torch.zeros(1, 2), lv=torch.tensor([[100.0, -100.0]]))
    assert kl.item() == inf
    lv = torch.tensor([[inf, -inf, 0.0, 0.0, 1.0]])
    plv = torch.tensor([[0.0, 0.0, inf, -inf, 0.0]])
    mu = torch.tensor([[0.5, 0.5, 0.5, 0.5, inf]])
    for dtype in (torch.float32, torch.float64):
        m, v, pv = (t.to(dtype).reshape(-1, 1) for t in (mu, lv, plv))  # one element per row
        _, _, kl, grads = run(NONE, mu=m, lv=v, plv=pv, reduction=PER_SAMPLE,
                              want=["mu", "lv", "plv"])
        o = oracle(NONE, None, None, None, None, None, m, v, None, pv, False)
        torch.testing.assert_close(kl, o["k"].reshape(-1).to(dtype), equal_nan=True)
        for name in ("mu", "lv", "plv"):
            torch.testing.assert_close(grads[name], o[name].to(dtype), equal_nan=True)


@pytest.mark.parametrize("pos_weight", [None, "scalar", "full"])
def test_infinite_logits(pos_weight):
    """z = -inf with y > 0 and z = +inf with y < 1 have an infinite loss: the kernel gives +inf
    there (not inf - inf = NaN), with and without pos_weight; the logits gradient stays the
    finite limit of sigmoid(z) - y (with pos_weight: (1-y) - lw (1 - sigmoid(z)))."""
    inf = float("inf")
    z = torch.tensor([[-inf, -inf, -inf, inf, inf, inf]])
    y = torch.tensor([[0.0, 0.25, 1.0, 0.0, 0.75, 1.0]])
    infinite = torch.tensor([[False, True, True, True, True, False]])
    pw = {None: None, "scalar": torch.tensor(2.5),
          "full": torch.tensor([[3.0, 0.5, 2.0, 4.0, 1.5, 0.25]])}[pos_weight]
    le, _, _, grads = run(BERN_LOGITS, z, y, pw=pw, reduction=ELEMENTWISE, want=["x"])
    assert (le[infinite] == inf).all(), le
    # the other two are 0 in the limit; the unfused formula (and torch) give NaN (0 * inf)
    assert ((le[~infinite] == 0) | torch.isnan(le[~infinite])).all(), le
    pwd = torch.ones(1, 6, dtype=torch.float64) if pw is None else pw.double().expand(1, 6)
    sig = torch.sigmoid(z.double())
    yd = y.double()
    eg = (1 - yd) - (1 + (pwd - 1) * yd) * (1 - sig)
    assert_close(grads["x"], eg, 1e-6, 1e-36, "grad x")
    # reduced: an infinite term makes the sum infinite
    for reduction in (SUM, MEAN, PER_SAMPLE):
        _, nll, _, _ = run(BERN_LOGITS, z[:, 1:5], y[:, 1:5],
                           pw=pw if pw is None or pw.dim() == 0 else pw[:, 1:5],
                           reduction=reduction)
        assert (nll == inf).all()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def _bits(t):
    return t.reshape(-1).contiguous().view(torch.uint8)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _runs_over_threads(fn, threads=(1, 2, 2, 3)):
    old = torch.get_num_threads()
    try:
        out = []
        for n in threads:
            torch.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(old)


def test_deterministic_runs_and_threads():
    gen = torch.Generator().manual_seed(19)
    shape_r, shape_k = (6, 3, 61, 67), (6, 129)  # ~74K elements: several chunks per row
    x, y, mu = make_inputs(BERN_LOGITS, shape_r, shape_k, torch.float32, gen)
    lv = torch.randn(shape_k, generator=gen)
    w = torch.rand(3, 1, 1, generator=gen) + 0.5  # per-channel: its gradient is summed
    for reduction in (SUM, BATCHMEAN, PER_SAMPLE):
        runs = _runs_over_threads(lambda: run(BERN_LOGITS, x, y, None, w, None, mu, lv,
                                              reduction=reduction,
                                              want=["x", "y", "w", "mu", "lv"]))
        ref = runs[0]
        for other in runs[1:]:
            for a, b in zip(ref[:3], other[:3]):
                assert _same_bits(a, b)
            for k in ref[3]:
                assert _same_bits(ref[3][k], other[3][k]), k


def test_deterministic_threads_scalar_parameter_gradients():
    """Scalar broadcast parameters (w, pw, rlv, plv of shape () or (1,)) and a per-channel rlv,
    SUM reduction: the summed gradients must be the same bits for any thread count, as every
    other output is
    (csrc/run.cpp sums them in fixed pieces; torch's own sum split them by thread count)."""
    gen = torch.Generator().manual_seed(25)
    x, y, mu = make_inputs(BERN_LOGITS, (6, 3, 61, 67), (6, 20011), torch.float32, gen)
    g, t, _ = make_inputs(GAUSS, (6, 3, 61, 67), None, torch.float32, gen)
    w, pw, rlv, plv = torch.tensor(0.7), torch.tensor([1.5]), torch.tensor(0.2), torch.tensor(-0.1)

    def both():
        a = run(BERN_LOGITS, x, y, None, w, pw, mu, None, None, plv, want=["w", "pw", "plv"])
        b = run(GAUSS, g, t, rlv, want=["rlv"])
        # a per-channel (C, 1, 1) log-variance: summed in runs of H * W elements
        c = run(GAUSS, g, t, torch.tensor([0.2, 0.1, -0.3]).view(3, 1, 1), want=["rlv"])
        return {**a[3], **b[3], "rlv_channel": c[3]["rlv"]}

    runs = _runs_over_threads(both, threads=(1, 2, 3, 4))
    bad = {k for r in runs[1:] for k in r if not _same_bits(runs[0][k], r[k])}
    assert not bad, sorted(bad)


def test_inputs_never_written():
    gen = torch.Generator().manual_seed(20)
    x, y, mu = make_inputs(GAUSS, (2, 50), (2, 6), torch.float32, gen)
    rlv, lv = torch.randn(2, 50, generator=gen), torch.randn(2, 6, generator=gen)
    pmu = torch.randn(6, generator=gen)
    saved = [t.clone() for t in (x, y, rlv, mu, lv, pmu)]
    run(GAUSS, x, y, rlv, mu=mu, lv=lv, pmu=pmu, want=["x", "y", "rlv", "mu", "lv", "pmu"])
    for a, b in zip((x, y, rlv, mu, lv, pmu), saved):
        assert torch.equal(a, b)
    # nor by the backward's in-place scaling
    leaves = [t.clone().requires_grad_() for t in (x, y, rlv, mu, lv, pmu)]
    for reduction, g in ((SUM, torch.tensor(2.5)), (PER_SAMPLE, torch.tensor([0.5, 3.0]))):
        loss, _, _ = OPS.fused_loss(*op_args(GAUSS, *leaves[:3], None, None, *leaves[3:], None,
                                             reduction=reduction, beta=0.3))
        loss.backward(g)
        for a, b in zip(leaves, saved):
            assert torch.equal(a.detach(), b)


# ---------------------------------------------------------------------------------------------
# Backward: the autograd node of fused_loss scales the stored gradients
# ---------------------------------------------------------------------------------------------
def fused_loss_saving(*args):
    """fused_loss, and the tensors its autograd node saves (the stored gradient buffers, in slot
    order, then a tensor beta and the KL)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = OPS.fused_loss(*args)
    return out, saved


def _leaves(*ts):
    return [t.clone().requires_grad_() if is_tensor(t) and t.is_floating_point() else t
            for t in ts]


def test_backward_coefficient_one_touches_nothing():
    """A grad_output that makes a stream's coefficient exactly 1 (g = 1; g_loss + g_nll = 1;
    beta * g_loss + g_kl = 1) does not touch its buffers: the stored buffer becomes .grad as is
    (same memory; a signalling NaN planted in it is not quieted, as any multiply would)."""
    gen = torch.Generator().manual_seed(26)
    x0, y, mu0 = make_inputs(BERN_LOGITS, (4, 100), (4, 7), torch.float32, gen)

    def forward(beta):
        x, mu = _leaves(x0, mu0)
        (loss, nll, kl), saved = fused_loss_saving(*op_args(BERN_LOGITS, x, y, mu=mu, beta=beta))
        bx, bmu = saved
        ref = (bx.clone(), bmu.clone())
        ptrs = (bx.data_ptr(), bmu.data_ptr())
        with torch.no_grad():
            for b in (bx, bmu):
                b.view(-1).view(torch.int32)[0] = SNAN
        return x, mu, (loss, nll, kl), ref, ptrs

    def untouched(g, ref, ptr):
        return (g.data_ptr() == ptr and g.view(-1).view(torch.int32)[0].item() == SNAN
                and torch.equal(g.view(-1)[1:], ref.view(-1)[1:]))

    # g = 1, both streams
    x, mu, (loss, _, _), ref, ptrs = forward(1.0)
    loss.backward()
    assert untouched(x.grad, ref[0], ptrs[0]) and untouched(mu.grad, ref[1], ptrs[1])
    # g_loss + g_nll = 0.25 + 0.75 = 1; KL: beta * g_loss = 4 * 0.25 = 1
    x, mu, (loss, nll, _), ref, ptrs = forward(4.0)
    torch.autograd.backward([loss, nll], [torch.tensor(0.25), torch.tensor(0.75)])
    assert untouched(x.grad, ref[0], ptrs[0]) and untouched(mu.grad, ref[1], ptrs[1])
    # KL coefficient 0.5 * 2 = 1, reconstruction 2: only the reconstruction buffer is scaled
    x, mu, (loss, _, _), ref, ptrs = forward(0.5)
    loss.backward(torch.tensor(2.0))
    assert untouched(mu.grad, ref[1], ptrs[1])
    assert x.grad.data_ptr() == ptrs[0]  # scaled in place, not copied
    assert x.grad.view(-1).view(torch.int32)[0].item() != SNAN  # touched: quieted
    torch.testing.assert_close(x.grad.view(-1)[1:], 2 * ref[0].view(-1)[1:], rtol=0, atol=0)


def test_backward_rows_scaled_per_row():
    """Per-sample reduction, per-row grad_outputs: row r of the reconstruction buffers times
    g_loss[r] + g_nll[r], of the KL buffers times beta g_loss[r] + g_kl[r]; a row whose
    coefficient is exactly 1 is not touched."""
    gen = torch.Generator().manual_seed(27)
    rows, L, Lk = 5, 37, 3
    x0, y, mu0 = make_inputs(BERN_LOGITS, (rows, L), (rows, Lk), torch.float32, gen)
    x, mu = _leaves(x0, mu0)
    beta = 2.0
    (loss, nll, kl), (bx, bmu) = fused_loss_saving(
        *op_args(BERN_LOGITS, x, y, mu=mu, reduction=PER_SAMPLE, beta=beta))
    with torch.no_grad():
        bx[:, 0].view(torch.int32).fill_(SNAN)
    before, bmu_before = bx.clone(), bmu.clone()
    del bx, bmu
    g_loss = torch.tensor([1.0, 2.0, 1.0, -1.0, 0.5])
    g_nll = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    g_kl = torch.tensor([0.0, 1.0, 0.5, 2.0, 0.0])
    torch.autograd.backward([loss, nll, kl], [g_loss, g_nll, g_kl])
    cr = g_loss + g_nll
    ck = beta * g_loss + g_kl
    for r in range(rows):
        if cr[r] == 1:
            assert torch.equal(x.grad[r].view(torch.int32), before[r].view(torch.int32)), r
        else:
            assert x.grad[r, 0].view(torch.int32) != SNAN
            torch.testing.assert_close(x.grad[r, 1:], cr[r] * before[r, 1:])
    torch.testing.assert_close(mu.grad, ck[:, None] * bmu_before)


def _grad_outputs(reduction, B, x_shape, acc, gen):
    """(g_loss, g_nll, g_kl) for a reduction: numbers, per-row vectors (rows 0 and 3 with
    coefficient exactly 1), or an elementwise tensor of x's shape (the loss alone)."""
    if reduction == ELEMENTWISE:
        return torch.randn(x_shape, generator=gen, dtype=torch.float64).to(acc), None, None
    if reduction == PER_SAMPLE:
        g_loss = torch.randn(B, generator=gen, dtype=torch.float64).to(acc)
        g_nll = torch.randn(B, generator=gen, dtype=torch.float64).to(acc)
        g_kl = torch.randn(B, generator=gen, dtype=torch.float64).to(acc)
        g_loss[0], g_nll[0] = 1.0, 0.0
        g_loss[3], g_nll[3] = 0.75, 0.25
        return g_loss, g_nll, g_kl
    return (torch.tensor(2.5, dtype=acc), torch.tensor(-0.25, dtype=acc),
            torch.tensor(0.5, dtype=acc))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=RED_IDS)
def test_backward_scaled(reduction, dtype):
    """loss/nll/kl.backward(g) give the oracle's gradients times the coefficients: g_loss + g_nll
    (reconstruction) and beta * g_loss + g_kl (KL), scalar, per row or elementwise; full-size
    buffers scaled in place (bf16 in bf16; float16 in its float32 buffer, then cast), broadcast
    parameters' summed buffers in plain torch."""
    gen = torch.Generator().manual_seed(40 + 4 * reduction + DTYPES.index(dtype))
    B, shape_r, shape_k = 4, (4, 3, 5, 7), (4, 11)
    elem = reduction == ELEMENTWISE
    x0, y, mu0 = make_inputs(BERN_LOGITS, shape_r, None if elem else shape_k, dtype, gen)
    w0 = (torch.rand(3, 1, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    pw0 = (torch.rand(shape_r, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    lv0 = None if elem else (torch.randn(shape_k, generator=gen) * 0.5).to(dtype)
    pmu0 = None if elem else torch.randn(shape_k[1:], generator=gen).to(dtype)
    beta = 0.3
    x, w, pw, mu, lv, pmu = _leaves(x0, w0, pw0, mu0, lv0, pmu0)
    args = (x, y, None, w, pw, mu, lv, pmu, None)
    loss, nll, kl = OPS.fused_loss(*op_args(BERN_LOGITS, *args, reduction=reduction, beta=beta))
    acc = loss.dtype
    g_loss, g_nll, g_kl = _grad_outputs(reduction, B, shape_r, acc, gen)
    if elem:
        loss.backward(g_loss)
    else:
        torch.autograd.backward([loss, nll, kl], [g_loss, g_nll, g_kl])
    # the oracle, with the coefficients
    o = oracle(BERN_LOGITS, x0, y, None, w0, pw0, mu0, lv0, pmu0, None, False)
    sr, sk = scales_of(BERN_LOGITS, x0, mu0, reduction)

    def coef(v, ndim):
        v = v.double()
        return v.reshape((-1,) + (1,) * (ndim - 1)) if v.dim() == 1 else v

    cr = coef(g_loss, len(shape_r)) + (0 if elem else coef(g_nll, len(shape_r)))
    ck = None if elem else beta * coef(g_loss, 2) + coef(g_kl, 2)
    compute = acc_of(args)
    for leaf, p0 in ((x, x0), (w, w0), (pw, pw0), (mu, mu0), (lv, lv0), (pmu, pmu0)):
        if leaf is None:
            continue
        name = NAMES[[id(a) for a in args].index(id(leaf))]
        recon = name in RECON_SLOTS
        e = ((sr * cr) if recon else (sk * ck)) * o[name]
        e_sum, e_abs = e.sum_to_size(p0.shape), e.abs().sum_to_size(p0.shape)
        g = leaf.grad
        assert g is not None and g.shape == p0.shape and g.dtype == p0.dtype, name
        r = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, tol(compute)[1])
        assert_close(g, e_sum, r, r * float(e_abs.max()) + 1e-30, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_missing_grad_outputs_count_zero(dtype):
    """Only kl gets a grad_output: the KL coefficient is g_kl alone, the reconstruction stream
    gets no gradient at all; only nll: the KL inputs get none."""
    gen = torch.Generator().manual_seed(28)
    x0, y, mu0 = make_inputs(GAUSS, (4, 9), (4, 5), dtype, gen)
    x, mu = _leaves(x0, mu0)
    _, _, kl = OPS.fused_loss(*op_args(GAUSS, x, y, mu=mu, beta=0.3))
    kl.backward(torch.tensor(3.0, dtype=dtype))
    assert x.grad is None
    torch.testing.assert_close(mu.grad, 3 * mu0)
    x, mu = _leaves(x0, mu0)
    _, nll, _ = OPS.fused_loss(*op_args(GAUSS, x, y, mu=mu, beta=0.3, reduction=PER_SAMPLE))
    g = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=dtype)
    nll.backward(g)
    assert mu.grad is None
    torch.testing.assert_close(x.grad, g[:, None] * (x0 - y))


def test_backward_beta_tensor_and_retain_graph():
    """A 0-d tensor beta: the KL coefficient is beta_t * g_loss + g_kl and beta's gradient is
    sum(g_loss * kl). With retain_graph the stored buffers stay intact, so a second backward
    gives the same gradients again (accumulated)."""
    gen = torch.Generator().manual_seed(29)
    x0, y, mu0 = make_inputs(BERN_LOGITS, (3, 20), (3, 6), torch.float32, gen)
    lv0 = torch.randn(3, 6, generator=gen)
    x, mu, lv = _leaves(x0, mu0, lv0)
    beta_t = torch.tensor(0.4, requires_grad=True)
    args = op_args(BERN_LOGITS, x, y, mu=mu, lv=lv, beta_t=beta_t, reduction=PER_SAMPLE)
    (loss, nll, kl), saved = fused_loss_saving(*args)
    bx, bmu, blv = (t.clone() for t in saved[:3])
    del saved
    g_loss = torch.tensor([2.0, -1.0, 0.5])
    g_kl = torch.tensor([0.0, 1.0, 3.0])
    for k in (1, 2):
        torch.autograd.backward([loss, kl], [g_loss, g_kl], retain_graph=True)
        cr, ck = g_loss[:, None], 0.4 * g_loss[:, None] + g_kl[:, None]
        torch.testing.assert_close(x.grad, k * cr * bx)
        torch.testing.assert_close(mu.grad, k * ck * bmu)
        torch.testing.assert_close(lv.grad, k * ck * blv)
        torch.testing.assert_close(beta_t.grad, k * (g_loss * kl.detach()).sum())
    o = oracle(BERN_LOGITS, x0, y, None, None, None, mu0, lv0, None, None, False)
    assert_close(bx, o["x"], 1e-5, 1e-7, "stored x buffer")
    assert_close(kl.detach(), o["k"].sum(1), 2e-6, 1e-6, "kl")


def test_backward_matches_autograd():
    """fused_loss (per sample, float64) then backward with a random grad_output equals
    autograd of the float64 torch formulas."""
    gen = torch.Generator().manual_seed(23)
    B = 4
    x0, y, mu0 = make_inputs(BERN_LOGITS, (B, 2, 9, 9), (B, 6), torch.float64, gen)
    lv0 = torch.randn(B, 6, generator=gen, dtype=torch.float64)
    w0 = torch.rand(2, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    x, mu, lv, w = _leaves(x0, mu0, lv0, w0)
    loss, _, _ = OPS.fused_loss(*op_args(BERN_LOGITS, x, y, w=w, mu=mu, lv=lv,
                                         reduction=PER_SAMPLE, beta=0.5))
    g_loss = torch.randn(B, generator=gen, dtype=torch.float64)
    loss.backward(g_loss)
    xr, mr, lr, wr = _leaves(x0, mu0, lv0, w0)
    nll = (wr * F.binary_cross_entropy_with_logits(xr, y, reduction="none")).sum((1, 2, 3))
    kl = (0.5 * (torch.expm1(lr) - lr + mr**2)).sum(1)
    ((nll + 0.5 * kl) * g_loss).sum().backward()
    for a, b in ((x, xr), (mu, mr), (lv, lr), (w, wr)):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# Argument checks and availability
# ---------------------------------------------------------------------------------------------
def test_available_and_load():
    assert _ext.module is not None and _ext.reason == ""
    from vae_fast import _C

    assert _ext.module is _C
    assert _C.cpu_capability() in ("avx512", "avx2", "default")
    assert hasattr(OPS, "fused_fwd") and hasattr(OPS, "fused_loss") and hasattr(OPS, "plan")
    calls = _C.kernel_calls()
    run(BERN_LOGITS, torch.randn(2, 3), torch.rand(2, 3))
    assert _C.kernel_calls() == calls + 1


_X, _Y = torch.randn(2, 10), torch.rand(2, 10)
_MU = torch.randn(2, 4)
BAD = {
    # what only a direct caller of the op can get wrong: check_structure
    "api": (dict(api=len(Api)), ValueError, f"unknown api code {len(Api)}"),
    "kind": (dict(kind=len(Likelihood)), ValueError, f"unknown kind code {len(Likelihood)}"),
    "kind_negative": (dict(kind=-1), ValueError, "unknown kind code -1"),
    "reduction": (dict(reduction=5), ValueError, "unknown reduction code 5"),
    "backend": (dict(backend=2), ValueError, "unknown backend code 2"),
    "kind0_with_x": (dict(kind=NONE, mu=_MU), ValueError,
                     r"kind 0 \(no reconstruction term\) takes no x, y, rlv, w or pw"),
    "rlv_bernoulli": (dict(rlv=torch.zeros(10)), ValueError,
                      "rlv is only read by the Gaussian likelihood"),
    "w_gaussian": (dict(kind=GAUSS, w=torch.ones(10)), ValueError,
                   "w is only read by the Bernoulli likelihoods"),
    "pw_probs": (dict(kind=BERN_PROBS, x=_Y, pw=torch.ones(10)), ValueError,
                 "pw is only read by the Bernoulli likelihood from logits"),
    "lv_without_mu": (dict(lv=torch.zeros(2, 4)), ValueError,
                      "lv, pmu and plv belong to the KL term, which needs mu"),
    "plv_without_mu": (dict(plv=torch.zeros(4)), ValueError, "which needs mu"),
    "no_term": (dict(kind=NONE, x=None, y=None, beta_t=torch.tensor(1.0)), ValueError,
                "neither a reconstruction nor a KL term"),
    "elementwise_with_mu": (dict(reduction=ELEMENTWISE, mu=_MU), ValueError,
                            "the elementwise reduction has a reconstruction term and no KL"),
    "elementwise_kl_only": (dict(kind=NONE, x=None, y=None, mu=_MU, reduction=ELEMENTWISE),
                            ValueError, "the elementwise reduction"),
    "grad_of_absent": (dict(needs=1 << 3), ValueError,
                       "a gradient of w is asked for, but w is not a tensor"),
    "grad_of_absent_kl": (dict(needs=1 << 5), ValueError, "a gradient of mu is asked for"),
    "needs_range": (dict(needs=1 << 9), ValueError,
                    "needs must be a bit mask of the nine slots, got 512"),
    "beta_t_1d": (dict(beta_t=torch.ones(1)), TypeError,
                  r"beta must be a number or a 0-d floating tensor, got a tensor of dtype "
                  r"torch.float32 and shape \(1,\)"),
    "beta_t_int": (dict(beta_t=torch.tensor(1)), TypeError, "dtype torch.int64"),
    # the tensor checks, with the raw api's slot names
    "x_missing": (dict(x=None), TypeError, "x must be a torch.Tensor, got NoneType"),
    "y_shape": (dict(y=_Y[:, :5]), ValueError,
                r"y must have the shape of x: got y \(2, 5\) and x \(2, 10\)"),
    "x_int": (dict(x=_X.long()), TypeError,
              "x must be a floating point tensor, got dtype torch.int64"),
    "y_int": (dict(y=_Y.long()), TypeError, "y must be a floating point or bool tensor"),
    "gauss_bool_y": (dict(kind=GAUSS, y=_Y > 0.5), TypeError, "y must be a floating point tensor"),
    "x_0d": (dict(x=torch.tensor(1.0), y=torch.tensor(1.0)), ValueError,
             "x must have a batch dimension"),
    "w_broadcast": (dict(w=torch.ones(3)), ValueError,
                    r"w of shape \(3,\) does not broadcast to the shape of x \(2, 10\)"),
    "w_bigger": (dict(w=torch.ones(1, 2, 10)), ValueError, "does not broadcast"),
    "w_int": (dict(w=torch.ones(10, dtype=torch.int32)), TypeError,
              "w must be a floating point tensor, got dtype torch.int32"),
    "batch": (dict(mu=torch.randn(3, 4)), ValueError,
              r"batch size of x \(2, 10\) differs from that of mu \(3, 4\)"),
    "device": (dict(y=_Y.to("meta")), ValueError,
               "all tensors must be on one device, got x on cpu, y on meta"),
    # dtypes the kernels do not read
    "x_float8": (dict(x=_X.to(torch.float8_e4m3fn)), NotImplementedError,
                 "x has dtype torch.float8_e4m3fn; the fused kernels read float16, bfloat16"),
    "pmu_float8": (dict(mu=_MU, pmu=torch.zeros(4).to(torch.float8_e5m2)), NotImplementedError,
                   "pmu has dtype torch.float8_e5m2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise(case):
    over, exc, match = BAD[case]
    base = dict(kind=BERN_LOGITS, x=_X, y=_Y, api=int(Api.RAW), reduction=SUM,
                backend=int(Backend.CPU))
    kw = {**base, **over}
    needs = kw.pop("needs", 0)
    kind = kw.pop("kind")
    args = op_args(kind, **kw)
    calls = _ext.module.kernel_calls()
    with pytest.raises(exc, match=match):
        OPS.fused_fwd(*args, needs)
    with pytest.raises(exc, match=match):  # the plan and the autograd op check the same
        OPS.plan(*args, needs)
    if needs == 0:
        with pytest.raises(exc, match=match):
            OPS.fused_loss(*args)
    assert _ext.module.kernel_calls() == calls  # nothing ran


def test_gradient_of_bool_target_raises():
    """Asking for the gradient of a bool target (only the raw op can) is refused by the
    structural checks, on the real and the Meta kernel, before any kernel runs."""
    before = _ext.module.kernel_calls()
    for y in (_Y > 0.5, (_Y > 0.5).to("meta")):
        x = _X if y.device.type == "cpu" else _X.to("meta")
        with pytest.raises(ValueError, match="a gradient of y is asked for, but y is not floating"):
            OPS.fused_fwd(*op_args(BERN_LOGITS, x, y), needs_of(["x", "y"]))
    assert _ext.module.kernel_calls() == before


def test_good_arguments_pass():
    """The base call of test_bad_arguments_raise runs (so each bad case fails for its reason)."""
    loss, nll, kl, grads = run(BERN_LOGITS, _X, _Y, want=["x", "y"])
    assert torch.isfinite(loss) and kl.item() == 0 and set(grads) == {"x", "y"}
    run(BERN_LOGITS, _X, _Y, mu=_MU, lv=torch.zeros(2, 4), want=["mu", "lv"])


# ---------------------------------------------------------------------------------------------
# Over 2^31 elements (int64 indexing); excluded from the default run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_more_than_2_31_elements():
    """2^31 + 3 * 2^20 + 17 elements: float16 logits (4.3 GB) and a bool target (2.1 GB).

    The logits repeat a short pattern, so the exact sum is known in closed form: the loss of
    each of the 256 distinct (z, y) pairs times its multiplicity."""
    n = 2**31 + 3 * 2**20 + 17
    period = 256
    pat_z = torch.linspace(-8, 8, period).half()
    pat_y = torch.arange(period) % 3 == 0
    reps = n // period
    rem = n - reps * period
    x = torch.empty(n, dtype=torch.float16)
    x[: reps * period].view(reps, period).copy_(pat_z)
    x[reps * period:] = pat_z[:rem]
    y = torch.empty(n, dtype=torch.bool)
    y[: reps * period].view(reps, period).copy_(pat_y)
    y[reps * period:] = pat_y[:rem]
    x[-1] = 3.0  # the very last element is read too (past 2^31)
    y[-1] = True
    rows = 1
    loss, nll, kl, _ = run(BERN_LOGITS, x.reshape(rows, n), y.reshape(rows, n), reduction=MEAN)
    zd, yd = pat_z.double(), pat_y.double()
    per = torch.logaddexp(torch.zeros_like(zd), zd) - yd * zd
    counts = torch.full((period,), float(reps), dtype=torch.float64)
    counts[:rem] += 1
    total = (per * counts).sum()
    # the last element was replaced
    total -= per[(n - 1) % period]
    total += math.log1p(math.exp(-3.0)) + 3.0 - 3.0
    expect = total / n
    assert abs(nll.item() / expect.item() - 1) < 1e-6, (nll.item(), expect.item())
    assert loss.item() == nll.item() and kl.item() == 0.0
