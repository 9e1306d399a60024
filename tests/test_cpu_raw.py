"""The fused C++ CPU kernels (vae_fast._cpu), called directly, against float64 torch formulas.

These tests bypass the public API: they check the raw `fused_forward` / `scale_` contract
(every likelihood, reduction, parameter read mode and dtype), the accuracy of the vector
math, NaN/Inf behaviour, determinism across runs and thread counts, and in-place scaling.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vae_fast import _cpu

from conftest import IN_CI  # noqa: E402

if not _cpu.available():
    if IN_CI:  # shipped but not building is a failure in CI, never a silent skip
        pytest.fail(f"the C++ CPU backend must build in CI: {_cpu.unavailable_reason()}", pytrace=False)
    pytest.skip(f"C++ CPU backend unavailable: {_cpu.unavailable_reason()}",
                allow_module_level=True)

TOTAL, ROWS, ELEMENTWISE = 0, 1, 2
BERN_LOGITS, BERN_PROBS, GAUSS = 1, 2, 3
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
NAMES = ("x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv")


# ---------------------------------------------------------------------------------------------
# Lowering helpers: how the core describes a parameter, and the float64 oracle
# ---------------------------------------------------------------------------------------------
def lower_param(p, shape):
    """(tensor or None, mode, inner, count, const) for a parameter read against `shape`."""
    if p is None:
        return None, 0, 1, 1, 0.0
    if isinstance(p, (int, float)):
        return None, 0, 1, 1, float(p)
    numel = math.prod(shape)
    if p.numel() == numel and p.dim() == len(shape):
        return p.contiguous(), 1, 1, 1, 0.0
    ps = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
    nz = [i for i, s in enumerate(ps) if s != 1]
    if not nz:
        return p.contiguous(), 2, 1, 1, 0.0
    a, b = nz[0], nz[-1] + 1
    assert all(ps[i] == shape[i] for i in range(a, b)), (ps, shape)
    return p.contiguous(), 2, math.prod(shape[b:]), math.prod(shape[a:b]), 0.0


def full64(p, shape, default):
    if p is None:
        return torch.full(shape, float(default), dtype=torch.float64)
    if isinstance(p, (int, float)):
        return torch.full(shape, float(p), dtype=torch.float64)
    return p.double().expand(shape).clone()


def oracle(kind, x, y, rlv, w, pw, mu, lv, pmu, plv, full):
    """Per-element losses and (unscaled) gradients in float64, from the DESIGN.md formulas."""
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


def is_tensor(p):
    return isinstance(p, torch.Tensor)


def run(kind, x=None, y=None, rlv=None, w=None, pw=None, mu=None, lv=None, pmu=None, plv=None, *,
        red_mode=TOTAL, full=False, scale_r=1.0, scale_k=1.0, beta=1.0, want=(), acc=None,
        grad_dtypes=None):
    """Calls fused_forward the way the core does; returns (loss, nll, kl, {name: grad})."""
    rows = (x if x is not None else mu).shape[0]
    shape_r = tuple(x.shape) if kind else None
    shape_k = tuple(mu.shape) if mu is not None else None
    row_len_r = math.prod(shape_r[1:]) if kind else 0
    row_len_k = math.prod(shape_k[1:]) if mu is not None else 0
    params_r = [lower_param(p, shape_r) if kind else (None, 0, 1, 1, 0.0) for p in (rlv, w, pw)]
    params_k = [lower_param(p, shape_k) if mu is not None else (None, 0, 1, 1, 0.0)
                for p in (lv, pmu, plv)]
    params = params_r + params_k
    tensors = [x, y] + [p[0] for p in params_r] + [mu] + [p[0] for p in params_k]
    if acc is None:
        acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
            else torch.float32
    if red_mode == ELEMENTWISE:
        out_loss = torch.empty(shape_r, dtype=acc)
        out_nll = torch.empty(0, dtype=acc)
        out_kl = torch.empty(0, dtype=acc)
    else:
        oshape = (rows,) if red_mode == ROWS else ()
        out_loss, out_nll, out_kl = (torch.full(oshape, float("nan"), dtype=acc) for _ in range(3))
    grads = []
    for i, name in enumerate(NAMES):
        if name not in want:
            grads.append(None)
            continue
        partner_shape = shape_r if i < 5 else shape_k
        src = tensors[i]
        dt = src.dtype if i in (0, 1, 5) else acc
        if grad_dtypes and name in grad_dtypes:
            dt = grad_dtypes[name]
        grads.append(torch.full(partner_shape, float("nan"), dtype=dt))
    _cpu.fused_forward(
        *tensors, rows=rows, row_len_r=row_len_r, row_len_k=row_len_k,
        modes=[p[1] for p in params], inners=[p[2] for p in params],
        counts=[p[3] for p in params],
        consts=[params[0][4], params[4][4], params[5][4]],
        kind=kind, full=full, red_mode=red_mode, scale_r=scale_r, scale_k=scale_k, beta=beta,
        out_loss=out_loss, out_nll=out_nll, out_kl=out_kl, grads=grads,
    )
    return out_loss, out_nll, out_kl, {n: g for n, g in zip(NAMES, grads) if g is not None}


def expected(kind, args, red_mode, scale_r, scale_k, beta, full=False):
    o = oracle(kind, *args, full)
    x, mu = args[0], args[5]
    rows = (x if x is not None else mu).shape[0]

    def red(v, scale):
        if v is None:
            return torch.zeros((rows,) if red_mode == ROWS else (), dtype=torch.float64)
        if red_mode == ROWS:
            return scale * v.reshape(rows, -1).sum(1)
        return scale * v.sum()

    nll = red(o.get("l"), scale_r)
    kl = red(o.get("k"), scale_k)
    return nll + beta * kl, nll, kl, o


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


def check_case(kind, args, *, red_mode, dtype, want, full=False, scale_r=0.37, scale_k=0.21,
               beta=0.8, grad_dtypes=None):
    loss, nll, kl, grads = run(kind, *args, red_mode=red_mode, full=full, scale_r=scale_r,
                               scale_k=scale_k, beta=beta, want=want, grad_dtypes=grad_dtypes)
    compute = torch.float64 if any(is_tensor(a) and a.dtype == torch.float64 for a in args) \
        else torch.float32
    rs, re = tol(compute)
    e_loss, e_nll, e_kl, o = expected(kind, args, red_mode, scale_r, scale_k, beta, full)
    if red_mode == ELEMENTWISE:
        assert_close(loss, scale_r * o["l"], re, 1e-30, "elementwise loss")
    else:
        # atol: a sum of mixed-sign terms can be small next to its terms
        scale_terms = lambda v, s: s * v.abs().sum() if v is not None else 0.0  # noqa: E731
        at_r = float(scale_terms(o.get("l"), scale_r)) * rs
        at_k = float(scale_terms(o.get("k"), scale_k)) * rs
        assert_close(nll, e_nll, rs, at_r, "nll")
        assert_close(kl, e_kl, rs, at_k, "kl")
        assert_close(loss, e_loss, rs, at_r + beta * at_k, "loss")
    for name, g in grads.items():
        scale = scale_r if NAMES.index(name) < 5 else scale_k
        e = scale * o[name]
        r = grad_rtol(g.dtype, compute)
        # atol relative to the gradient's magnitude: cancellation (sigmoid(z) - y) is absolute
        assert_close(g, e, r, r * float(e.abs().max()) + 1e-30, f"grad {name}")
    return loss, nll, kl, grads


# ---------------------------------------------------------------------------------------------
# Every likelihood x reduction x dtype
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("red_mode", [TOTAL, ROWS, ELEMENTWISE], ids=["total", "rows", "elem"])
@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS, GAUSS], ids=["logits", "probs", "gauss"])
def test_kinds_reductions_dtypes(kind, red_mode, dtype):
    gen = torch.Generator().manual_seed(100 * kind + 10 * red_mode + DTYPES.index(dtype))
    shape_r, shape_k = (3, 5, 7, 11), (3, 13)  # odd sizes: vector and tile tails everywhere
    x, y, mu = make_inputs(kind, shape_r, None if red_mode == ELEMENTWISE else shape_k, dtype, gen)
    lv = None if mu is None else (torch.randn(shape_k, generator=gen) * 0.5).to(dtype)
    rlv = (torch.randn(shape_r, generator=gen) * 0.5).to(dtype) if kind == GAUSS else None
    want = ["x", "y"] + (["rlv"] if kind == GAUSS else []) + ([] if mu is None else ["mu", "lv"])
    args = (x, y, rlv, None, None, mu, lv, None, None)
    check_case(kind, args, red_mode=red_mode, dtype=dtype, want=want, full=kind == GAUSS)


@pytest.mark.parametrize("red_mode", [TOTAL, ROWS], ids=["total", "rows"])
def test_multi_chunk_rows(red_mode):
    """Rows longer than a chunk (8192) and not a multiple of the tile (512) or vector width."""
    gen = torch.Generator().manual_seed(7)
    shape_r, shape_k = (3, 20011), (3, 9001)
    x, y, mu = make_inputs(BERN_LOGITS, shape_r, shape_k, torch.float32, gen)
    lv = torch.randn(shape_k, generator=gen) * 0.3
    args = (x, y, None, None, None, mu, lv, None, None)
    check_case(BERN_LOGITS, args, red_mode=red_mode, dtype=torch.float32, want=["x", "mu", "lv"])


def test_no_kl_stream_and_kl_only():
    gen = torch.Generator().manual_seed(8)
    x, y, mu = make_inputs(BERN_LOGITS, (4, 33), (4, 9), torch.float32, gen)
    lv = torch.randn(4, 9, generator=gen)
    loss, nll, kl, _ = check_case(BERN_LOGITS, (x, y, None, None, None, None, None, None, None),
                                  red_mode=TOTAL, dtype=torch.float32, want=["x"])
    assert kl.item() == 0.0 and loss.item() == nll.item()
    loss, nll, kl, _ = check_case(0, (None, None, None, None, None, mu, lv, None, None),
                                  red_mode=ROWS, dtype=torch.float32, want=["mu", "lv"])
    assert (nll == 0).all()


def test_empty_batch_and_empty_rows():
    x, y, mu, lv = torch.empty(0, 3, 4), torch.empty(0, 3, 4), torch.empty(0, 5), torch.empty(0, 5)
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, want=["x", "mu"])
    assert loss.item() == 0 and nll.item() == 0 and kl.item() == 0
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, red_mode=ROWS, want=["x"])
    assert loss.shape == (0,) and grads["x"].shape == (0, 3, 4)
    le, *_ = run(GAUSS, x, y, red_mode=ELEMENTWISE)
    assert le.shape == (0, 3, 4)
    # rows of length 0
    loss, nll, kl, _ = run(BERN_LOGITS, torch.empty(3, 0), torch.empty(3, 0), mu=torch.randn(3, 2),
                           lv=torch.zeros(3, 2), red_mode=ROWS)
    assert (nll == 0).all() and (kl > 0).all()


# ---------------------------------------------------------------------------------------------
# Parameter read modes: constant, full, periodic scalar / per-feature / per-channel
# ---------------------------------------------------------------------------------------------
def _param_variants(shape, gen, lo, hi, dtype=torch.float32):
    """name -> parameter in every read mode, for a stream of `shape` (B, C, H, W) or (B, Z)."""
    def rnd(*s):
        return (torch.rand(s, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    v = {
        "const": float(lo + 0.3 * (hi - lo)),
        "scalar": rnd(),
        "full": rnd(*shape),
        "feature": rnd(*shape[1:]),
    }
    if len(shape) == 4:
        v["channel"] = rnd(shape[1], 1, 1)
        v["row"] = rnd(shape[0], 1, 1, 1)
    return v


@pytest.mark.parametrize("mode", ["const", "scalar", "full", "feature", "channel", "row"])
def test_param_modes_bernoulli_weights(mode):
    gen = torch.Generator().manual_seed(11)
    shape = (3, 4, 5, 7)
    x, y, _ = make_inputs(BERN_LOGITS, shape, None, torch.float32, gen)
    if mode == "const":
        w = pw = None  # mode 0: w = pw = 1
    else:
        w = _param_variants(shape, gen, 0.2, 2.0)[mode]
        pw = _param_variants(shape, gen, 0.5, 3.0)[mode]
    want = ["x", "y"] + ([] if mode == "const" else ["w", "pw"])
    for red_mode in (TOTAL, ROWS, ELEMENTWISE):
        check_case(BERN_LOGITS, (x, y, None, w, pw, None, None, None, None), red_mode=red_mode,
                   dtype=torch.float32, want=want)
    # weight without pos_weight, and bool targets with both
    if mode != "const":
        check_case(BERN_LOGITS, (x, y, None, w, None, None, None, None, None), red_mode=TOTAL,
                   dtype=torch.float32, want=["x", "y", "w"])
        yb = torch.rand(shape, generator=gen) < 0.5
        check_case(BERN_LOGITS, (x, yb, None, w, pw, None, None, None, None), red_mode=ROWS,
                   dtype=torch.float32, want=["x", "w", "pw"])
        check_case(BERN_LOGITS, (x, y, None, None, pw, None, None, None, None), red_mode=TOTAL,
                   dtype=torch.float32, want=["x", "y", "pw"])


@pytest.mark.parametrize("mode", ["scalar", "full", "feature", "channel"])
def test_param_modes_probs_weight(mode):
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 4, 9)
    x, y, _ = make_inputs(BERN_PROBS, shape, None, torch.float32, gen)
    w = _param_variants(shape, gen, 0.2, 2.0)[mode]
    check_case(BERN_PROBS, (x, y, None, w, None, None, None, None, None), red_mode=TOTAL,
               dtype=torch.float32, want=["x", "y", "w"])


@pytest.mark.parametrize("mode", ["const", "scalar", "full", "feature", "channel"])
def test_param_modes_gaussian_logvar(mode):
    gen = torch.Generator().manual_seed(13)
    shape = (3, 2, 5, 6)
    x, y, _ = make_inputs(GAUSS, shape, None, torch.float32, gen)
    rlv = _param_variants(shape, gen, -2.0, 2.0)[mode]
    want = ["x", "y"] + ([] if mode == "const" else ["rlv"])
    for full in (False, True):
        check_case(GAUSS, (x, y, rlv, None, None, None, None, None, None), red_mode=ROWS,
                   dtype=torch.float32, want=want, full=full)


@pytest.mark.parametrize("mode", ["const", "scalar", "full", "feature"])
def test_param_modes_kl_prior(mode):
    gen = torch.Generator().manual_seed(14)
    shape = (5, 37)
    mu = torch.randn(shape, generator=gen)
    lv_variants = _param_variants(shape, gen, -2.0, 1.0)
    lv = lv_variants["full"] if mode == "const" else lv_variants[mode]
    pmu = _param_variants(shape, gen, -1.0, 1.0)[mode]
    plv = _param_variants(shape, gen, -1.5, 1.5)[mode]
    want = ["mu", "lv"] + ([] if mode == "const" else ["pmu", "plv"])
    for red_mode in (TOTAL, ROWS):
        check_case(0, (None, None, None, None, None, mu, lv, pmu, plv), red_mode=red_mode,
                   dtype=torch.float32, want=want)


def test_mixed_dtypes():
    gen = torch.Generator().manual_seed(15)
    shape = (2, 3, 8, 8)
    # bf16 logits, float32 target, float16 per-channel weight: float32 math
    x = (torch.randn(shape, generator=gen) * 3).bfloat16()
    y = torch.rand(shape, generator=gen)
    w = (torch.rand(3, 1, 1, generator=gen) + 0.5).half()
    mu = torch.randn(2, 16, generator=gen).half()
    lv = torch.randn(2, 16, generator=gen).bfloat16()
    check_case(BERN_LOGITS, (x, y, None, w, None, mu, lv, None, None), red_mode=ROWS,
               dtype=torch.float32, want=["x", "y", "w", "mu", "lv"])
    # a float64 target makes everything float64; the logits gradient stays bf16
    y64 = y.double()
    loss, *_ , grads = check_case(BERN_LOGITS, (x, y64, None, None, None, None, None, None, None),
                                  red_mode=TOTAL, dtype=torch.float64, want=["x", "y"])
    assert loss.dtype == torch.float64 and grads["x"].dtype == torch.bfloat16
    # full-size parameter grads may come in the parameter's own dtype
    lvb = torch.randn(2, 16, generator=gen).bfloat16()
    check_case(0, (None, None, None, None, None, mu.float(), lvb, None, None), red_mode=TOTAL,
               dtype=torch.float32, want=["mu", "lv"], grad_dtypes={"lv": torch.bfloat16})


@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS])
def test_bool_targets(kind):
    gen = torch.Generator().manual_seed(16)
    x, y, mu = make_inputs(kind, (4, 3, 17), (4, 5), torch.float32, gen, bool_target=True)
    assert y.dtype == torch.bool
    lv = torch.randn(4, 5, generator=gen)
    for red_mode in (TOTAL, ROWS):
        check_case(kind, (x, y, None, None, None, mu, lv, None, None), red_mode=red_mode,
                   dtype=torch.float32, want=["x", "mu", "lv"])
    check_case(kind, (x, y, None, None, None, None, None, None, None), red_mode=ELEMENTWISE,
               dtype=torch.float32, want=["x"])


def test_matches_torch_functional():
    """The float32 sums agree with torch's own float32 results to ~1e-6."""
    gen = torch.Generator().manual_seed(17)
    B = 16
    x = torch.randn(B, 3, 32, 32, generator=gen) * 5
    y = torch.rand(B, 3, 32, 32, generator=gen)
    mu = torch.randn(B, 64, generator=gen)
    lv = torch.randn(B, 64, generator=gen)
    loss, nll, kl, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, scale_r=1 / B, scale_k=1 / B,
                               want=["x"])
    t_nll = F.binary_cross_entropy_with_logits(x, y, reduction="sum") / B
    t_kl = (-0.5 * (1 + lv - mu**2 - lv.exp())).sum() / B
    assert abs(nll.item() / t_nll.item() - 1) < 1e-6
    assert abs(kl.item() / t_kl.item() - 1) < 1e-6
    xr = x.clone().requires_grad_()
    (F.binary_cross_entropy_with_logits(xr, y, reduction="sum") / B).backward()
    torch.testing.assert_close(grads["x"], xr.grad, rtol=1e-5, atol=1e-8)
    # probabilities and Gaussian
    p = torch.rand(B, 100, generator=gen) * 0.98 + 0.01
    yp = y.reshape(B, -1)[:, :100].contiguous()
    _, nll, _, _ = run(BERN_PROBS, p, yp)
    t = F.binary_cross_entropy(p, yp, reduction="sum")
    assert abs(nll.item() / t.item() - 1) < 1e-6
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
    loss, _, _, grads = run(BERN_LOGITS, z, y, pw=pw, red_mode=ELEMENTWISE, want=["x"])
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
        loss, _, _, grads = run(BERN_LOGITS, z, y, red_mode=ELEMENTWISE, want=["x", "y"])
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
                            red_mode=ELEMENTWISE, want=["x", "rlv"])
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
    _, _, kl, grads = run(0, mu=mu, lv=d.reshape(-1, 1), red_mode=ROWS, want=["lv"])
    dd = d.double()
    series = dd * dd / 2 + dd**3 / 6 + dd**4 / 24 + dd**5 / 120
    exact = 0.5 * torch.where(dd.abs() < 1e-3, series, torch.expm1(dd) - dd)
    err = _ulp_err(kl, exact)
    assert err.max().item() <= 8.0, (err.max().item(), d[err.argmax()].item())
    assert (err[dd.abs() <= 0.34] <= 3.0).all()
    assert _ulp_err(grads["lv"].reshape(-1), 0.5 * torch.expm1(dd)).max() <= 3.0


# ---------------------------------------------------------------------------------------------
# NaN / Inf, limits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [BERN_LOGITS, BERN_PROBS, GAUSS])
def test_nan_propagates(kind):
    gen = torch.Generator().manual_seed(18)
    x, y, mu = make_inputs(kind, (2, 40), (2, 8), torch.float32, gen)
    rlv = torch.zeros(2, 40) if kind == GAUSS else None
    x[1, 17] = float("nan")
    loss, nll, kl, grads = run(kind, x, y, rlv, mu=mu, lv=torch.zeros(2, 8), red_mode=ROWS,
                               want=["x", "y"])
    assert not torch.isnan(nll[0]) and torch.isnan(nll[1]) and torch.isnan(loss[1])
    assert torch.isnan(grads["x"][1, 17]) and torch.isnan(grads["y"][1, 17])
    g = grads["x"].clone()
    g[1, 17] = 0
    assert torch.isfinite(g).all()
    # NaN in the KL stream and in a parameter
    mu[0, 3] = float("nan")
    lv = torch.zeros(2, 8)
    lv[1, 5] = float("nan")
    _, _, kl, grads = run(0, mu=mu, lv=lv, red_mode=ROWS, want=["mu", "lv"])
    assert torch.isnan(kl).all()
    assert torch.isnan(grads["mu"][0, 3]) and torch.isnan(grads["lv"][1, 5])
    # elementwise: NaN only where the input is NaN
    le, *_ = run(kind, x, y, rlv, red_mode=ELEMENTWISE)
    assert torch.isnan(le).sum() == 1 and torch.isnan(le[1, 17])


def test_inf_and_limits():
    inf = float("inf")
    # logits: the same inf/NaN pattern as torch ((1-y) z + softplus(-z))
    z = torch.tensor([[inf, -inf, 1e30, -1e30, inf, -inf, 100.0, -100.0]])
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    le, _, _, grads = run(BERN_LOGITS, z, y, red_mode=ELEMENTWISE, want=["x"])
    torch.testing.assert_close(le, F.binary_cross_entropy_with_logits(z, y, reduction="none"),
                               equal_nan=True)
    torch.testing.assert_close(grads["x"], torch.sigmoid(z) - y, equal_nan=True)
    # probabilities at the edges: clamped logs give 100 per element, no inf
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    le, _, _, grads = run(BERN_PROBS, p, t, red_mode=ELEMENTWISE, want=["x"])
    torch.testing.assert_close(le, F.binary_cross_entropy(p, t, reduction="none"))
    assert torch.isfinite(grads["x"]).all()
    # Gaussian: exp(-s) overflows to inf for s < -88.7, loss follows
    le, *_ = run(GAUSS, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[-100.0, 100.0]]),
                 red_mode=ELEMENTWISE)
    assert le[0, 0] == inf and le[0, 1] == 50.0
    # KL: huge log-variance gap overflows to inf, not NaN; infinite log-variances (and
    # prior log-variances) give what the unfused formula gives
    _, _, kl, _ = run(0, mu=torch.zeros(1, 2), lv=torch.tensor([[100.0, -100.0]]))
    assert kl.item() == inf
    lv = torch.tensor([[inf, -inf, 0.0, 0.0, 1.0]])
    plv = torch.tensor([[0.0, 0.0, inf, -inf, 0.0]])
    mu = torch.tensor([[0.5, 0.5, 0.5, 0.5, inf]])
    for dtype in (torch.float32, torch.float64):
        m, v, pv = (t.to(dtype).reshape(-1, 1) for t in (mu, lv, plv))  # one element per row
        _, _, kl, grads = run(0, mu=m, lv=v, plv=pv, red_mode=ROWS, want=["mu", "lv", "plv"])
        o = oracle(0, None, None, None, None, None, m, v, None, pv, False)
        torch.testing.assert_close(kl, o["k"].reshape(-1).to(dtype), equal_nan=True)
        for name in ("mu", "lv", "plv"):
            torch.testing.assert_close(grads[name], o[name].to(dtype), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def _bits(t):
    return t.reshape(-1).contiguous().view(torch.uint8)


def test_deterministic_runs_and_threads():
    gen = torch.Generator().manual_seed(19)
    shape_r, shape_k = (6, 3, 61, 67), (6, 129)  # ~74K elements: several chunks per row
    x, y, mu = make_inputs(BERN_LOGITS, shape_r, shape_k, torch.float32, gen)
    lv = torch.randn(shape_k, generator=gen)
    w = torch.rand(3, 1, 1, generator=gen) + 0.5
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 2, max(old, 3)):
            torch.set_num_threads(threads)
            for red_mode in (TOTAL, ROWS):
                r = run(BERN_LOGITS, x, y, None, w, None, mu, lv, red_mode=red_mode,
                        scale_r=1 / 6, scale_k=1 / 6, want=["x", "y", "w", "mu", "lv"])
                results.append((threads, red_mode, r))
    finally:
        torch.set_num_threads(old)
    for red_mode in (TOTAL, ROWS):
        runs = [r for (_, m, r) in results if m == red_mode]
        ref = runs[0]
        for other in runs[1:]:
            for a, b in zip(ref[:3], other[:3]):
                assert torch.equal(_bits(a), _bits(b))
            for k in ref[3]:
                assert torch.equal(_bits(ref[3][k]), _bits(other[3][k]))


def test_inputs_never_written():
    gen = torch.Generator().manual_seed(20)
    x, y, mu = make_inputs(GAUSS, (2, 50), (2, 6), torch.float32, gen)
    rlv, lv = torch.randn(2, 50, generator=gen), torch.randn(2, 6, generator=gen)
    saved = [t.clone() for t in (x, y, rlv, mu, lv)]
    run(GAUSS, x, y, rlv, mu=mu, lv=lv, want=["x", "y", "rlv", "mu", "lv"])
    for a, b in zip((x, y, rlv, mu, lv), saved):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# scale_
# ---------------------------------------------------------------------------------------------
def _snan_buf(n):
    """Random float32 buffer whose first element is a signalling NaN: any multiply (even by 1)
    quiets it, so its bits tell whether scale_ touched the buffer."""
    b = torch.randn(n)
    b.view(torch.int32)[0] = 0x7F800001
    return b


def test_scale_total_skip_when_one():
    b = _snan_buf(1000)
    before = b.clone()
    _cpu.scale_([b], [], torch.tensor(1.0), None, None, beta=1.0, red_mode=TOTAL, rows=10,
                row_len_r=100, row_len_k=0)
    assert torch.equal(b.view(torch.int32), before.view(torch.int32))  # sNaN bits intact
    # coefficient g_loss + g_nll = 0.25 + 0.75 = 1: untouched too
    _cpu.scale_([b], [], torch.tensor(0.25), torch.tensor(0.75), None, beta=1.0, red_mode=TOTAL,
                rows=10, row_len_r=100, row_len_k=0)
    assert torch.equal(b.view(torch.int32), before.view(torch.int32))
    _cpu.scale_([b], [], torch.tensor(2.0), None, None, beta=1.0, red_mode=TOTAL, rows=10,
                row_len_r=100, row_len_k=0)
    assert b.view(torch.int32)[0] != 0x7F800001  # touched: quieted
    torch.testing.assert_close(b[1:], 2 * before[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_total_streams(dtype):
    gen = torch.Generator().manual_seed(21)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    br = [torch.randn(4 * 77, generator=gen).to(dtype) for _ in range(2)]
    bk = [torch.randn(4 * 5, generator=gen).to(dtype)]
    before_r, before_k = [b.clone() for b in br], [b.clone() for b in bk]
    gl, gn, gk = (torch.tensor(v, dtype=acc) for v in (1.5, -0.25, 0.5))
    beta = 0.3
    _cpu.scale_(br, bk, gl, gn, gk, beta=beta, red_mode=TOTAL, rows=4, row_len_r=77, row_len_k=5)
    cr, ck = 1.5 - 0.25, beta * 1.5 + 0.5
    r = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    for b, o in zip(br, before_r):
        torch.testing.assert_close(b.double(), cr * o.double(), rtol=r, atol=0)
    for b, o in zip(bk, before_k):
        torch.testing.assert_close(b.double(), ck * o.double(), rtol=r, atol=0)
    # missing grads count as 0: KL coefficient from g_kl only
    b = torch.ones(20, dtype=dtype)
    _cpu.scale_([], [b], None, None, torch.tensor(3.0, dtype=acc), beta=beta, red_mode=TOTAL,
                rows=4, row_len_r=0, row_len_k=5)
    assert (b == 3).all()


def test_scale_rows():
    rows, L, Lk = 5, 37, 3
    b = torch.randn(rows * L)
    b.view(rows, L)[:, 0].view(torch.int32).fill_(0x7F800001)
    before = b.clone()
    bk = torch.randn(rows * Lk)
    bk_before = bk.clone()
    g_loss = torch.tensor([1.0, 2.0, 1.0, -1.0, 0.5])
    g_nll = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    g_kl = torch.tensor([0.0, 1.0, 0.5, 2.0, 0.0])
    beta = 2.0
    _cpu.scale_([b], [bk], g_loss, g_nll, g_kl, beta=beta, red_mode=ROWS, rows=rows,
                row_len_r=L, row_len_k=Lk)
    cr = g_loss + g_nll
    ck = beta * g_loss + g_kl
    bv, ov = b.view(rows, L), before.view(rows, L)
    for r in range(rows):
        if cr[r] == 1:
            assert torch.equal(bv[r].view(torch.int32), ov[r].view(torch.int32)), r
        else:
            assert bv[r, 0].view(torch.int32) != 0x7F800001
            torch.testing.assert_close(bv[r, 1:], cr[r] * ov[r, 1:])
    torch.testing.assert_close(bk.view(rows, Lk), ck[:, None] * bk_before.view(rows, Lk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_elementwise(dtype):
    gen = torch.Generator().manual_seed(22)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = 3 * 1001
    b = torch.randn(n, generator=gen).to(dtype)
    before = b.clone()
    g = torch.randn(n, generator=gen).to(acc)
    _cpu.scale_([b], [], g, None, None, beta=1.0, red_mode=ELEMENTWISE, rows=3, row_len_r=1001,
                row_len_k=0)
    r = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(b.double(), (before.double() * g.double()), rtol=r, atol=1e-30)
    g2 = torch.randn(n, generator=gen).to(acc)
    _cpu.scale_([b], [], g, g2, None, beta=1.0, red_mode=ELEMENTWISE, rows=3, row_len_r=1001,
                row_len_k=0)
    expect = before.double() * g.double() * (g.double() + g2.double())
    torch.testing.assert_close(b.double(), expect, rtol=3 * r, atol=1e-30)


def test_scale_after_forward_matches_autograd():
    """fused_forward(ROWS) then scale_ with a random grad_output equals autograd of the
    float64 reference."""
    gen = torch.Generator().manual_seed(23)
    B = 4
    x, y, mu = make_inputs(BERN_LOGITS, (B, 2, 9, 9), (B, 6), torch.float64, gen)
    lv = torch.randn(B, 6, generator=gen, dtype=torch.float64)
    _, _, _, grads = run(BERN_LOGITS, x, y, mu=mu, lv=lv, red_mode=ROWS, beta=0.5,
                         want=["x", "mu", "lv"])
    g_loss = torch.randn(B, generator=gen, dtype=torch.float64)
    _cpu.scale_([grads["x"]], [grads["mu"], grads["lv"]], g_loss, None, None, beta=0.5,
                red_mode=ROWS, rows=B, row_len_r=2 * 81, row_len_k=6)
    xr, mr, lr = (t.clone().requires_grad_() for t in (x, mu, lv))
    nll = F.binary_cross_entropy_with_logits(xr, y, reduction="none").sum((1, 2, 3))
    kl = (0.5 * (torch.expm1(lr) - lr + mr**2)).sum(1)
    ((nll + 0.5 * kl) * g_loss).sum().backward()
    torch.testing.assert_close(grads["x"], xr.grad)
    torch.testing.assert_close(grads["mu"], mr.grad)
    torch.testing.assert_close(grads["lv"], lr.grad)


# ---------------------------------------------------------------------------------------------
# Argument checks and availability
# ---------------------------------------------------------------------------------------------
def test_available_and_load():
    assert _cpu.available() and _cpu.unavailable_reason() == ""
    ops = _cpu.load()
    assert hasattr(ops, "fused_forward") and hasattr(ops, "scale_")


def test_bad_arguments_raise():
    x, y = torch.randn(2, 10), torch.rand(2, 10)
    base = dict(rows=2, row_len_r=10, row_len_k=0, modes=[0] * 6, inners=[1] * 6,
                counts=[1] * 6, consts=[0.0] * 3, kind=1, full=False, red_mode=0, scale_r=1.0,
                scale_k=1.0, beta=1.0, out_loss=torch.empty(()), out_nll=None, out_kl=None,
                grads=[None] * 9)
    _cpu.fused_forward(x, y, *[None] * 7, **base)
    with pytest.raises(RuntimeError, match="elements"):
        _cpu.fused_forward(x, y[:, :5].contiguous(), *[None] * 7, **base)
    with pytest.raises(RuntimeError, match="contiguous"):
        _cpu.fused_forward(x.t(), y, *[None] * 7, **{**base, "rows": 10, "row_len_r": 2})
    with pytest.raises(RuntimeError, match="mode"):
        _cpu.fused_forward(x, y, None, torch.ones(3), *[None] * 5,
                           **{**base, "modes": [0, 2, 0, 0, 0, 0], "counts": [1, 4, 1, 1, 1, 1]})
    with pytest.raises(RuntimeError, match="grad"):
        _cpu.fused_forward(x, y, *[None] * 7, **{**base, "grads": [torch.empty(3)] + [None] * 8})
    with pytest.raises(RuntimeError, match="dtype"):
        _cpu.fused_forward(x.long(), y, *[None] * 7, **base)
    with pytest.raises(RuntimeError, match="overlaps an input"):
        _cpu.fused_forward(x, y, *[None] * 7, **{**base, "grads": [x] + [None] * 8})
    with pytest.raises(RuntimeError, match="KL"):
        _cpu.fused_forward(x, y, None, None, None, torch.randn(2, 3), *[None] * 3,
                           **{**base, "red_mode": 2, "out_loss": torch.empty(2, 10)})


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
    loss, nll, kl, _ = run(BERN_LOGITS, x.reshape(rows, n), y.reshape(rows, n), red_mode=TOTAL,
                           scale_r=1.0 / n)
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
