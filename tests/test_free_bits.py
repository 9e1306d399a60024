"""`vae_fast::free_bits_kl` (csrc/free_bits.cpp), the KL term of free bits in one op call:
`sum_j max(lam, mean_b KL_bj)`, against vae_fast.reference.free_bits_kl and against the
formula written out here.

- values, output dtype and gradients of every tensor input for float32/float64/bfloat16/
  float16, priors None / (Z,) / (B, Z) / (1, Z) / per channel / numbers, logvar a number or a
  tensor, lam a number or a 0-d tensor (which takes the reference's gradient), mu of rank 2
  and 4; dimensions under the floor get no gradient;
- exact ties with the floor (clamp_min's rule for a number lam, torch.maximum's for a tensor);
- float64 gradcheck, opcheck, torch.compile(fullgraph=True) with an annealed tensor lam (one
  graph), inference mode, torch.func.grad and vmap(grad), second derivatives raising;
- the CUDA kernel (ATen ops) run on CPU tensors through the dispatcher, against the CPU loop;
- many columns (the parallel loop): deterministic, the same with 1 and 2 threads;
- elbo_loss(free_bits=...) through both fused backends calls the op.
"""
import pytest
import torch

import vae_fast
from vae_fast import _backend
from vae_fast import reference as R

from conftest import require_backend  # noqa: E402


@pytest.fixture(autouse=True)
def _extension():
    """The op is the compiled extension's: absent in CI is a failure, elsewhere a skip."""
    require_backend("cpu")


LAM = 0.5
# value / gradient tolerances against the reference (the same dtype rule) and against the
# formula below in float64
TOL_REF = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6),
           torch.bfloat16: dict(rtol=2e-5, atol=1e-6), torch.float16: dict(rtol=2e-5, atol=1e-6)}
# 16-bit gradients are rounded to their dtype: a float32 difference of an ulp can move them one
# 16-bit ulp
TOL_GRAD16 = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-6)}
TOL_FORMULA = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
               torch.bfloat16: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-4, atol=1e-5)}


def op(mu, lv, pmu, plv, lam):
    """The op with the public functions' argument split (tensor or number per parameter)."""
    t = lambda p: p if isinstance(p, torch.Tensor) else None  # noqa: E731
    c = lambda p, d: d if p is None else (0.0 if isinstance(p, torch.Tensor) else float(p))  # noqa: E731
    return torch.ops.vae_fast.free_bits_kl(mu, t(lv), t(pmu), t(plv), c(lv, 0.0), c(pmu, 0.0),
                                           c(plv, 0.0), t(lam), c(lam, 0.0))


def formula(mu, lv, pmu, plv, lam):
    """sum_j max(lam, mean_b KL_bj), written out in float64 (exp(d) - 1, not expm1)."""
    f = lambda p: torch.as_tensor(0.0 if p is None else p, dtype=torch.float64).double()  # noqa: E731
    mu, lv, pmu, plv = mu.double(), f(lv), f(pmu), f(plv)
    d = lv - plv
    kl = 0.5 * (torch.exp(d) - 1 - d + (mu - pmu) ** 2 * torch.exp(-plv))
    per_dim = kl.sum(0) / mu.shape[0]
    return torch.where(per_dim > lam, per_dim, torch.as_tensor(lam).double()).sum()


def _case(rank, prior, logvar, dtype, seed=0):
    """mu, logvar, prior_mu, prior_logvar; the even positions of mu[0] well under LAM, the odd
    ones well over it (under: mu near the prior mean, logvar near its log-variance)."""
    g = torch.Generator().manual_seed(seed)
    shape = (5, 6) if rank == 2 else (5, 2, 3, 2)
    feat = shape[1:]
    pshape = {"none": None, "number": None, "feature": feat, "full": shape,
              "one_feature": (1,) + feat, "channel": (2, 1, 1)}[prior]
    if pshape is None:
        pmu = None if prior == "none" else 0.1
        plv = None if prior == "none" else 0.05
    else:
        pmu = 0.1 * torch.randn(pshape, generator=g, dtype=torch.float64)
        plv = 0.1 * torch.randn(pshape, generator=g, dtype=torch.float64)
    pmu_full = torch.as_tensor(0.0 if pmu is None else pmu).double().expand(shape)
    plv_full = torch.as_tensor(0.0 if plv is None else plv).double().expand(shape)
    under = (torch.arange(torch.Size(feat).numel()) % 2 == 0).view(feat).expand(shape)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    big = noise.sign() * (1.5 + noise.abs())
    mu = pmu_full + torch.where(under, 0.05 * noise, big)
    if logvar == "number":
        lv = 0.0 if plv is None or not isinstance(plv, torch.Tensor) else 0.02
    else:
        lv = plv_full + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype).requires_grad_() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return cast(mu), cast(lv), cast(pmu), cast(plv), under[0]


def _grads(out, tensors):
    return torch.autograd.grad(out, tensors)


PRIORS = [(rank, prior) for rank in (2, 4)
          for prior in ("none", "number", "feature", "full", "one_feature", "channel")
          if prior != "channel" or rank == 4]  # a per-channel (C, 1, 1) prior needs rank 4


@pytest.mark.parametrize("rank,prior", PRIORS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("logvar", ("tensor", "number"))
@pytest.mark.parametrize("lam_kind", ("number", "tensor"))
def test_matches_reference_and_formula(rank, prior, dtype, logvar, lam_kind):
    mu, lv, pmu, plv, under = _case(rank, prior, logvar, dtype)
    lam = LAM if lam_kind == "number" else torch.tensor(LAM, dtype=dtype, requires_grad=True)
    inputs = [t for t in (mu, lv, pmu, plv, lam) if isinstance(t, torch.Tensor)]
    got = op(mu, lv, pmu, plv, lam)
    want = R.free_bits_kl(mu, lv, pmu, plv, lam)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL_REF[dtype])
    g_got, g_want = _grads(got * 1.7, inputs), _grads(want * 1.7, inputs)
    for t, a, b in zip(inputs, g_got, g_want):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a, b, **TOL_GRAD16.get(dtype, TOL_REF[dtype]))
    # the formula, in float64 on the same (rounded) values
    ref = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t
           for t in (mu, lv, pmu, plv, lam)]
    f = formula(*ref)
    torch.testing.assert_close(got.double(), f, **TOL_FORMULA[dtype])
    g_f = _grads(f * 1.7, [t for t in ref if isinstance(t, torch.Tensor)])
    for a, b in zip(g_got, g_f):
        torch.testing.assert_close(a.double(), b, **TOL_GRAD16.get(dtype, TOL_FORMULA[dtype]))
    g_mu = g_got[0]
    assert (g_mu[:, under] == 0).all() and (g_mu[:, ~under] != 0).all()  # under the floor: none
    if lam_kind == "tensor":  # lam takes the gradient of every dimension under it
        count = torch.tensor(1.7 * under.sum().item(), dtype=torch.float64)
        torch.testing.assert_close(g_got[-1].double(), count, **TOL_GRAD16.get(dtype, TOL_FORMULA[dtype]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_exact_ties(dtype):
    """Columns exactly at the floor (mu = +-1, logvar 0: KL 0.5 exactly), under and over it: a
    number floor passes the gradient at a tie (clamp_min), a tensor floor halves it between the
    dimension and lam (torch.maximum), as the reference's autograd does."""
    b = 4
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype)[:, None]
    mu = torch.cat([sign, 0.1 * sign, 2.0 * sign, sign], 1).requires_grad_()  # tie, under, over, tie
    lv = torch.zeros(b, 4, dtype=dtype, requires_grad=True)
    for lam, w, w_lam in ((0.5, torch.tensor([1.0, 0.0, 1.0, 1.0]), None),
                          (torch.tensor(0.5, dtype=dtype, requires_grad=True),
                           torch.tensor([0.5, 0.0, 1.0, 0.5]), 2.0)):
        ins = [mu, lv] + ([lam] if w_lam is not None else [])
        got = op(mu, lv, None, None, lam)
        want = R.free_bits_kl(mu, lv, None, None, lam)
        assert got.item() == want.item() == 0.5 + 0.5 + 2.0 + 0.5
        g_got, g_want = _grads(got, ins), _grads(want, ins)
        for a, c in zip(g_got, g_want):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(g_got[0], (mu * w.to(dtype) / b).detach(), rtol=0, atol=0)
        if w_lam is not None:
            assert g_got[2].item() == w_lam


def test_gradcheck():
    mu, lv, pmu, plv, _ = _case(2, "feature", "tensor", torch.float64, seed=1)
    plv = plv.detach()[None].clone().requires_grad_()  # (1, Z)
    lam = torch.tensor(LAM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op(*a), (mu, lv, pmu, plv, lam))
    mu4, lv4, pmu4, plv4, _ = _case(4, "channel", "number", torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda m, p, q: op(m, lv4, p, q, LAM), (mu4, pmu4, plv4))


def test_opcheck():
    mu, lv, pmu, plv, _ = _case(2, "feature", "tensor", torch.float64)
    lam = torch.tensor(LAM, dtype=torch.float64, requires_grad=True)
    kl = torch.ops.vae_fast.free_bits_kl.default
    torch.library.opcheck(kl, (mu, lv, pmu, plv, 0.0, 0.0, 0.0, lam, 0.0))
    torch.library.opcheck(kl, (mu.float(), None, None, None, 0.3, 0.1, 0.05, None, LAM))
    mu4, lv4, pmu4, plv4, _ = _case(4, "channel", "tensor", torch.bfloat16)
    torch.library.opcheck(kl, (mu4, lv4, pmu4, plv4, 0.0, 0.0, 0.0, None, LAM))
    fwd = torch.ops.vae_fast.free_bits_fwd.default  # the pass itself, every gradient asked for
    d = lambda t: t.detach()  # noqa: E731
    torch.library.opcheck(fwd, (d(mu), d(lv), d(pmu), d(plv), 0.0, 0.0, 0.0, d(lam), 0.0, 31))


def test_compile_annealed_lam_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    mu, lv, pmu, plv, under = _case(2, "feature", "tensor", torch.float32)
    counter = CompileCounterWithBackend("aot_eager")  # traces the forward and the backward

    def f(mu, lv, lam):
        return op(mu, lv, pmu.detach(), plv.detach(), lam)

    fc = torch.compile(f, fullgraph=True, backend=counter)
    for step in range(3):
        lam = torch.tensor(0.4 + 0.1 * step)
        got = fc(mu, lv, lam)
        want = R.free_bits_kl(mu, lv, pmu.detach(), plv.detach(), lam)
        torch.testing.assert_close(got, want)
        for a, b in zip(_grads(got, (mu, lv)), _grads(want, (mu, lv))):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_inference_mode_and_no_grad():
    mu, lv, pmu, plv, _ = _case(2, "full", "tensor", torch.float32)
    want = R.free_bits_kl(mu, lv, pmu, plv, LAM).detach()
    with torch.inference_mode():
        got = op(mu, lv, pmu, plv, LAM)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        got = op(mu, lv, pmu, plv, LAM)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)


def test_torch_func_grad_and_vmap_grad():
    mu, lv, pmu, plv, _ = _case(2, "feature", "tensor", torch.float64)
    mu, lv, pmu, plv = (t.detach() for t in (mu, lv, pmu, plv))
    lam = torch.tensor(LAM, dtype=torch.float64)

    def term(m, fn):
        return lambda a, b, c, d, e: fn(a, b, c, d, e) if m == "batch" else fn(a[None], b[None], c, d, e)

    got = torch.func.grad(term("batch", op), argnums=(0, 1, 2, 3, 4))(mu, lv, pmu, plv, lam)
    want = torch.func.grad(term("batch", R.free_bits_kl), argnums=(0, 1, 2, 3, 4))(mu, lv, pmu, plv, lam)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # per-example gradients: each example a batch of one, floored on its own
    in_dims = (0, 0, None, None, None)
    got = torch.func.vmap(torch.func.grad(term("one", op), argnums=(0, 1, 2)), in_dims)(mu, lv, pmu, plv, lam)
    want = torch.func.vmap(torch.func.grad(term("one", R.free_bits_kl), argnums=(0, 1, 2)),
                           in_dims)(mu, lv, pmu, plv, lam)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (got[0] == 0).any() and (got[0] != 0).any()  # some per-example dims floored, some not
    values = torch.func.vmap(term("one", op), in_dims)(mu, lv, pmu, plv, lam)
    torch.testing.assert_close(values, torch.func.vmap(term("one", R.free_bits_kl), in_dims)(mu, lv, pmu, plv, lam))


def test_second_derivatives_raise():
    mu, lv, _, _, _ = _case(2, "none", "tensor", torch.float64)
    mu, lv = mu.detach(), lv.detach()
    f = lambda m: op(m, lv, None, None, LAM)  # noqa: E731
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.func.jacrev(torch.func.grad(f))(mu)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(f, (mu,), (torch.ones_like(mu),))
    a = mu.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(a), a, create_graph=True)  # first order with a graph: fine
    torch.testing.assert_close(g, torch.func.grad(lambda m: R.free_bits_kl(m, lv, None, None, LAM))(mu))
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        g.sum().backward()


@pytest.mark.parametrize("prior", ("none", "feature", "full", "one_feature"))
@pytest.mark.parametrize("lam_kind", ("number", "tensor"))
def test_cuda_kernel_on_cpu_tensors(prior, lam_kind):
    """The kernel registered for CUDA (ATen ops, no host sync) is device-generic: run it on CPU
    tensors by dispatching to the CUDA key, against the CPU loop, output by output."""
    fwd = torch.ops.vae_fast.free_bits_fwd.default
    for dtype in (torch.float64, torch.float32):
        mu, lv, pmu, plv, _ = _case(2, prior, "tensor", dtype)
        t = lambda p: p.detach() if isinstance(p, torch.Tensor) else None  # noqa: E731
        c = lambda p: float(p) if p is not None and not isinstance(p, torch.Tensor) else 0.0  # noqa: E731
        lam = torch.tensor(LAM, dtype=dtype) if lam_kind == "tensor" else None
        needs = 0b1111 & sum(1 << i for i, p in enumerate((mu, lv, pmu, plv)) if t(p) is not None)
        needs |= 16 if lam is not None else 0
        args = (t(mu), t(lv), t(pmu), t(plv), 0.0, c(pmu), c(plv), lam, LAM, needs)
        cpu = fwd(*args)
        cuda = fwd.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
        for i, (a, b) in enumerate(zip(cpu, cuda)):
            assert a.shape == b.shape and a.dtype == b.dtype, i
            torch.testing.assert_close(a, b, **TOL_REF[dtype])
        assert (cpu[1] != 0).any()


def test_many_columns_deterministic():
    """Enough columns for the parallel loop: the reference's value, and bit for bit the same
    result and gradients with 1 and 2 threads."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(64, 4096, generator=g, requires_grad=True)
    lv = (0.3 * torch.randn(64, 4096, generator=g)).requires_grad_()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            v = op(mu, lv, None, None, 0.6)
            outs.append((v, *_grads(v, (mu, lv))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    want = R.free_bits_kl(mu, lv, None, None, 0.6)
    torch.testing.assert_close(outs[0][0], want, rtol=1e-5, atol=1e-4)
    for a, b in zip(outs[0][1:], _grads(want, (mu, lv))):
        torch.testing.assert_close(a, b)


def test_empty_batch_is_nan_as_the_reference():
    mu = torch.zeros(0, 3, requires_grad=True)
    got, want = op(mu, 0.0, None, None, LAM), R.free_bits_kl(mu, 0.0, None, None, LAM)
    assert got.isnan() and want.isnan()
    assert _grads(got, (mu,))[0].shape == (0, 3)


def test_bad_arguments_raise():
    mu = torch.randn(4, 5)
    with pytest.raises(TypeError, match=r"free_bits must be a number or a 0-d floating tensor, got a "
                                        r"tensor of dtype torch.float32 and shape \(3,\)"):
        op(mu, 0.0, None, None, torch.ones(3))
    with pytest.raises(ValueError, match="free_bits must be a non-negative number, got -0.1"):
        op(mu, 0.0, None, None, -0.1)
    with pytest.raises(ValueError, match=r"logvar of shape \(3,\) does not broadcast to the shape "
                                         r"of mu \(4, 5\)"):
        op(mu, torch.zeros(3), None, None, LAM)
    with pytest.raises(TypeError, match="mu must be a floating point tensor"):
        op(torch.ones(4, 5, dtype=torch.long), 0.0, None, None, LAM)


def _find(fn, name, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return False
    seen.add(fn)
    return fn.name() == name or any(_find(f, name, seen) for f, _ in fn.next_functions)


@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
@pytest.mark.parametrize("lam_kind", ("number", "tensor"))
def test_elbo_loss_through_the_fused_backends(backend, reduction, lam_kind):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 4, 4, generator=g, requires_grad=True)
    y = torch.rand(5, 1, 4, 4, generator=g)
    mu, lv, pmu, plv, _ = _case(2, "feature", "tensor", torch.float32)
    lam = LAM if lam_kind == "number" else torch.tensor(LAM)
    kw = dict(prior_mu=pmu, prior_logvar=plv, beta=0.7, free_bits=lam, reduction=reduction)
    got = vae_fast.elbo_loss(x, y, mu, lv, **kw)
    assert _find(got.grad_fn, "vae_fast::FreeBitsBackward")  # the term is the one op
    with _backend.use_backend("reference"):
        want = vae_fast.elbo_loss(x, y, mu, lv, **kw)
    torch.testing.assert_close(got, want)
    ins = (x, mu, lv, pmu, plv)
    for a, b in zip(_grads(got, ins), _grads(want, ins)):
        torch.testing.assert_close(a, b)
