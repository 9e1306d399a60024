"""The Triton kernels: one fused forward for every loss, a tiny finalize, an in-place scale.

Memory traffic is the whole game for these losses (a few flops per byte), so:
- `_fused_loss_fwd_kernel` reads each input once and, when inputs require grad, writes the
  gradients in the same pass; a reconstruction stream (x, y) and a KL stream (mu, logvar) share
  one launch, programs [0, chunks_r) of each row taking the first, the rest the second.
- per-program partial sums go to a small fp32/fp64 buffer and `_finalize_kernel` adds them in a
  fixed order (no float atomics: the same inputs give bitwise the same loss);
- the backward is `_scale_grads_kernel`, in place on our own gradient buffers, which returns at
  once when the coefficient it reads is 1 (the usual case), so it decides on the device and the
  host never syncs.
Offsets are int64 (tensors over 2^31 elements). `libdevice` is not used because the interpreter
(our CPU test path) cannot run it: log1p and expm1 are written out below, accurate to a few ulp.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._enums import Likelihood, ParamMode, RedMode

# the codes the kernels compare their constexprs against (vae_fast/_enums.py)
CONST, FULL, PERIODIC = int(ParamMode.CONST), int(ParamMode.FULL), int(ParamMode.PERIODIC)
NO_RECON, BERNOULLI = int(Likelihood.NONE), int(Likelihood.BERNOULLI)
BERNOULLI_PROBS, GAUSSIAN = int(Likelihood.BERNOULLI_PROBS), int(Likelihood.GAUSSIAN)
TOTAL, ROWS, ELEMENTWISE = int(RedMode.TOTAL), int(RedMode.ROWS), int(RedMode.PER_ELEMENT)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@triton.jit
def _log1p(a):
    # Goldberg: log(u) * a / (u - 1) with u = 1 + a cancels the rounding of 1 + a.
    u = 1.0 + a
    return tl.where(u == 1.0, a, tl.log(u) * (a / (u - 1.0)))


@triton.jit
def _expm1(d):
    # Kahan: (u - 1) * d / log(u) with u = exp(d) is accurate for small |d|; plain u - 1 is
    # accurate for |d| >= 0.5 and keeps inf/-1 at the ends.
    u = tl.exp(d)
    um1 = u - 1.0
    small = (u != 1.0) & (tl.abs(d) < 0.5)
    safe_log = tl.where(small, tl.log(u), 1.0)
    return tl.where(u == 1.0, d, tl.where(small, um1 * (d / safe_log), um1))


@triton.jit
def _max(a, b):
    # NaN in, NaN out: a plain maximum would turn a NaN probability into a finite loss
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _cast(v, ptr):
    # to the element type of ptr; 16-bit through fp32 (one rounding on the GPU; the
    # interpreter's direct fp64 -> bf16 cast is wrong)
    if ptr.dtype.element_ty == tl.bfloat16 or ptr.dtype.element_ty == tl.float16:
        v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _f64ish(hi, lo, ACC: tl.constexpr):
    # Triton passes Python floats as fp32: scalars travel as hi + lo (see _hilo), ~46 bits
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _beta(beta, beta_lo, beta_ptr, HAS_BETA_T: tl.constexpr, ACC: tl.constexpr):
    # a tensor beta is read on the device: annealing it changes no compiled graph, syncs nothing
    if HAS_BETA_T:
        b = tl.load(beta_ptr).to(ACC)
    else:
        b = _f64ish(beta, beta_lo, ACC)
    return b


@triton.jit
def _load_param(ptr, off, mask, const, inner, count, MODE: tl.constexpr, ACC: tl.constexpr):
    if MODE == 1:
        v = tl.load(ptr + off, mask=mask, other=0.0).to(ACC)
    elif MODE == 2:
        v = tl.load(ptr + (off // inner) % count, mask=mask, other=0.0).to(ACC)
    else:
        v = tl.zeros(off.shape, ACC) + const
    return v


@triton.jit
def _recon_tile(
    x_ptr, y_ptr, rlv_ptr, w_ptr, pw_ptr, gx_ptr, gy_ptr, grlv_ptr, gw_ptr, gpw_ptr, out_ptr,
    off, mask, rlv_const, rlv_inner, rlv_count, w_inner, w_count, pw_inner, pw_count, y_count,
    scale, KIND: tl.constexpr, FULL: tl.constexpr, ELEMENTWISE_OUT: tl.constexpr,
    RLV_MODE: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr, Y_MODE: tl.constexpr,
    G_X: tl.constexpr, G_Y: tl.constexpr, G_RLV: tl.constexpr, G_W: tl.constexpr,
    G_PW: tl.constexpr, ACC: tl.constexpr,
):
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if Y_MODE == 2:  # one target for K samples of x: element off reads y[off % y_count]
        y = tl.load(y_ptr + off % y_count, mask=mask, other=0).to(ACC)
    else:
        y = tl.load(y_ptr + off, mask=mask, other=0).to(ACC)
    if KIND == 1:  # Bernoulli from logits; e = exp(-|z|) feeds softplus and sigmoid both
        e = tl.exp(-tl.abs(x))
        er = e / (1.0 + e)  # min(sigmoid(z), 1 - sigmoid(z)), accurate however confident z is
        log1p_e = _log1p(e)
        if PW_MODE != 0:
            pw = _load_param(pw_ptr, off, mask, 1.0, pw_inner, pw_count, PW_MODE, ACC)
        else:
            pw = 1.0
        lw = 1.0 + (pw - 1.0) * y  # torch's pos_weight: (1-y)*z + lw*softplus(-z)
        # = [(1-y)*z for z >= 0, -pw*y*z below] + lw*log1p(e): the large part is exact (0 for
        # a confident right prediction, so its tiny loss keeps its relative precision) and
        # infinite logits give inf, not inf - inf
        loss = tl.where(x >= 0, (1.0 - y) * x, -(pw * y) * x) + lw * log1p_e
        # d/dz = lw*sigmoid(z) - pw*y, written so that neither side cancels
        dx = tl.where(x >= 0, (1.0 - y) - lw * er, lw * er - pw * y)
        if PW_MODE != 0:
            dy = (pw - 1.0) * (_max(-x, 0.0) + log1p_e) - x
        else:
            dy = -x  # (pw - 1) * softplus(-z) would be 0 * inf at z = -inf
        dpw = y * (_max(-x, 0.0) + log1p_e)
        drlv = dy  # unused
    elif KIND == 2:  # Bernoulli from probabilities, F.binary_cross_entropy semantics
        log_x = tl.log(x)
        log_1mx = _log1p(-x)
        loss = -(y * _max(log_x, -100.0) + (1.0 - y) * _max(log_1mx, -100.0))
        dx = (x - y) / _max(x * (1.0 - x), 1e-12)
        dy = log_1mx - log_x
        dpw = dy  # unused
        drlv = dy  # unused
    elif KIND == 4:  # continuous Bernoulli from logits: BCE - log(z / tanh(z/2))
        a = tl.abs(x)
        e = tl.exp(-a)
        # closed forms, with e = exp(-|z|): loss [(1-y) z | -y z] + log((1-e)/|z|), gradient
        # [(1-y) + u | -u - y], u = e/(1-e) - 1/|z|; below the bound both cancel, and the
        # series in z take over (the bound and the series: csrc/kernels_impl.h)
        if ACC == tl.float64:
            series = a < 0.3
        else:
            series = a < 1.0
        a_safe = tl.where(series, 1.0, a)
        ome = 1.0 - tl.where(series, 0.5, e)
        z2 = x * x
        poly = z2 * (1.0 / 24.0 + z2 * (-1.0 / 2880.0 + z2 * (1.0 / 181440.0 + z2 * (
            -1.0 / 9676800.0 + z2 * (1.0 / 479001600.0)))))
        closed = tl.where(x >= 0, (1.0 - y) * x, -y * x) + tl.log(ome / a_safe)
        loss = tl.where(series, x * (0.5 - y) + poly, closed)
        u = tl.where(series, 0.5, e) / ome - 1.0 / a_safe
        g_closed = tl.where(x >= 0, (1.0 - y) + u, -u - y)
        g_series = (0.5 - y) + x * (1.0 / 12.0 + z2 * (-1.0 / 720.0 + z2 * (1.0 / 30240.0 + z2 * (
            -1.0 / 1209600.0 + z2 * (1.0 / 47900160.0)))))
        dx = tl.where(series, g_series, g_closed)
        dy = -x
        dpw = dy  # unused
        drlv = dy  # unused
    else:  # Gaussian with log-variance s
        s = _load_param(rlv_ptr, off, mask, rlv_const, rlv_inner, rlv_count, RLV_MODE, ACC)
        inv_var = tl.exp(-s)
        t = y - x
        q = t * t * inv_var
        loss = 0.5 * (s + q)
        if FULL:
            loss = loss + tl.full(loss.shape, 0.9189385332046727, ACC)  # 0.5*log(2*pi)
        dy = t * inv_var
        dx = -dy
        drlv = 0.5 * (1.0 - q)
        dpw = dy  # unused
    if W_MODE != 0:
        w = _load_param(w_ptr, off, mask, 1.0, w_inner, w_count, W_MODE, ACC)
        if G_W:
            tl.store(gw_ptr + off, _cast(loss * scale, gw_ptr), mask=mask)
        loss = loss * w
        dx = dx * w
        dy = dy * w
        dpw = dpw * w
    if G_X:
        tl.store(gx_ptr + off, _cast(dx * scale, gx_ptr), mask=mask)
    if G_Y:
        tl.store(gy_ptr + off, _cast(dy * scale, gy_ptr), mask=mask)
    if G_RLV:
        tl.store(grlv_ptr + off, _cast(drlv * scale, grlv_ptr), mask=mask)
    if G_PW:
        tl.store(gpw_ptr + off, _cast(dpw * scale, gpw_ptr), mask=mask)
    if ELEMENTWISE_OUT:
        tl.store(out_ptr + off, _cast(loss, out_ptr), mask=mask)
    return tl.where(mask, loss, 0.0)


@triton.jit
def _kl_tile(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
    off, mask, pmu_const, plv_const, lv_inner, lv_count, pmu_inner, pmu_count,
    plv_inner, plv_count, scale,
    LV_MODE: tl.constexpr, PMU_MODE: tl.constexpr, PLV_MODE: tl.constexpr,
    G_MU: tl.constexpr, G_LV: tl.constexpr, G_PMU: tl.constexpr, G_PLV: tl.constexpr,
    ACC: tl.constexpr,
):
    mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC)
    lv = _load_param(lv_ptr, off, mask, 0.0, lv_inner, lv_count, LV_MODE, ACC)
    pmu = _load_param(pmu_ptr, off, mask, pmu_const, pmu_inner, pmu_count, PMU_MODE, ACC)
    plv = _load_param(plv_ptr, off, mask, plv_const, plv_inner, plv_count, PLV_MODE, ACC)
    d = lv - plv
    em1 = _expm1(d)
    inv_pvar = tl.exp(-plv)
    dm = mu - pmu
    q = dm * dm * inv_pvar
    kl = 0.5 * (em1 - d + q)
    if G_MU:
        tl.store(gmu_ptr + off, _cast(dm * inv_pvar * scale, gmu_ptr), mask=mask)
    if G_LV:
        tl.store(glv_ptr + off, _cast(0.5 * em1 * scale, glv_ptr), mask=mask)
    if G_PMU:
        tl.store(gpmu_ptr + off, _cast(-dm * inv_pvar * scale, gpmu_ptr), mask=mask)
    if G_PLV:
        tl.store(gplv_ptr + off, _cast(-0.5 * (em1 + q) * scale, gplv_ptr), mask=mask)
    return tl.where(mask, kl, 0.0)


@triton.jit
def _fused_loss_fwd_kernel(
    x_ptr, y_ptr, rlv_ptr, w_ptr, pw_ptr, gx_ptr, gy_ptr, grlv_ptr, gw_ptr, gpw_ptr, out_ptr,
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
    part_r_ptr, part_k_ptr,
    row_len_r, row_len_k, chunks_r, chunks_k, tiles_r, tiles_k,
    rlv_inner, rlv_count, w_inner, w_count, pw_inner, pw_count,
    lv_inner, lv_count, pmu_inner, pmu_count, plv_inner, plv_count, y_count,
    rlv_const, rlv_const_lo, pmu_const, pmu_const_lo, plv_const, plv_const_lo,
    scale_r, scale_r_lo, scale_k, scale_k_lo,
    KIND: tl.constexpr, FULL: tl.constexpr, ELEMENTWISE_OUT: tl.constexpr,
    RLV_MODE: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr,
    LV_MODE: tl.constexpr, PMU_MODE: tl.constexpr, PLV_MODE: tl.constexpr, Y_MODE: tl.constexpr,
    G_X: tl.constexpr, G_Y: tl.constexpr, G_RLV: tl.constexpr, G_W: tl.constexpr,
    G_PW: tl.constexpr, G_MU: tl.constexpr, G_LV: tl.constexpr, G_PMU: tl.constexpr,
    G_PLV: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    # program -> (row, chunk); a chunk covers `tiles_*` consecutive tiles of its row.
    pid = tl.program_id(0).to(tl.int64)
    chunks = chunks_r + chunks_k
    row = pid // chunks
    c = pid % chunks
    rlv_const = _f64ish(rlv_const, rlv_const_lo, ACC)
    pmu_const = _f64ish(pmu_const, pmu_const_lo, ACC)
    plv_const = _f64ish(plv_const, plv_const_lo, ACC)
    scale_r = _f64ish(scale_r, scale_r_lo, ACC)
    scale_k = _f64ish(scale_k, scale_k_lo, ACC)
    if KIND != 0 and c < chunks_r:  # without a KL term chunks_k is 0 and this always holds
        _recon_chunk(x_ptr, y_ptr, rlv_ptr, w_ptr, pw_ptr, gx_ptr, gy_ptr, grlv_ptr, gw_ptr,
                     gpw_ptr, out_ptr, part_r_ptr, row, c, row_len_r, chunks_r, tiles_r,
                     rlv_const, rlv_inner, rlv_count, w_inner, w_count, pw_inner, pw_count,
                     y_count, scale_r, KIND, FULL, ELEMENTWISE_OUT, RLV_MODE, W_MODE, PW_MODE,
                     Y_MODE, G_X, G_Y, G_RLV, G_W, G_PW, BLOCK_R, ACC)
    elif HAS_KL:
        _kl_chunk(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
                  part_k_ptr, row, c - chunks_r, row_len_k, chunks_k, tiles_k, pmu_const,
                  plv_const, lv_inner, lv_count, pmu_inner, pmu_count, plv_inner, plv_count,
                  scale_k, LV_MODE, PMU_MODE, PLV_MODE, G_MU, G_LV, G_PMU, G_PLV, BLOCK_K, ACC)


@triton.jit
def _recon_chunk(x_ptr, y_ptr, rlv_ptr, w_ptr, pw_ptr, gx_ptr, gy_ptr, grlv_ptr, gw_ptr, gpw_ptr,
                 out_ptr, part_r_ptr, row, c, row_len_r, chunks_r, tiles_r, rlv_const, rlv_inner,
                 rlv_count, w_inner, w_count, pw_inner, pw_count, y_count, scale_r,
                 KIND: tl.constexpr, FULL: tl.constexpr, ELEMENTWISE_OUT: tl.constexpr,
                 RLV_MODE: tl.constexpr, W_MODE: tl.constexpr, PW_MODE: tl.constexpr,
                 Y_MODE: tl.constexpr, G_X: tl.constexpr, G_Y: tl.constexpr, G_RLV: tl.constexpr, G_W: tl.constexpr,
                 G_PW: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_R], ACC)
    base = row * row_len_r
    for t in range(0, tiles_r):
        d = (c * tiles_r + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc += _recon_tile(
            x_ptr, y_ptr, rlv_ptr, w_ptr, pw_ptr, gx_ptr, gy_ptr, grlv_ptr, gw_ptr, gpw_ptr,
            out_ptr, base + d, d < row_len_r, rlv_const, rlv_inner, rlv_count, w_inner,
            w_count, pw_inner, pw_count, y_count, scale_r, KIND, FULL, ELEMENTWISE_OUT,
            RLV_MODE, W_MODE, PW_MODE, Y_MODE, G_X, G_Y, G_RLV, G_W, G_PW, ACC,
        )
    if not ELEMENTWISE_OUT:
        tl.store(part_r_ptr + row * chunks_r + c, tl.sum(acc, axis=0))


@triton.jit
def _kl_chunk(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr, part_k_ptr,
              row, ck, row_len_k, chunks_k, tiles_k, pmu_const, plv_const, lv_inner, lv_count,
              pmu_inner, pmu_count, plv_inner, plv_count, scale_k,
              LV_MODE: tl.constexpr, PMU_MODE: tl.constexpr, PLV_MODE: tl.constexpr,
              G_MU: tl.constexpr, G_LV: tl.constexpr, G_PMU: tl.constexpr, G_PLV: tl.constexpr,
              BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_K], ACC)
    base = row * row_len_k
    for t in range(0, tiles_k):
        d = (ck * tiles_k + t) * BLOCK_K + tl.arange(0, BLOCK_K)
        acc += _kl_tile(
            mu_ptr, lv_ptr, pmu_ptr, plv_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
            base + d, d < row_len_k, pmu_const, plv_const, lv_inner, lv_count, pmu_inner,
            pmu_count, plv_inner, plv_count, scale_k, LV_MODE, PMU_MODE, PLV_MODE,
            G_MU, G_LV, G_PMU, G_PLV, ACC,
        )
    tl.store(part_k_ptr + row * chunks_k + ck, tl.sum(acc, axis=0))


@triton.jit
def _finalize_kernel(
    part_r_ptr, part_k_ptr, loss_ptr, nll_ptr, kl_ptr, rows, chunks_r, chunks_k,
    scale_r, scale_r_lo, scale_k, scale_k_lo, beta, beta_lo, beta_ptr,
    PER_ROW: tl.constexpr, HAS_BETA_T: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    # One program, fixed order: the loss is bitwise reproducible.
    scale_r = _f64ish(scale_r, scale_r_lo, ACC)
    scale_k = _f64ish(scale_k, scale_k_lo, ACC)
    beta = _beta(beta, beta_lo, beta_ptr, HAS_BETA_T, ACC)
    tot_r = tl.zeros([BLOCK_ROWS], ACC)
    tot_k = tl.zeros([BLOCK_ROWS], ACC)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        rmask = r < rows
        s_r = tl.zeros([BLOCK_ROWS], ACC)
        for c0 in range(0, chunks_r, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (c < chunks_r)[None, :]
            s_r += tl.sum(tl.load(part_r_ptr + r[:, None] * chunks_r + c[None, :], mask=m, other=0.0), axis=1)
        s_k = tl.zeros([BLOCK_ROWS], ACC)
        for c0 in range(0, chunks_k, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (c < chunks_k)[None, :]
            s_k += tl.sum(tl.load(part_k_ptr + r[:, None] * chunks_k + c[None, :], mask=m, other=0.0), axis=1)
        if PER_ROW:
            nll = s_r * scale_r
            kl = s_k * scale_k
            tl.store(nll_ptr + r, nll, mask=rmask)
            tl.store(kl_ptr + r, kl, mask=rmask)
            tl.store(loss_ptr + r, nll + beta * kl, mask=rmask)
        else:
            tot_r += s_r
            tot_k += s_k
    if not PER_ROW:
        nll = tl.sum(tot_r, axis=0) * scale_r
        kl = tl.sum(tot_k, axis=0) * scale_k
        tl.store(nll_ptr, nll)
        tl.store(kl_ptr, kl)
        tl.store(loss_ptr, nll + beta * kl)


@triton.jit
def _coef(g_loss_ptr, g_term_ptr, idx, weight, HAS_LOSS: tl.constexpr, HAS_TERM: tl.constexpr,
          ACC: tl.constexpr):
    # d(output)/d(term) for one stream: weight * g_loss + g_term (absent ones count 0)
    c = (idx * 0).to(ACC)
    if HAS_LOSS:
        c += tl.load(g_loss_ptr + idx).to(ACC) * weight
    if HAS_TERM:
        c += tl.load(g_term_ptr + idx).to(ACC)
    return c


@triton.jit
def _scale_buf(ptr, off, mask, c):
    v = tl.load(ptr + off, mask=mask, other=0.0)
    tl.store(ptr + off, _cast(v.to(c.dtype) * c, ptr), mask=mask)


@triton.jit
def _scale_grads_kernel(
    r0_ptr, r1_ptr, r2_ptr, r3_ptr, r4_ptr, k0_ptr, k1_ptr, k2_ptr, k3_ptr,
    g_loss_ptr, g_nll_ptr, g_kl_ptr, beta, beta_lo, beta_ptr,
    row_len_r, row_len_k, chunks_r, chunks_k, tiles_r, tiles_k,
    N_R: tl.constexpr, N_K: tl.constexpr, HAS_LOSS: tl.constexpr, HAS_NLL: tl.constexpr,
    HAS_KL: tl.constexpr, HAS_BETA_T: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # grad *= coefficient, in place on the buffers the forward wrote. MODE: 0 one scalar
    # coefficient, 1 one per row, 2 one per element (the drop-in BCE's "none"). A row whose
    # coefficient is 1 returns before touching memory: the usual backward moves no bytes.
    pid = tl.program_id(0).to(tl.int64)
    chunks = chunks_r + chunks_k
    row = pid // chunks
    c = pid % chunks
    beta = _beta(beta, beta_lo, beta_ptr, HAS_BETA_T, ACC)
    if MODE == 1:
        idx = row
    else:
        idx = row * 0
    if c < chunks_r:
        if MODE == 2:
            for t in range(0, tiles_r):
                d = (c * tiles_r + t) * BLOCK + tl.arange(0, BLOCK)
                mask = d < row_len_r
                off = row * row_len_r + d
                ce = _coef(g_loss_ptr, g_nll_ptr, off, 1.0, HAS_LOSS, HAS_NLL, ACC)
                _scale_bufs(r0_ptr, r1_ptr, r2_ptr, r3_ptr, r4_ptr, off, mask, ce, N_R)
        else:
            cr = _coef(g_loss_ptr, g_nll_ptr, idx, 1.0, HAS_LOSS, HAS_NLL, ACC)
            if cr != 1.0:
                for t in range(0, tiles_r):
                    d = (c * tiles_r + t) * BLOCK + tl.arange(0, BLOCK)
                    off = row * row_len_r + d
                    _scale_bufs(r0_ptr, r1_ptr, r2_ptr, r3_ptr, r4_ptr, off, d < row_len_r, cr, N_R)
    else:
        ck = c - chunks_r
        kc = _coef(g_loss_ptr, g_kl_ptr, idx, beta, HAS_LOSS, HAS_KL, ACC)
        if kc != 1.0:
            for t in range(0, tiles_k):
                d = (ck * tiles_k + t) * BLOCK + tl.arange(0, BLOCK)
                off = row * row_len_k + d
                _scale_bufs(k0_ptr, k1_ptr, k2_ptr, k3_ptr, k3_ptr, off, d < row_len_k, kc, N_K)


@triton.jit
def _scale_bufs(p0, p1, p2, p3, p4, off, mask, c, N: tl.constexpr):
    _scale_buf(p0, off, mask, c)
    if N > 1:
        _scale_buf(p1, off, mask, c)
    if N > 2:
        _scale_buf(p2, off, mask, c)
    if N > 3:
        _scale_buf(p3, off, mask, c)
    if N > 4:
        _scale_buf(p4, off, mask, c)


# ----------------------------------------------------------------------------------------------
# The discretized logistic mixture (PixelCNN++): one program takes BLOCK pixels of one example,
# a [BLOCK, M_PAD] tile per parameter group, so a pixel's mixture stays in registers. The
# formulas and their derivatives are those of csrc/dmol_impl.h (see reference.dmol_log_prob
# for the function itself).


@triton.jit
def _tanh(a):
    # sign(a) * -expm1(-2|a|) / (2 + expm1(-2|a|)), accurate near 0
    e = _expm1(-2.0 * tl.abs(a))
    t = -e / (2.0 + e)
    return tl.where(a < 0, -t, t)


@triton.jit
def _dmol_channel(xb, x_sp, kk, msk, base, xc, mean_add, h, two_h, log_half, M: tl.constexpr,
                  ACC: tl.constexpr):
    """log P_ck of one colour channel for the whole tile, and d log P / du, d log P / d raw
    log-scale (u = x_c - mean)."""
    mean = tl.load(xb + (base + kk)[None, :] * x_sp, mask=msk, other=0.0).to(ACC) + mean_add
    raw = tl.load(xb + (base + M + kk)[None, :] * x_sp, mask=msk, other=0.0).to(ACC)
    s = _max(raw, -7.0)
    inv = tl.exp(-s)
    u = xc - mean
    plus = inv * (u + h)
    minus = inv * (u - h)
    ep = tl.exp(-tl.abs(plus))
    em = tl.exp(-tl.abs(minus))
    rp = 1.0 / (1.0 + ep)  # sigmoid(|plus|)
    rm = 1.0 / (1.0 + em)
    # the bin probability without cancellation: -expm1(-d) * N / ((1 + ep)(1 + em)), d =
    # plus - minus, N = em (both arguments > 0), ep (both <= 0), else 1
    nfac = tl.where(minus > 0, em, tl.where(plus > 0, 1.0, ep))
    delta = (-_expm1(-two_h * inv) * nfac) * (rp * rm)
    dc = _max(delta, 1e-6)
    logp = tl.log(dc)
    idelta = 1.0 / dc
    epr = ep * rp  # sigmoid(-|plus|)
    emr = em * rm
    dplus = (epr * rp) * idelta  # sigmoid'(plus) / delta
    dminus = -(emr * rm) * idelta
    lo = xc < -0.999
    hi = xc > 0.999
    # edge bins: log sigmoid(plus) below, -softplus(minus) above
    logp = tl.where(lo, tl.minimum(plus, 0.0) - _log1p(ep),
                    tl.where(hi, -(tl.maximum(minus, 0.0) + _log1p(em)), logp))
    dplus = tl.where(lo, tl.where(plus >= 0, epr, rp), tl.where(hi, 0.0, dplus))
    dminus = tl.where(hi, -tl.where(minus >= 0, rm, emr), tl.where(lo, 0.0, dminus))
    du = inv * (dplus + dminus)
    ds = -(plus * dplus + minus * dminus)
    # a bin probability at most 1e-5: the density at the bin centre, log pdf - log((K-1)/2)
    fb = (delta <= 1e-5) & ~(lo | hi)
    mid = inv * u
    e = tl.exp(-tl.abs(mid))
    sp = tl.maximum(mid, 0.0) + _log1p(e)
    th = (1.0 - e) / (1.0 + e)
    dmid = tl.where(mid < 0, th, -th)  # 1 - 2 sigmoid(mid)
    logp = tl.where(fb, mid - s - (sp + sp) - log_half, logp)
    du = tl.where(fb, inv * dmid, du)
    ds = tl.where(fb, -(mid * dmid + 1.0), ds)
    ds = tl.where(raw >= -7.0, ds, 0.0)  # the floor passes no gradient below it
    return logp, du, ds


@triton.jit
def _dmol_kernel(
    x_ptr, y_ptr, part_ptr, gx_ptr, pixels, chunks, x_sb, x_sp, x_ss, y_sb, y_sc, y_ss,
    h_hi, h_lo, lh_hi, lh_lo, scale_hi, scale_lo,
    M: tl.constexpr, C: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    G_X: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // chunks
    chunk = pid % chunks
    pix = chunk * BLOCK + tl.arange(0, BLOCK)
    pmask = pix < pixels
    kk = tl.arange(0, M_PAD)
    kmask = kk < M
    msk = pmask[:, None] & kmask[None, :]
    xb = x_ptr + b * x_sb + pix[:, None] * x_ss
    yb = y_ptr + b * y_sb + pix * y_ss
    h = _f64ish(h_hi, h_lo, ACC)
    log_half = _f64ish(lh_hi, lh_lo, ACC)
    two_h = h + h
    logits = tl.load(xb + kk[None, :] * x_sp, mask=msk, other=0.0).to(ACC)
    logits = tl.where(kmask[None, :], logits, -float("inf"))
    lmax = tl.max(logits, 1)
    le = tl.exp(logits - lmax[:, None])
    lsum = tl.sum(le, 1)
    x0 = tl.load(yb, mask=pmask, other=0).to(ACC)[:, None]
    if C == 3:
        x1 = tl.load(yb + y_sc, mask=pmask, other=0).to(ACC)[:, None]
        x2 = tl.load(yb + 2 * y_sc, mask=pmask, other=0).to(ACC)[:, None]
        t0 = _tanh(tl.load(xb + (3 * M + kk)[None, :] * x_sp, mask=msk, other=0.0).to(ACC))
        t1 = _tanh(tl.load(xb + (6 * M + kk)[None, :] * x_sp, mask=msk, other=0.0).to(ACC))
        t2 = _tanh(tl.load(xb + (9 * M + kk)[None, :] * x_sp, mask=msk, other=0.0).to(ACC))
        lp0, du0, ds0 = _dmol_channel(xb, x_sp, kk, msk, M, x0, 0.0, h, two_h, log_half, M, ACC)
        lp1, du1, ds1 = _dmol_channel(xb, x_sp, kk, msk, 4 * M, x1, t0 * x0, h, two_h, log_half,
                                      M, ACC)
        lp2, du2, ds2 = _dmol_channel(xb, x_sp, kk, msk, 7 * M, x2, t1 * x0 + t2 * x1, h, two_h,
                                      log_half, M, ACC)
        a = logits + (lp0 + lp1 + lp2)
    else:
        lp0, du0, ds0 = _dmol_channel(xb, x_sp, kk, msk, M, x0, 0.0, h, two_h, log_half, M, ACC)
        a = logits + lp0
    a = tl.where(kmask[None, :], a, -float("inf"))
    amax = tl.max(a, 1)
    ae = tl.exp(a - amax[:, None])
    asum = tl.sum(ae, 1)
    loss = (lmax + tl.log(lsum)) - (amax + tl.log(asum))  # -log p per pixel
    tl.store(part_ptr + pid, tl.sum(tl.where(pmask, loss, 0.0), 0))
    if G_X:
        scale = _f64ish(scale_hi, scale_lo, ACC)
        gb = gx_ptr + b * x_sb + pix[:, None] * x_ss
        rs = ae * (scale / asum)[:, None]  # responsibility times scale
        pi = le * (scale / lsum)[:, None]
        tl.store(gb + kk[None, :] * x_sp, _cast(pi - rs, gx_ptr), mask=msk)
        g0 = rs * du0
        tl.store(gb + (M + kk)[None, :] * x_sp, _cast(g0, gx_ptr), mask=msk)
        tl.store(gb + (2 * M + kk)[None, :] * x_sp, _cast(-rs * ds0, gx_ptr), mask=msk)
        if C == 3:
            g1 = rs * du1
            g2 = rs * du2
            tl.store(gb + (3 * M + kk)[None, :] * x_sp, _cast(g1 * x0 * (1.0 - t0 * t0), gx_ptr),
                     mask=msk)
            tl.store(gb + (4 * M + kk)[None, :] * x_sp, _cast(g1, gx_ptr), mask=msk)
            tl.store(gb + (5 * M + kk)[None, :] * x_sp, _cast(-rs * ds1, gx_ptr), mask=msk)
            tl.store(gb + (6 * M + kk)[None, :] * x_sp, _cast(g2 * x0 * (1.0 - t1 * t1), gx_ptr),
                     mask=msk)
            tl.store(gb + (7 * M + kk)[None, :] * x_sp, _cast(g2, gx_ptr), mask=msk)
            tl.store(gb + (8 * M + kk)[None, :] * x_sp, _cast(-rs * ds2, gx_ptr), mask=msk)
            tl.store(gb + (9 * M + kk)[None, :] * x_sp, _cast(g2 * x1 * (1.0 - t2 * t2), gx_ptr),
                     mask=msk)


# ----------------------------------------------------------------------------------------------
# Host-side launchers. csrc/run.cpp plans and lowers every call (contiguous or memory-order
# flat buffers, broadcast geometry, scales) and calls these through the launch-only ops
# vae_fast::triton_fwd / triton_scale, which vae_fast/_ext.py registers: they only launch.

_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# programs per row under the interpreter (several, so multi-chunk paths are exercised on CPU)
INTERPRET_PROGRAMS_PER_ROW = 3
FINAL_BLOCK = 32
LAST_NUM_WARPS = {}  # kernel name -> num_warps of its latest launch (the interpreter drops it; tests record it)


def _warps(block: int, itemsize: int = 4) -> int:
    # at least 16 bytes (one 128-bit load) per thread and tensor: small rows get fewer warps
    return max(1, min(4, block * itemsize // (16 * 32)))


def _itemsize(*tensors) -> int:
    return min((t.element_size() for t in tensors if t is not None and t.dtype != torch.bool), default=4)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    """About 8 programs per SM (the SM count is asked once per GPU: the query costs several us,
    and every launch needs it)."""
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 0


def _split(row_len: int, block: int, rows: int, device) -> tuple[int, int]:
    """(chunks per row, tiles per chunk): about 8 programs per SM on a GPU, a few per row
    under the interpreter."""
    tiles = triton.cdiv(row_len, block)
    if tiles == 0:
        return 0, 0
    target = _programs(device)
    want = triton.cdiv(target, max(rows, 1)) if target else INTERPRET_PROGRAMS_PER_ROW
    chunks = max(1, min(tiles, want))
    per = triton.cdiv(tiles, chunks)
    return triton.cdiv(tiles, per), per


def _hilo(v: float) -> tuple[float, float]:
    """A double as two fp32-exact floats whose sum in float64 is v to ~46 bits."""
    hi = float(np.float32(v))
    lo = v - hi if math.isfinite(v) and math.isfinite(hi) else 0.0
    return hi, lo


def _block(row_len: int, cap: int) -> int:
    return min(cap, max(16, _next_pow2(row_len)))


def fused_forward(x, y, rlv, w, pw, mu, lv, pmu, plv, *, rows, row_len_r, row_len_k, modes,
                  inners, counts, consts, kind, full, red_mode, scale_r, scale_k, beta,
                  out_loss, out_nll, out_kl, grads, beta_t=None):
    acc = out_loss.dtype
    device = out_loss.device
    any_t = next(t for t in (x, mu) if t is not None)
    dummy = lambda t: any_t if t is None else t  # noqa: E731  (never read: constexpr-pruned)
    block_r = _block(row_len_r, 2048)
    block_k = _block(row_len_k, 1024)
    chunks_r, tiles_r = _split(row_len_r, block_r, rows, device) if kind else (0, 0)
    chunks_k, tiles_k = _split(row_len_k, block_k, rows, device) if mu is not None else (0, 0)
    elementwise = red_mode == ELEMENTWISE
    part_r = torch.empty((rows, chunks_r), device=device, dtype=acc)
    part_k = torch.empty((rows, chunks_k), device=device, dtype=acc)
    n_prog = rows * (chunks_r + chunks_k)
    g = [dummy(t) for t in grads]
    if n_prog:
        warps = _warps(max(block_r if chunks_r else 0, block_k if chunks_k else 0), _itemsize(x, mu))
        LAST_NUM_WARPS["_fused_loss_fwd_kernel"] = warps
        _fused_loss_fwd_kernel[(n_prog,)](
            dummy(x), dummy(y), dummy(rlv), dummy(w), dummy(pw), *g[:5],
            out_loss if elementwise else any_t,
            dummy(mu), dummy(lv), dummy(pmu), dummy(plv), *g[5:],
            part_r if chunks_r else any_t, part_k if chunks_k else any_t,
            row_len_r, row_len_k, chunks_r, chunks_k, tiles_r, tiles_k,
            inners[0], counts[0], inners[1], counts[1], inners[2], counts[2],
            inners[3], counts[3], inners[4], counts[4], inners[5], counts[5], counts[6],
            *_hilo(consts[0]), *_hilo(consts[1]), *_hilo(consts[2]), *_hilo(scale_r), *_hilo(scale_k),
            KIND=kind, FULL=bool(full), ELEMENTWISE_OUT=elementwise,
            RLV_MODE=modes[0], W_MODE=modes[1], PW_MODE=modes[2],
            LV_MODE=modes[3], PMU_MODE=modes[4], PLV_MODE=modes[5], Y_MODE=modes[6],
            G_X=grads[0] is not None, G_Y=grads[1] is not None, G_RLV=grads[2] is not None,
            G_W=grads[3] is not None, G_PW=grads[4] is not None, G_MU=grads[5] is not None,
            G_LV=grads[6] is not None, G_PMU=grads[7] is not None, G_PLV=grads[8] is not None,
            HAS_KL=mu is not None, BLOCK_R=block_r, BLOCK_K=block_k, ACC=_ACC[acc],
            num_warps=warps,
        )
    if not elementwise:
        LAST_NUM_WARPS["_finalize_kernel"] = 4
        _finalize_kernel[(1,)](
            part_r, part_k, out_loss, out_nll, out_kl, rows, chunks_r, chunks_k,
            *_hilo(scale_r), *_hilo(scale_k), *_hilo(beta), out_loss if beta_t is None else beta_t,
            PER_ROW=red_mode == ROWS, HAS_BETA_T=beta_t is not None, BLOCK_ROWS=FINAL_BLOCK,
            BLOCK_C=FINAL_BLOCK, ACC=_ACC[acc], num_warps=4,
        )


def scale_(bufs_r, bufs_k, g_loss, g_nll, g_kl, *, beta, red_mode, rows, row_len_r, row_len_k,
           beta_t=None):
    if not bufs_r and not bufs_k:
        return
    anchor = (bufs_r or bufs_k)[0]
    device = anchor.device
    coefs = [g for g in (g_loss, g_nll, g_kl) if g is not None]
    acc = torch.float64 if any(g.dtype == torch.float64 for g in coefs) else torch.float32
    block = _block(max(row_len_r if bufs_r else 0, row_len_k if bufs_k else 0), 2048)
    chunks_r, tiles_r = _split(row_len_r, block, rows, device) if bufs_r else (0, 0)
    chunks_k, tiles_k = _split(row_len_k, block, rows, device) if bufs_k else (0, 0)
    n_prog = rows * (chunks_r + chunks_k)
    if not n_prog:
        return
    pad = lambda bufs, n: list(bufs) + [anchor] * (n - len(bufs))  # noqa: E731
    dummy = lambda t: anchor if t is None else t  # noqa: E731
    warps = _warps(block, _itemsize(*bufs_r, *bufs_k))
    LAST_NUM_WARPS["_scale_grads_kernel"] = warps
    _scale_grads_kernel[(n_prog,)](
        *pad(bufs_r, 5), *pad(bufs_k, 4), dummy(g_loss), dummy(g_nll), dummy(g_kl), *_hilo(beta),
        dummy(beta_t),
        row_len_r, row_len_k, chunks_r, chunks_k, tiles_r, tiles_k,
        N_R=len(bufs_r), N_K=len(bufs_k), HAS_LOSS=g_loss is not None,
        HAS_NLL=g_nll is not None, HAS_KL=g_kl is not None, HAS_BETA_T=beta_t is not None,
        MODE=red_mode, BLOCK=block,
        ACC=_ACC[acc], num_warps=warps,
    )


def launch_forward(x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t, out_loss, out_nll, out_kl, grads,
                   ints, floats):
    """vae_fast::triton_fwd: `ints` = rows, row lengths (recon, KL), then modes, inners and
    counts of (rlv, w, pw, lv, pmu, plv, y), kind, full, reduction mode; `floats` = constants
    of (rlv, pmu, plv), scales (recon, KL), beta (csrc/run.cpp, run_triton)."""
    fused_forward(x, y, rlv, w, pw, mu, lv, pmu, plv, rows=ints[0], row_len_r=ints[1],
                  row_len_k=ints[2], modes=ints[3:10], inners=ints[10:17], counts=ints[17:24],
                  kind=ints[24], full=bool(ints[25]), red_mode=ints[26], consts=floats[0:3],
                  scale_r=floats[3], scale_k=floats[4], beta=floats[5], out_loss=out_loss,
                  out_nll=out_nll, out_kl=out_kl, grads=grads, beta_t=beta_t)


def launch_scale(bufs_r, bufs_k, g_loss, g_nll, g_kl, beta_t, ints, beta):
    """vae_fast::triton_scale: `ints` = reduction mode, rows, row lengths (recon, KL)."""
    scale_(bufs_r, bufs_k, g_loss, g_nll, g_kl, beta=beta, red_mode=ints[0], rows=ints[1],
           row_len_r=ints[2], row_len_k=ints[3], beta_t=beta_t)


DMOL_TILE = 256  # pixels x padded components per program
DMOL_PER_THREAD = 2


def launch_dmol(x, y, sums, gx, ints, floats):
    """vae_fast::triton_dmol: `ints` = batch, pixels, mixture components M, channels C, then the
    element strides of params (batch, channel, pixel) and target (batch, channel, pixel);
    `floats` = num_bins, the gradient's scale. Writes the per-example sums of -log p into
    `sums` and d(-log p)/d params * scale into `gx` (csrc/run.cpp, run_dmol)."""
    batch, pixels, mix, ch, x_sb, x_sp, x_ss, y_sb, y_sc, y_ss = (int(v) for v in ints)
    num_bins, scale = floats
    m_pad = _next_pow2(mix)
    block = max(1, min(_next_pow2(pixels), DMOL_TILE // m_pad))
    chunks = triton.cdiv(pixels, block)
    if batch == 0:
        return
    if chunks == 0:
        sums.zero_()
        return
    part = torch.empty((batch, chunks), device=sums.device, dtype=sums.dtype)
    # at most DMOL_PER_THREAD tile elements per thread (at most one in float64): a pixel's ~20 live
    # tiles then fit in the registers without spilling (python -m vae_fast.aot checks it)
    # (float64 always takes 8 warps: with 4, small tiles still spilled 8 bytes on sm_90)
    if sums.dtype == torch.float64:
        warps = 8
    else:
        warps = max(1, min(8, block * m_pad // (32 * DMOL_PER_THREAD)))
    LAST_NUM_WARPS["_dmol_kernel"] = warps
    _dmol_kernel[(batch * chunks,)](
        x, y, part, x if gx is None else gx, pixels, chunks, x_sb, x_sp, x_ss, y_sb, y_sc, y_ss,
        *_hilo(1.0 / (num_bins - 1)), *_hilo(math.log((num_bins - 1) / 2)), *_hilo(scale),
        M=mix, C=ch, M_PAD=m_pad, BLOCK=block, G_X=gx is not None, ACC=_ACC[sums.dtype],
        num_warps=warps,
    )
    torch.sum(part, 1, out=sums)  # in chunk order: deterministic
