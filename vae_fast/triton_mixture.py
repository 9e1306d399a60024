"""The Triton kernels of vae_fast.mixture_prior_kl (the op vae_fast::mixture_kl, csrc/mixture.cpp,
which has the formulas and the gradients written out).

Each program takes a tile of examples [BLOCK_B] (forward, z / mu / logvar gradients) or of
components [BLOCK_K] (prior gradients) and walks the other axis in [BLOCK_B, BLOCK_K] tiles with
a loop over the latent dimension j, summing (z_bj - m_kj)^2 p_kj directly (no tl.dot of an
expanded quadratic form: that cancels near a tight component). The forward keeps an online
logsumexp over the component tiles; when a backward will follow it writes the responsibilities
r (B, K), which the backward kernels read. Sums over b run in a fixed order inside one program:
no atomics, the same inputs give the same bits. The host side (csrc/mixture.cpp) hands every
tensor over contiguous and in the accumulation dtype, with the prior's precisions
p = exp(-plv) and per-component constants ck = log w - 0.5 sum_j plv precomputed (K * Z work).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
LAST_NUM_WARPS = {}  # kernel name -> num_warps of its latest launch (tests record it for vae_fast.aot)
KERNELS = ("_mixture_fwd_kernel", "_mixture_bwd_rows_kernel", "_mixture_bwd_cols_kernel")


@triton.jit
def _mixture_fwd_kernel(
    z_ptr, mu_ptr, lv_ptr, pm_ptr, prec_ptr, ck_ptr, kl_ptr, r_ptr, B, K, Z,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rows < B
    zrow = z_ptr + rows * Z
    # log q_b, less its 0.5 log 2pi (which cancels): -0.5 * sum_j (lv + d^2 e^-lv)
    sq = tl.zeros([BLOCK_B], ACC)
    for j in range(0, Z):
        zj = tl.load(zrow + j, mask=bmask, other=0.0)
        d = zj - tl.load(mu_ptr + rows * Z + j, mask=bmask, other=0.0)
        lv = tl.load(lv_ptr + rows * Z + j, mask=bmask, other=0.0)
        sq += lv + d * d * tl.exp(-lv)
    run_max = tl.full([BLOCK_B], -float("inf"), ACC)
    run_sum = tl.zeros([BLOCK_B], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < K
        quad = tl.zeros([BLOCK_B, BLOCK_K], ACC)
        for j in range(0, Z):
            zj = tl.load(zrow + j, mask=bmask, other=0.0)
            mj = tl.load(pm_ptr + ks * Z + j, mask=kmask, other=0.0)
            pj = tl.load(prec_ptr + ks * Z + j, mask=kmask, other=0.0)
            u = zj[:, None] - mj[None, :]
            quad += u * u * pj[None, :]
        ln = tl.load(ck_ptr + ks, mask=kmask, other=0.0)[None, :] - 0.5 * quad
        ln = tl.where(kmask[None, :], ln, -float("inf"))
        if HAS_R:  # log w_k + log N_bk, normalised below once log p_b is known
            tl.store(r_ptr + rows[:, None] * K + ks[None, :], ln, mask=bmask[:, None] & kmask[None, :])
        new_max = tl.maximum(run_max, tl.max(ln, 1))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # no -inf - -inf = nan
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(ln - safe[:, None]), 1)
        run_max = new_max
    log_p = run_max + tl.log(run_sum)  # -inf when every component is (then KL = +inf)
    tl.store(kl_ptr + rows, -0.5 * sq - log_p, mask=bmask)
    if HAS_R:
        tl.debug_barrier()  # the tiles written above are read back by the same program
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            msk = bmask[:, None] & (ks < K)[None, :]
            ptrs = r_ptr + rows[:, None] * K + ks[None, :]
            tl.store(ptrs, tl.exp(tl.load(ptrs, mask=msk, other=0.0) - log_p[:, None]), mask=msk)


@triton.jit
def _mixture_bwd_rows_kernel(
    z_ptr, mu_ptr, lv_ptr, pm_ptr, prec_ptr, r_ptr, gb_ptr, gz_ptr, gmu_ptr, glv_ptr, B, K, Z,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, G_Z: tl.constexpr, G_MU: tl.constexpr,
    G_LV: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rows < B
    g = tl.load(gb_ptr + rows, mask=bmask, other=0.0)
    for j in range(0, Z):
        off = rows * Z + j
        zj = tl.load(z_ptr + off, mask=bmask, other=0.0)
        d = zj - tl.load(mu_ptr + off, mask=bmask, other=0.0)
        de = d * tl.exp(-tl.load(lv_ptr + off, mask=bmask, other=0.0))
        if G_Z:
            # sum_k r_bk (z_bj - m_kj) p_kj: the prior's pull on z
            pull = tl.zeros([BLOCK_B], ACC)
            for k0 in range(0, K, BLOCK_K):
                ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                kmask = ks < K
                r = tl.load(r_ptr + rows[:, None] * K + ks[None, :],
                            mask=bmask[:, None] & kmask[None, :], other=0.0)
                mj = tl.load(pm_ptr + ks * Z + j, mask=kmask, other=0.0)
                pj = tl.load(prec_ptr + ks * Z + j, mask=kmask, other=0.0)
                pull += tl.sum(r * pj[None, :] * (zj[:, None] - mj[None, :]), 1)
            tl.store(gz_ptr + off, g * (pull - de), mask=bmask)
        if G_MU:
            tl.store(gmu_ptr + off, g * de, mask=bmask)
        if G_LV:
            tl.store(glv_ptr + off, 0.5 * g * (d * de - 1.0), mask=bmask)


@triton.jit
def _mixture_bwd_cols_kernel(
    z_ptr, pm_ptr, prec_ptr, r_ptr, gb_ptr, gpm_ptr, gplv_ptr, gr_ptr, B, K, Z,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, G_PM: tl.constexpr, G_PLV: tl.constexpr,
    G_R: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    # sum_b g_b r_bk, in b order
    total = tl.zeros([BLOCK_K], ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        bmask = rows < B
        g = tl.load(gb_ptr + rows, mask=bmask, other=0.0)
        r = tl.load(r_ptr + rows[:, None] * K + ks[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
        total += tl.sum(g[:, None] * r, 0)
    if G_R:
        tl.store(gr_ptr + ks, total, mask=kmask)
    if G_PM or G_PLV:
        for j in range(0, Z):
            mj = tl.load(pm_ptr + ks * Z + j, mask=kmask, other=0.0)
            pj = tl.load(prec_ptr + ks * Z + j, mask=kmask, other=0.0)
            su = tl.zeros([BLOCK_K], ACC)  # sum_b g_b r_bk u_bkj
            sq = tl.zeros([BLOCK_K], ACC)  # sum_b g_b r_bk u_bkj^2
            for b0 in range(0, B, BLOCK_B):
                rows = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
                bmask = rows < B
                g = tl.load(gb_ptr + rows, mask=bmask, other=0.0)
                zj = tl.load(z_ptr + rows * Z + j, mask=bmask, other=0.0)
                r = tl.load(r_ptr + rows[:, None] * K + ks[None, :],
                            mask=bmask[:, None] & kmask[None, :], other=0.0)
                u = zj[:, None] - mj[None, :]
                t = g[:, None] * r * u
                su += tl.sum(t, 0)
                sq += tl.sum(t * u, 0)
            if G_PM:
                tl.store(gpm_ptr + ks * Z + j, -pj * su, mask=kmask)
            if G_PLV:
                tl.store(gplv_ptr + ks * Z + j, 0.5 * (total - pj * sq), mask=kmask)


# ----------------------------------------------------------------------------------------------
# Launchers: the kernels of the launch-only ops vae_fast::triton_mixture_fwd / _bwd
# (vae_fast/_ext.py registers them; csrc/mixture.cpp calls them).

WARPS = 4


def _blocks(B: int, K: int) -> tuple[int, int]:
    # [32, 32] tiles on a GPU (8 elements per thread on 4 warps, what vae_fast.aot compiles);
    # [16, 16] under the interpreter, so small test problems span several tiles with masked edges
    cap = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 32
    return (max(16, min(cap, triton.next_power_of_2(max(B, 1)))),
            max(16, min(cap, triton.next_power_of_2(K))))


def launch_forward(z, mu, lv, pm, prec, ck, kl, r):
    """Writes the per-example KL into `kl` (B,) and, when given, r (B, K)."""
    B, Z = z.shape
    K = pm.shape[0]
    if B == 0:
        return
    bb, bk = _blocks(B, K)
    LAST_NUM_WARPS["_mixture_fwd_kernel"] = WARPS
    _mixture_fwd_kernel[(triton.cdiv(B, bb),)](
        z, mu, lv, pm, prec, ck, kl, z if r is None else r, B, K, Z,
        BLOCK_B=bb, BLOCK_K=bk, HAS_R=r is not None, ACC=_ACC[z.dtype], num_warps=WARPS)


def launch_backward(z, mu, lv, pm, prec, r, gb, gz, gmu, glv, gpm, gplv, gr):
    """The gradients asked for (the outputs given), from dLoss/dKL_b `gb` and r."""
    B, Z = z.shape
    K = pm.shape[0]
    bb, bk = _blocks(B, K)
    acc = _ACC[z.dtype]
    if B and (gz is not None or gmu is not None or glv is not None):
        LAST_NUM_WARPS["_mixture_bwd_rows_kernel"] = WARPS
        _mixture_bwd_rows_kernel[(triton.cdiv(B, bb),)](
            z, mu, lv, pm, prec, r, gb, *(z if t is None else t for t in (gz, gmu, glv)), B, K, Z,
            BLOCK_B=bb, BLOCK_K=bk, G_Z=gz is not None, G_MU=gmu is not None,
            G_LV=glv is not None, ACC=acc, num_warps=WARPS)
    if gpm is not None or gplv is not None or gr is not None:
        LAST_NUM_WARPS["_mixture_bwd_cols_kernel"] = WARPS
        _mixture_bwd_cols_kernel[(triton.cdiv(K, bk),)](
            z, pm, prec, r, gb, *(z if t is None else t for t in (gpm, gplv, gr)), B, K, Z,
            BLOCK_B=bb, BLOCK_K=bk, G_PM=gpm is not None, G_PLV=gplv is not None,
            G_R=gr is not None, ACC=acc, num_warps=WARPS)
