"""The op of vae_fast.iwae_loss, `vae_fast::iwae` (csrc/iwae.cpp): what its values and gradients
must match is in tests/test_objectives.py (an eager formula, every likelihood, reduction and
dtype, gradcheck); here is the op's own contract:

- its two CPU drivers (by example, with each example's gradient weighted in cache, when there
  are at least as many examples as threads; over all rows then one scaling pass otherwise)
  give the same bits;
- the stored gradient is handed out as it is for a unit grad_output, and a retained graph's
  buffer survives an in-place edit of a gradient handed out;
- half-precision inputs, channels_last, a full-size log-variance;
- opcheck, torch.compile(fullgraph=True) with a backward, torch.func.grad and vmap(grad),
  inference mode; a second derivative and forward mode raise;
- the latent terms' op, `vae_fast::iwae_latent` (csrc/iwae_latent.cpp): values and gradients
  against the torch formula (vae_fast._common.iwae_latent) for every form of logvar, float64
  gradcheck, opcheck of it and of its backward op, the same bits with any thread count."""
import math

import pytest
import torch

import vae_fast
from vae_fast import reference as R
from vae_fast._enums import Backend, Likelihood, Reduction

from conftest import require_backend


def _inputs(dtype=torch.float64, *, k=4, shape=(5, 3, 4, 3), z_dim=6, seed=0, likelihood="bernoulli"):
    g = torch.Generator().manual_seed(seed)

    def n(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    b = shape[0]
    mu, lv = n(b, z_dim), n(b, z_dim, scale=0.5)
    z = (mu.double() + torch.exp(0.5 * lv.double()) * n(k, b, z_dim).double()).to(dtype)
    recon = n(k, *shape, scale=2.0)
    target = torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    if likelihood == "gaussian":
        target = n(*shape)
    return recon, target, z, mu, lv


def _loss_and_grads(args, reduction="batchmean", weight=None, **kw):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    recon, target, z, mu, lv = leaves
    target.requires_grad_(False)
    out = vae_fast.iwae_loss(recon, target, z, mu, lv, reduction=reduction, **kw)
    scal = out.sum() if weight is None else (out * weight).sum()
    grads = torch.autograd.grad(scal, [recon, z, mu, lv])
    return out.detach(), grads


@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_both_cpu_drivers_give_the_same_bits(reduction, dtype):
    """B = 5 examples: with 1 or 2 threads the by-example driver runs, with 8 threads the
    all-rows one (fewer examples than threads); the bits must not change. Rows of 9216
    pixels: longer than one chunk (8192), so the order in which a row's chunks are added
    shows."""
    require_backend("cpu")
    args = _inputs(dtype, shape=(5, 3, 64, 48))
    weight = torch.rand(5, dtype=dtype) + 0.5 if reduction == "none" else None
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            with vae_fast.use_backend("cpu"):
                results.append(_loss_and_grads(args, reduction, weight))
    finally:
        torch.set_num_threads(before)
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)
    want = R.iwae_loss(*args, reduction=reduction)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][0], want, **tol)


def test_unit_grad_output_and_retained_graph(backend):
    """loss.backward() hands the stored gradient out; with retain_graph the buffer is copied,
    so editing the handed-out gradient in place leaves the second backward right."""
    args = _inputs()
    recon = args[0].clone().requires_grad_()
    loss = vae_fast.iwae_loss(recon, *args[1:])
    (g1,) = torch.autograd.grad(loss, recon, retain_graph=True)
    want = torch.autograd.grad(R.iwae_loss(recon, *args[1:]), recon)[0]
    torch.testing.assert_close(g1, want, rtol=1e-12, atol=1e-12)
    g1.mul_(100.0)
    (g2,) = torch.autograd.grad(loss, recon, retain_graph=True)
    torch.testing.assert_close(g2, want, rtol=1e-12, atol=1e-12)
    (g3,) = torch.autograd.grad(loss * 3.0, recon)  # a grad_output other than 1
    torch.testing.assert_close(g3, 3.0 * want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_inputs(backend, dtype):
    """16-bit recon and target: loss in float32, each gradient in its input's dtype, within
    the rounding of the inputs' dtype of a float64 evaluation at the same (rounded) inputs."""
    recon, target, z, mu, lv = _inputs(dtype)
    leaves = [t.clone().requires_grad_() for t in (recon, z, mu, lv)]
    got = vae_fast.iwae_loss(leaves[0], target, *leaves[1:])
    assert got.dtype == torch.float32
    grads = torch.autograd.grad(got, leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = R.iwae_loss(ref[0], target.double(), *ref[1:])
    want_grads = torch.autograd.grad(want, ref)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    eps = torch.finfo(dtype).eps
    for a, b, leaf in zip(grads, want_grads, leaves):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), b, rtol=4 * eps, atol=4 * eps * b.abs().max().item())


def test_channels_last_and_full_logvar(backend):
    """recon (K, B, C, H, W) made of channels_last samples, and a Gaussian with a full-size
    recon_logvar (K, B, C, H, W) that takes a gradient: both against the reference."""
    recon, target, z, mu, lv = _inputs(likelihood="gaussian")
    k, b = recon.shape[:2]
    recon = recon.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(recon.shape)
    rlv = (0.3 * torch.randn(recon.shape, dtype=torch.float64)).requires_grad_()
    leaves = [recon.requires_grad_(), z.requires_grad_(), mu.requires_grad_(), lv.requires_grad_(), rlv]
    w = torch.rand(b, dtype=torch.float64) + 0.5
    got = vae_fast.iwae_loss(recon, target, z, mu, lv, likelihood="gaussian", recon_logvar=rlv,
                             reduction="none")
    grads = torch.autograd.grad((got * w).sum(), leaves)
    want = R.iwae_loss(recon, target, z, mu, lv, likelihood="gaussian", recon_logvar=rlv, reduction="none")
    want_grads = torch.autograd.grad((want * w).sum(), leaves)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(grads, want_grads):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def _op_args(backend_code, reduction=Reduction.BATCHMEAN, grad=True):
    recon, target, z, mu, lv = _inputs(k=3, shape=(4, 2, 3))
    lat = torch.randn(3, 4, dtype=torch.float64)
    rlv = 0.2 * torch.randn(2, 1, dtype=torch.float64)
    if grad:
        recon.requires_grad_(), lat.requires_grad_(), rlv.requires_grad_()
    return (recon, target, rlv, lat, int(Likelihood.GAUSSIAN), True, 0.0, int(reduction), backend_code)


@pytest.mark.parametrize("reduction", (Reduction.BATCHMEAN, Reduction.SUM, Reduction.PER_SAMPLE))
def test_opcheck(backend, reduction):
    code = int(Backend.CPU if backend == "cpu" else Backend.TRITON)
    torch.library.opcheck(torch.ops.vae_fast.iwae.default, _op_args(code, reduction))
    args = _op_args(code, reduction, grad=False)
    torch.library.opcheck(torch.ops.vae_fast.iwae_fwd.default, args + (3,))


def test_compile_fullgraph_backward(backend):
    torch._dynamo.reset()
    args = _inputs(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (args[0], args[2], args[3], args[4])]
    f = torch.compile(lambda x, t, z, m, v: vae_fast.iwae_loss(x, t, z, m, v, reduction="sum"),
                      fullgraph=True)
    got = f(leaves[0], args[1], *leaves[1:])
    grads = torch.autograd.grad(got, leaves)
    want = R.iwae_loss(leaves[0], args[1], *leaves[1:], reduction="sum")
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_and_per_sample_grads(backend):
    recon, target, z, mu, lv = _inputs()
    argnums = (0, 2, 3, 4)
    got = torch.func.grad(vae_fast.iwae_loss, argnums=argnums)(recon, target, z, mu, lv)
    want = torch.func.grad(R.iwae_loss, argnums=argnums)(recon, target, z, mu, lv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # per-example gradients: vmap over the batch of grad of a one-example bound
    def one(x, t, zz, m, v):
        return vae_fast.iwae_loss(x.unsqueeze(1), t[None], zz.unsqueeze(1), m[None], v[None])

    def one_ref(x, t, zz, m, v):
        return R.iwae_loss(x.unsqueeze(1), t[None], zz.unsqueeze(1), m[None], v[None])

    dims = (1, 0, 1, 0, 0)
    got = torch.func.vmap(torch.func.grad(one, argnums=(0, 3)), dims)(recon, target, z, mu, lv)
    want = torch.func.vmap(torch.func.grad(one_ref, argnums=(0, 3)), dims)(recon, target, z, mu, lv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_mode_and_what_raises(backend):
    recon, target, z, mu, lv = _inputs()
    with torch.inference_mode():
        got = vae_fast.iwae_loss(recon, target, z, mu, lv)
    torch.testing.assert_close(got, R.iwae_loss(recon, target, z, mu, lv), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.func.jacrev(torch.func.grad(lambda x: vae_fast.iwae_loss(x, target, z, mu, lv)))(recon)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x: vae_fast.iwae_loss(x, target, z, mu, lv), (recon,), (torch.ones_like(recon),))
    with pytest.raises(NotImplementedError, match="takes no gradient"):
        vae_fast.iwae_loss(recon, target.clone().requires_grad_(), z, mu, lv)


def test_latent_terms_reach_their_inputs_with_the_right_sign(backend):
    """d loss / d z_kb through the weights: a finite difference of the bound in one z entry
    (float64) agrees with the gradient (the sign of -w_kb in lat's gradient matters)."""
    recon, target, z, mu, lv = _inputs(k=3, shape=(2, 5))
    z = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(vae_fast.iwae_loss(recon, target, z, mu, lv), z)
    h = 1e-6
    zp, zm = z.detach().clone(), z.detach().clone()
    zp[1, 0, 2] += h
    zm[1, 0, 2] -= h
    fd = (vae_fast.iwae_loss(recon, target, zp, mu, lv) - vae_fast.iwae_loss(recon, target, zm, mu, lv)) / (2 * h)
    assert math.isclose(g[1, 0, 2].item(), fd.item(), rel_tol=1e-6, abs_tol=1e-9)


# ---- vae_fast::iwae_latent ---------------------------------------------------------------------

LATENT_LV = ("full", "per_latent", "0-d", "number")


def _latent_inputs(dtype, lv_form, *, k=3, b=5, z_dim=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def n(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    z, mu = n(k, b, z_dim).requires_grad_(), n(b, z_dim).requires_grad_()
    lv = {"full": lambda: n(b, z_dim, scale=0.5), "per_latent": lambda: n(z_dim, scale=0.5),
          "0-d": lambda: n((), scale=0.5), "number": lambda: 0.3}[lv_form]()
    if isinstance(lv, torch.Tensor):
        lv.requires_grad_()
    return z, mu, lv


def _latent_op(z, mu, lv, dtype):
    tensor = isinstance(lv, torch.Tensor)
    return torch.ops.vae_fast.iwae_latent(z, mu, lv if tensor else None, 0.0 if tensor else lv, dtype)


@pytest.mark.parametrize("lv_form", LATENT_LV)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_latent_op_matches_the_formula(dtype, lv_form):
    require_backend("cpu")
    from vae_fast import _common as C
    z, mu, lv = _latent_inputs(dtype, lv_form)
    leaves = [t for t in (z, mu, lv) if isinstance(t, torch.Tensor)]
    weight = torch.randn(z.shape[:2], generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = _latent_op(z, mu, lv, dtype)
    want = C.iwae_latent(z, mu, lv, dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), leaves),
                    torch.autograd.grad((want * weight).sum(), leaves)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_latent_op_float32_inputs_in_float64_and_back():
    """The terms in the pixels' accumulation dtype (float64 here) from float32 inputs: the
    gradients come back in each input's own dtype."""
    require_backend("cpu")
    from vae_fast import _common as C
    z, mu, lv = _latent_inputs(torch.float32, "full")
    got = _latent_op(z, mu, lv, torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, C.iwae_latent(z, mu, lv, torch.float64), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (z, mu, lv))
    want = torch.autograd.grad(C.iwae_latent(z, mu, lv, torch.float64).sum(), (z, mu, lv))
    for a, b in zip(grads, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lv_form", LATENT_LV[:3])
def test_latent_op_gradcheck(lv_form):
    require_backend("cpu")
    z, mu, lv = _latent_inputs(torch.float64, lv_form)
    assert torch.autograd.gradcheck(lambda *a: _latent_op(*a, torch.float64), (z, mu, lv))


def test_latent_op_opcheck_and_threads():
    require_backend("cpu")
    z, mu, lv = (t.detach() for t in _latent_inputs(torch.float32, "full", k=5, b=64, z_dim=128))
    torch.library.opcheck(torch.ops.vae_fast.iwae_latent.default, (z, mu, lv, 0.0, torch.float32))
    torch.library.opcheck(torch.ops.vae_fast.iwae_latent.default, (z.double(), mu, None, 0.3, torch.float64))
    bwd = torch.ops.vae_fast.iwae_latent_backward.default
    g = torch.randn(z.shape[:2])
    torch.library.opcheck(bwd, (g, z, mu, lv[0], 0.0, 7))
    torch.library.opcheck(bwd, (g, z, mu, None, 0.3, 3))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append((_latent_op(z, mu, lv, torch.float32), *bwd(g, z, mu, lv, 0.0, 7)))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
