"""The fused op: one `torch.library` custom op for every loss, its fake and its autograd.

`vae_fast::fused_loss` computes a reconstruction term over (x, y) and a KL term over mu in one
pass, writes the gradients of the inputs that need them in that same pass, and returns
(loss, nll, kl, *grads). Its backward only scales those gradients. The op body lowers the
tensors to contiguous buffers plus a little geometry and calls a backend's raw `fused_forward`
/ `scale_` (Triton: `vae_fast.triton_kernels`; C++: `vae_fast._cpu`), which share one interface.

Being a custom op with `register_fake` and `register_autograd` is what lets
`torch.compile(fullgraph=True)` trace a training step through it.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from . import _common as C

KINDS = {"none": 0, "bernoulli": 1, "bernoulli_probs": 2, "gaussian": 3}
TOTAL, ROWS, ELEMENTWISE = 0, 1, 2
CONST, FULL, PERIODIC = 0, 1, 2
GRAD_NAMES = ("x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv")
_PARAM_SLOTS = (2, 3, 4, 6, 7, 8)  # positions of the parameters among the nine inputs


def _red_mode(reduction: str) -> int:
    return {"none": ROWS, "elementwise": ELEMENTWISE}.get(reduction, TOTAL)


def param_geometry(p: Optional[Tensor], shape) -> tuple[int, int, int]:
    """How a parameter is read by its stream: (mode, inner, count).

    FULL: same shape as its partner. PERIODIC: element at flat offset `off` reads
    `p[(off // inner) % count]`, which covers every broadcast whose non-1 dimensions are one
    contiguous run of the partner's (a scalar, a per-feature `(Z,)`, a per-channel `(C,1,1)`,
    a per-sample `(B,1,1,1)`). Other broadcasts are expanded first (see `_lower_param`).
    """
    if p is None:
        return CONST, 1, 1
    if tuple(p.shape) == tuple(shape) or math.prod(shape) == 0:  # (an empty partner: expand)
        return FULL, 1, 1
    ps = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
    idx = [i for i, n in enumerate(ps) if n != 1]
    if not idx:
        return PERIODIC, 1, 1
    i0, i1 = idx[0], idx[-1]
    if all(ps[i] == shape[i] for i in range(i0, i1 + 1)):
        return PERIODIC, math.prod(shape[i1 + 1:]), math.prod(shape[i0:i1 + 1])
    return FULL, 1, 1  # after expansion


def _lower_param(p: Optional[Tensor], shape):
    mode, inner, count = param_geometry(p, shape)
    if p is not None and mode == FULL and tuple(p.shape) != tuple(shape):
        p = p.expand(shape)
    return (None if p is None else p.contiguous()), mode, inner, count


def _stored_grad_shape(p: Tensor, shape, red_mode: int, rows: int):
    """A gradient buffer of a parameter: full parameters keep their shape (scaled in place by
    the backward); broadcast ones are summed right away to what the backward still needs:
    the parameter's shape (one scalar coefficient), one slice per row ("none"), or the full
    shape (elementwise coefficients)."""
    if tuple(p.shape) == tuple(shape):
        return tuple(shape)
    if red_mode == TOTAL:
        return tuple(p.shape)
    if red_mode == ROWS:
        ps = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
        return (rows,) + ps[1:]
    return tuple(shape)


def _sum_to(t: Tensor, shape) -> Tensor:
    shape = tuple(shape)
    return t.sum() if not shape else t.sum_to_size(shape)


def _geometry(x, mu, reduction):
    n = x.numel() if x is not None else 0
    m = mu.numel() if mu is not None else 0
    batch = (x if x is not None else mu).shape[0] if (x if x is not None else mu).dim() else 1
    red = _red_mode(reduction)
    if red == ROWS:
        rows = batch
        row_len_r = n // rows if rows else 0
        row_len_k = m // rows if rows else 0
    else:
        rows, row_len_r, row_len_k = 1, n, m
    inv = lambda k: 1.0 / k if k else math.inf  # noqa: E731  (0 * inf = nan, as torch's means)
    if reduction == "batchmean":
        scale_r = scale_k = inv(batch)
    elif reduction == "mean":
        scale_r, scale_k = inv(n), inv(m)
    else:
        scale_r = scale_k = 1.0
    # an absent term sums to 0 and must stay 0 (not 0 * inf) in loss = nll + beta * kl
    scale_r = scale_r if x is not None else 1.0
    scale_k = scale_k if mu is not None else 1.0
    return red, rows, row_len_r, row_len_k, scale_r, scale_k


def memory_order(main: Optional[Tensor], *others) -> bool:
    """Can a stream be walked in memory order instead of being copied to contiguous? Yes when
    its main tensor is dense and batch-major but permuted (channels_last), every other
    full-shape tensor of the stream has the same strides, and no parameter needs the logical
    index (a periodic broadcast other than a scalar). Its gradients then keep that layout."""
    if main is None or main.dim() < 2 or main.is_contiguous() or not _dense(main):
        return False
    if main.shape[0] > 1 and main.stride(0) != main.numel() // main.shape[0]:
        return False  # the batch must be outermost: rows are memory blocks
    for t in others:
        if t is None:
            continue
        if tuple(t.shape) == tuple(main.shape):
            if t.stride() != main.stride():
                return False
        elif param_geometry(t, main.shape)[2] != 1:
            return False
    return True


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one block of memory in some dim order."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """A dense tensor's elements in memory order, as a 1-D view (no copy)."""
    return t if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _like(t: Tensor, dtype, keep_layout: bool) -> Tensor:
    return torch.empty_like(t, dtype=dtype) if keep_layout else torch.empty(t.shape, dtype=dtype, device=t.device)


def _allocate(x, y, rlv, w, pw, mu, lv, pmu, plv, reduction, needs):
    acc = C.acc_dtype(x, y, rlv, w, pw, mu, lv, pmu, plv)
    dev = (x if x is not None else mu).device
    red, rows, *_ = _geometry(x, mu, reduction)
    mem = (memory_order(x, y, rlv, w, pw), memory_order(mu, lv, pmu, plv))
    if red == ELEMENTWISE:
        outs = [_like(x, acc, mem[0])]
        outs += [torch.empty(0, dtype=acc, device=dev) for _ in range(2)]  # never aliased
    else:
        shape = (rows,) if red == ROWS else ()
        outs = [torch.empty(shape, dtype=acc, device=dev) for _ in range(3)]
    inputs = (x, y, rlv, w, pw, mu, lv, pmu, plv)
    for i, t in enumerate(inputs):
        if not needs[i] or t is None:
            outs.append(torch.empty(0, dtype=acc, device=dev))
            continue
        partner = x if i < 5 else mu
        if i in _PARAM_SLOTS:
            shape = _stored_grad_shape(t, partner.shape, red, rows)
            dt = t.dtype if shape == tuple(partner.shape) == tuple(t.shape) else acc
        else:
            shape, dt = tuple(t.shape), t.dtype
        if dt == torch.float16:
            # float16 gradients stay float32 until grad_output is applied: GradScaler's 2^16
            # would otherwise multiply values that already underflowed (or overflow them)
            dt = torch.float32
        if shape == tuple(t.shape) == tuple(partner.shape):
            outs.append(_like(t, dt, mem[i >= 5]))
        else:
            outs.append(torch.empty(shape, dtype=dt, device=dev))
    return outs


def _backend_module(backend: str):
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels
    if backend == "cpu":
        from . import _cpu

        return _cpu
    raise NotImplementedError(f"vae_fast: no fused backend named {backend!r}")


def _fused_loss(
    x: Optional[Tensor], y: Optional[Tensor], rlv: Optional[Tensor], w: Optional[Tensor],
    pw: Optional[Tensor], mu: Optional[Tensor], lv: Optional[Tensor], pmu: Optional[Tensor],
    plv: Optional[Tensor], beta_t: Optional[Tensor], kind: str, reduction: str, full: bool, rlv_const: float,
    pmu_const: float, plv_const: float, beta: float, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, nll, kl, grad_x, grad_y, grad_rlv, grad_w, grad_pw, grad_mu, grad_lv, grad_pmu,
    grad_plv); gradients not asked for in `needs` are empty. `beta_t`, a 0-d tensor, replaces
    the float `beta` when given."""
    outs = _allocate(x, y, rlv, w, pw, mu, lv, pmu, plv, reduction, needs)
    red, rows, row_len_r, row_len_k, scale_r, scale_k = _geometry(x, mu, reduction)
    inputs = (x, y, rlv, w, pw, mu, lv, pmu, plv)
    mem = (memory_order(x, y, rlv, w, pw), memory_order(mu, lv, pmu, plv))
    lowered, modes, inners, counts = [], [], [], []
    for i, t in enumerate(inputs):
        partner = x if i < 5 else mu
        if i in _PARAM_SLOTS:
            if mem[i >= 5] and t is not None and tuple(t.shape) == tuple(partner.shape):
                t, mode, inner, count = _flat(t), FULL, 1, 1
            else:
                t, mode, inner, count = _lower_param(t, partner.shape) if partner is not None else (None, CONST, 1, 1)
            modes.append(mode), inners.append(inner), counts.append(count)
        elif t is not None:
            t = _flat(t) if mem[i >= 5] else t.contiguous()
        lowered.append(t)
    # gradient buffers as the kernels see them: full-size, flat; broadcast parameters get a
    # full-size temporary (in the stream's layout) that is summed down below
    kernel_grads = []
    for i, g in enumerate(outs[3:]):
        partner = x if i < 5 else mu
        if not needs[i] or inputs[i] is None:
            kernel_grads.append(None)
        elif tuple(g.shape) == tuple(partner.shape):
            kernel_grads.append(g)
        else:
            kernel_grads.append(_like(partner, g.dtype, mem[i >= 5]))
    flat_grads = [None if g is None else _flat(g) for g in kernel_grads]
    _backend_module(backend).fused_forward(
        *lowered, rows=rows, row_len_r=row_len_r, row_len_k=row_len_k, modes=modes,
        inners=inners, counts=counts, consts=[rlv_const, pmu_const, plv_const],
        kind=KINDS[kind], full=full, red_mode=red, scale_r=scale_r, scale_k=scale_k,
        out_loss=_flat(outs[0]), out_nll=outs[1], out_kl=outs[2], grads=flat_grads,
        **_beta_args(backend, beta, beta_t),
    )
    for i, (g, kg) in enumerate(zip(outs[3:], kernel_grads)):
        if kg is not None and kg is not g:
            g.copy_(_sum_to(kg, g.shape))
    return tuple(outs)


def _beta_args(backend: str, beta: float, beta_t: Optional[Tensor]) -> dict:
    """Triton reads a tensor beta on the device (no sync); the C++ backend takes a double, and
    reading a CPU scalar costs nothing."""
    if beta_t is None:
        return {"beta": beta}
    if backend == "triton":
        return {"beta": 1.0, "beta_t": beta_t}
    return {"beta": float(beta_t)}


fused_loss = torch.library.custom_op("vae_fast::fused_loss", _fused_loss, mutates_args=())


@fused_loss.register_fake
def _(x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t, kind, reduction, full, rlv_const, pmu_const,
      plv_const, beta, needs, backend):
    return tuple(_allocate(x, y, rlv, w, pw, mu, lv, pmu, plv, reduction, needs))


def _setup_context(ctx, inputs, output):
    x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t = inputs[:10]
    reduction, beta, needs = inputs[11], inputs[16], inputs[17]
    red, rows, row_len_r, row_len_k, _, _ = _geometry(x, mu, reduction)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[3:])
    ctx.save_for_backward(*output[3:], beta_t, output[2] if beta_t is not None and beta_t.requires_grad else None)
    ctx.geometry = (red, rows, row_len_r, row_len_k)
    ctx.beta = beta
    ctx.backend = inputs[18]
    ctx.needs = list(needs)
    ctx.shapes = [None if not isinstance(t, Tensor) else (tuple(t.shape), t.dtype) for t in inputs[:9]]
    ctx.donated = False  # see donate_grad_buffers


def donate_grad_buffers(outputs) -> None:
    """Let the backward scale this call's gradient buffers in place (no copy, and no memory
    traffic at all when the coefficient is 1). Only for callers that drop outputs[3:] at once,
    as the public functions do: a caller of the raw op that keeps them (opcheck does) gets
    out-of-place scaling, so the outputs it holds never change under it."""
    node = outputs[0].grad_fn
    if node is not None and hasattr(node, "donated"):
        node.donated = True


def _tracing(*tensors) -> bool:
    """True while torch.compile / export traces the backward: then a plain multiply that
    Inductor fuses replaces the in-place kernel."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _graph_kept() -> bool:
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else keep()


def _backward(ctx, g_loss, g_nll, g_kl, *unused):
    red, rows, row_len_r, row_len_k = ctx.geometry
    *bufs, beta_t, kl = ctx.saved_tensors
    beta = ctx.beta if beta_t is None else beta_t
    if red == ELEMENTWISE:  # nll and kl are empty placeholders there: only the loss carries grads
        g_nll = g_kl = None
    tracing = _tracing(g_loss, g_nll, g_kl, *bufs)
    if torch.is_grad_enabled() and not tracing:
        raise RuntimeError(
            "vae_fast: the fused losses' backward is hand-written and cannot be differentiated "
            "again (create_graph=True, e.g. a gradient penalty); use vae_fast.reference for that")
    # a stream whose outputs got no gradient contributes none (not 0 * a stored inf = nan)
    live = (g_loss is not None or g_nll is not None, g_loss is not None or g_kl is not None)
    grads = [None] * 9
    inplace_r, inplace_k = [], []
    # In place only when nobody else holds the buffers and the graph is freed after this
    # backward (so no second backward can read them); otherwise out of place, and a second
    # backward (retain_graph=True, gradcheck) sees intact buffers.
    inplace = ctx.donated and not _graph_kept() and not tracing
    coef_r = coef_k = None
    layout = None  # the recon buffers' layout, which elementwise coefficients must follow
    for i, buf in enumerate(bufs):
        if not ctx.needs[i] or ctx.shapes[i] is None or not ctx.needs_input_grad[i] or not live[i >= 5]:
            continue
        shape, dtype = ctx.shapes[i]
        partner = ctx.shapes[0 if i < 5 else 5][0]
        if tuple(buf.shape) == tuple(partner) == shape and buf.dtype == dtype and inplace:
            (inplace_r if i < 5 else inplace_k).append(_flat(buf))
            layout = buf if i < 5 else layout
            grads[i] = buf
            continue
        # plain torch: the compiled path, and broadcast parameters' small summed buffers
        if coef_r is None:
            coef_r = _combine(g_loss, g_nll, 1.0, buf)
            coef_k = _combine(g_loss, g_kl, beta, buf)
        coef = coef_r if i < 5 else coef_k
        if red == ROWS and coef.dim() == 1:
            coef = coef.reshape((-1,) + (1,) * (buf.dim() - 1))
        elif red == ELEMENTWISE and coef.dim():
            coef = coef.reshape(buf.shape) if buf.dim() else coef.reshape(())
        grads[i] = _sum_to(buf * coef, shape).to(dtype)
    if inplace_r or inplace_k:
        if red == ELEMENTWISE and layout is not None and g_loss.stride() != layout.stride():
            g_loss = torch.empty_like(layout, dtype=g_loss.dtype).copy_(g_loss)
        _backend_module(ctx.backend).scale_(
            inplace_r, inplace_k,
            *(None if g is None else _flat(g.contiguous() if not _dense(g) else g) for g in (g_loss, g_nll, g_kl)),
            red_mode=red, rows=rows, row_len_r=row_len_r, row_len_k=row_len_k,
            **_beta_args(ctx.backend, ctx.beta, beta_t),
        )
    g_beta = None
    if kl is not None and g_loss is not None and ctx.needs_input_grad[9]:
        g_beta = (g_loss * kl).sum().to(beta_t.dtype)  # d(nll + beta*kl)/d(beta) = kl
    return (*grads, g_beta) + (None,) * 9


def _combine(g_loss, g_term, weight: float, like: Tensor):
    if g_loss is None:
        return g_term if g_term is not None else like.new_zeros(())
    c = g_loss * weight if isinstance(weight, Tensor) or weight != 1.0 else g_loss
    return c if g_term is None else c + g_term


fused_loss.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedLoss(torch.autograd.Function):
    """The op's own implementation, setup and backward, applied without the dispatcher's
    Python wrapping of custom ops (about 0.2-0.3 ms a call, as much as the whole kernel at
    MNIST size). Eager calls on real tensors take this path; torch.compile, fake/meta tensors
    and direct callers of `fused_loss` take the op."""

    @staticmethod
    def forward(ctx, *args):
        output = _fused_loss(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def call_fused_loss(*args, **kwargs):
    """`fused_loss`, through the cheaper eager path where it is the same thing."""
    if torch.compiler.is_compiling():
        return fused_loss(*args, **kwargs)
    from torch._subclasses.fake_tensor import FakeTensor

    main = args[0] if args[0] is not None else args[5]
    if main.device.type not in ("cpu", "cuda") or isinstance(main, FakeTensor):
        return fused_loss(*args, **kwargs)
    return _EagerFusedLoss.apply(*args, *(kwargs[n] for n in _OP_ARGS[len(args):]))


_OP_ARGS = tuple(inspect.signature(_fused_loss).parameters)
