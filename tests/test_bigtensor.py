"""Tensors over 2^31 elements: offsets must be 64-bit everywhere.

Reading the offset arithmetic out of compiled or interpreted kernels is impractical, so:
(a) the host-side plan (csrc/plan.cpp: rows, row lengths, scales, how a broadcast parameter
    is read; read back with `torch.ops.vae_fast.plan`), the Triton launchers' `_split` and the
    op's Meta kernel are checked for N > 2^31 on meta tensors (nothing is allocated),
    together with the kernels' source (every program id widened to int64 before use);
(b) a slow test (`-m slow`) runs the fused Bernoulli ELBO over > 2^31 elements through the
    public API on the C++ backend (float16 logits, bool targets, ~18.4 GiB of RAM) and checks
    the loss and every gradient element against closed-form values; a gpu_required twin does
    the same through Triton on CUDA.
"""
from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before vae_fast imports triton (conftest does too)

import vae_fast  # noqa: E402
from vae_fast import ops, reference  # noqa: E402
from vae_fast._enums import Api, Backend, Likelihood, ParamMode, Reduction  # noqa: E402

from conftest import require_backend  # noqa: E402

INT32_MAX = 2**31 - 1
GIB = 1 << 30
REDUCTIONS = {"batchmean": Reduction.BATCHMEAN, "sum": Reduction.SUM, "mean": Reduction.MEAN,
              "none": Reduction.PER_SAMPLE}


def meta(*shape, grad=False):
    return torch.empty(shape, device="meta").requires_grad_(grad)


def plan(x=None, y=None, rlv=None, mu=None, lv=None, pmu=None, plv=None, *, kind=Likelihood.GAUSSIAN,
         reduction="sum"):
    """csrc/plan.cpp's numbers for a call: (rows, row lengths, scales, {slot: (mode, inner, count)})."""
    require_backend("cpu")
    ints, floats = torch.ops.vae_fast.plan(
        x, y, rlv, None, None, mu, lv, pmu, plv, None, int(Api.RAW), int(kind),
        int(REDUCTIONS[reduction]), True, 0.0, 0.0, 0.0, 0.0, 1.0, int(Backend.CPU), 0)
    modes, inners, counts = ints[7:16], ints[16:25], ints[25:34]
    reads = {s: (modes[i], inners[i], counts[i]) for i, s in enumerate(ops.SLOTS)}
    return ints[0], ints[1], ints[2], floats[0], floats[1], reads


# ---------------------------------------------------------------------------------------------
# (a) host-side geometry, no allocation

BIG_SHAPES = [(1, 2**31 + 5), (3, 732_605_099), (2, 3, 2**15, 2**15 + 1), (5, 2**31 - 1)]


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_geometry_over_2_31(shape, reduction):
    x, mu = meta(*shape), meta(shape[0], 32)
    rows, row_len_r, row_len_k, scale_r, scale_k, _ = plan(x, meta(*shape), mu=mu, lv=meta(shape[0], 32),
                                                           reduction=reduction)
    n, b = math.prod(shape), shape[0]
    assert n > INT32_MAX
    if reduction == "none":
        assert (rows, row_len_r, row_len_k) == (b, n // b, 32)
    else:
        assert (rows, row_len_r, row_len_k) == (1, n, b * 32)
    assert rows * row_len_r == n
    # the last element's offset, row * row_len + in-row offset, needs more than 31 bits
    assert (rows - 1) * row_len_r + row_len_r - 1 > INT32_MAX
    want = {"batchmean": (1 / b, 1 / b), "mean": (1 / n, 1 / (b * 32))}.get(reduction, (1.0, 1.0))
    assert (scale_r, scale_k) == want


@pytest.mark.parametrize("param_shape,partner,inner,count", [
    ((3, 1, 1), (8, 3, 2**14, 2**14 + 3), 2**14 * (2**14 + 3), 3),       # per channel
    ((8, 1, 1, 1), (8, 3, 2**14, 2**14 + 3), 3 * 2**14 * (2**14 + 3), 8),  # per sample
    ((2**14 + 3,), (8, 3, 2**14, 2**14 + 3), 1, 2**14 + 3),               # per column
    ((2**14, 1), (8, 3, 2**14, 2**14 + 3), 2**14 + 3, 2**14),             # per row of a map
    ((), (2**31 + 7,), 1, 1),                                             # a scalar
], ids=["channel", "sample", "column", "map_row", "scalar"])
def test_param_geometry_over_2_31(param_shape, partner, inner, count):
    """A broadcast parameter is read at `(off // inner) % count`: check that mapping against
    the true multi-index for offsets on both sides of 2^31 and at the very end."""
    assert math.prod(partner) > INT32_MAX
    *_, reads = plan(meta(*partner), meta(*partner), meta(*param_shape))
    mode, got_inner, got_count = reads["rlv"]
    assert (mode, got_inner, got_count) == (ParamMode.PERIODIC, inner, count)
    n = math.prod(partner)
    padded = (1,) * (len(partner) - len(param_shape)) + tuple(param_shape)
    for off in (0, INT32_MAX - 1, INT32_MAX, INT32_MAX + 1, 2**32 + 12345, n - 1):
        if off >= n:
            continue
        idx, rest = [], off
        for s in reversed(partner):
            idx.append(rest % s)
            rest //= s
        idx = idx[::-1]
        p_idx = [i if s != 1 else 0 for i, s in zip(idx, padded)]
        flat = 0
        for i, s in zip(p_idx, padded):
            flat = flat * s + i
        assert (off // got_inner) % got_count == flat, off


def test_param_geometry_expands_split_broadcasts():
    partner = (8, 3, 2**14, 2**14 + 3)
    *_, reads = plan(meta(*partner), meta(*partner), meta(8, 1, 2**14, 1))
    assert reads["rlv"][0] == ParamMode.EXPAND  # materialized: read at the partner's own offsets


@pytest.mark.parametrize("device", ["cpu", "cuda-h100"])
@pytest.mark.parametrize("row_len", [INT32_MAX, 2**31, 2**31 + 1, 2**32 + 12345, 3 * 2**31 + 7])
@pytest.mark.parametrize("block", [16, 1024, 2048])
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_split_over_2_31(monkeypatch, device, row_len, block, rows):
    """(chunks, tiles per chunk) cover every element of every row exactly once, the grid
    stays under CUDA's 2^31 - 1 programs, and the offsets the kernel forms from its int64
    program id go past int32 (which is why they must be int64)."""
    pytest.importorskip("triton")
    from vae_fast import triton_kernels as tk

    if device == "cuda-h100":
        monkeypatch.setattr(tk, "_programs", lambda dev: 8 * 132)
    chunks, tiles = tk._split(row_len, block, rows, torch.device("cpu"))
    assert chunks >= 1 and tiles >= 1
    assert chunks * tiles * block >= row_len                 # every element
    assert (chunks - 1) * tiles * block < row_len            # no empty chunk
    assert rows * chunks <= INT32_MAX
    last = (rows - 1) * row_len + ((chunks - 1) * tiles + tiles - 1) * block + block - 1
    assert last > INT32_MAX


def _kernel_sources():
    from vae_fast import triton_kernels as tk, triton_mixture as tm

    out = {}
    for mod in (tk, tm):
        for name, k in vars(mod).items():
            fn = getattr(k, "fn", None)
            if fn is not None and name.endswith("_kernel"):
                out[name] = inspect.getsource(fn)
    assert set(tm.KERNELS) <= set(out)
    return out


def test_kernels_widen_program_ids_to_int64():
    """Every kernel that reads its program id widens it to int64 on the spot."""
    pytest.importorskip("triton")
    sources = _kernel_sources()
    assert sources
    for name, src in sources.items():
        uses = src.count("tl.program_id(")
        assert uses == src.count("tl.program_id(0).to(tl.int64)"), name


def test_fake_op_shapes_over_2_31():
    """The whole public path down to the op's Meta kernel on meta tensors of 2^31 + 5 elements
    (forced onto a fused backend, so the reference does not take them): losses and full-size
    gradient buffers come out with the right shapes and dtypes."""
    require_backend("cpu")
    x = meta(1, 2**31 + 5, grad=True)
    y = torch.empty((1, 2**31 + 5), device="meta", dtype=torch.bool)
    mu, lv = meta(1, 32, grad=True), meta(1, 32, grad=True)
    outs = torch.ops.vae_fast.fused_fwd(
        x.half(), y, None, None, None, mu, lv, None, None, None, int(Api.ELBO_LOSS),
        int(Likelihood.BERNOULLI), int(Reduction.BATCHMEAN), True, 0.0, 0.0, 0.0, 0.0, 1.0,
        int(Backend.CPU), 1 | 1 << 5 | 1 << 6)
    assert all(t.shape == () and t.dtype == torch.float32 for t in outs[:3])
    # a float16 input's gradient buffer is float32 until grad_output is applied (GradScaler)
    assert (tuple(outs[3].shape), outs[3].dtype) == ((1, 2**31 + 5), torch.float32)
    assert all((tuple(g.shape), g.dtype) == ((1, 32), torch.float32) for g in (outs[8], outs[9]))


# ---------------------------------------------------------------------------------------------
# (b) a real run over 2^31 elements

B, F = 3, 732_605_099          # N = 2^31 + 50,331,649; rows 1 and 2 straddle no / the boundary
HEAD = 2**31                   # flat offsets >= HEAD hold logit 3 and target True
SP0 = math.log(2.0)            # softplus(0): the loss of logit 0, target 0
SP3 = math.log1p(math.exp(-3.0))  # softplus(3) - 3: logit 3, target 1
SIG3M1 = 1.0 / (1.0 + math.exp(-3.0)) - 1.0


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _row_counts():
    """(head, tail) element counts of each row."""
    out = []
    for r in range(B):
        lo, hi = r * F, (r + 1) * F
        tail = max(0, hi - max(lo, HEAD))
        out.append((F - tail, tail))
    return out


def _check_grad_rows(g: torch.Tensor, per_row):
    """Every element of g (B, F) equals its closed form: head / tail values per row."""
    flat = g.view(-1)
    step = 1 << 26
    for r, (head_val, tail_val) in enumerate(per_row):
        lo, hi = r * F, (r + 1) * F
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            for s, e, val in ((a, min(b, HEAD), head_val), (max(a, HEAD), b, tail_val)):
                if s < e:
                    chunk = flat[s:e]
                    want = torch.tensor(val, dtype=torch.float32).to(chunk.dtype)
                    bad = chunk != want
                    if bad.any():
                        i = int(bad.nonzero()[0]) + s
                        raise AssertionError(f"grad at flat {i}: {flat[i].item()} != {want.item()}")


def _run_big(device: str, backend: str):
    x = torch.zeros(B, F, dtype=torch.float16, device=device)
    x.view(-1)[HEAD:] = 3.0
    y = torch.zeros(B, F, dtype=torch.bool, device=device)
    y.view(-1)[HEAD:] = True
    gen = torch.Generator().manual_seed(0)
    mu0, lv0 = torch.randn(B, 16, generator=gen), torch.randn(B, 16, generator=gen)
    counts = _row_counts()
    nll_rows = [h * SP0 + t * SP3 for h, t in counts]
    kl_rows = reference.gaussian_kl(mu0.double(), lv0.double(), reduction="none")
    x.requires_grad_()

    # per sample, a different grad_output per row (in-place scaling of a 4 GiB buffer)
    mu, lv = mu0.to(device).requires_grad_(), lv0.to(device).requires_grad_()
    g_rows = torch.tensor([1.0, 0.5, 2.0], device=device)
    with vae_fast.use_backend(backend):
        terms = vae_fast.elbo_loss(x, y, mu, lv, reduction="none", return_terms=True)
    want_nll = torch.tensor(nll_rows, dtype=torch.float64)
    torch.testing.assert_close(terms.nll.double().cpu(), want_nll, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.kl.double().cpu(), kl_rows, rtol=1e-5, atol=1e-5)
    terms.loss.backward(g_rows)
    del terms
    grad_head = [0.5 * float(g) for g in g_rows]
    # the stored float16 gradient is rounded once, then scaled (exactly, by 1, 0.5 or 2)
    tail16 = float(torch.tensor(SIG3M1).half())
    _check_grad_rows(x.grad, [(h, tail16 * float(g)) for h, g in zip(grad_head, g_rows)])
    x.grad = None

    # batchmean: one row of 2^31 + 50M elements
    with vae_fast.use_backend(backend):
        loss = vae_fast.elbo_loss(x, y, mu, lv)
    want = (sum(nll_rows) + float(kl_rows.sum())) / B
    assert abs(loss.item() - want) <= 1e-5 * want, (loss.item(), want)
    loss.backward()
    g = x.grad.view(-1)
    for i in (0, F - 1, F, HEAD - 1, HEAD, HEAD + 1, B * F - 1):
        want_g = (0.5 if i < HEAD else SIG3M1) / B
        assert abs(g[i].item() - want_g) <= 1e-3 * abs(want_g), (i, g[i].item(), want_g)


@pytest.mark.slow
def test_bernoulli_elbo_over_2_31_elements_cpu():
    """The fused Bernoulli ELBO over 2^31 + 50M float16 logits with bool targets through the
    public API on the C++ backend: per-row losses, the batchmean loss and every gradient
    element against closed-form values. Peak RSS measured 18.4 GiB: 4.2 GiB of logits, 2.1 of
    targets, the 8.4 GiB float32 gradient buffer (float16 gradients stay float32 until
    grad_output is applied) and the 4.2 GiB float16 gradient it becomes."""
    require_backend("cpu")
    if _mem_available() < 19.5 * GIB:
        pytest.skip(f"needs ~18.4 GiB of free RAM, {_mem_available() / GIB:.1f} GiB available")
    _run_big("cpu", "cpu")


@pytest.mark.slow
@pytest.mark.gpu_required
def test_bernoulli_elbo_over_2_31_elements_cuda():
    """The same through the compiled Triton kernels on a GPU (at least the ~18.4 GiB of the CPU
    run in device memory; never run: no GPU has been lent yet)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _run_big("cuda", "triton")
