"""vae_fast.mixture_prior_kl: the single-sample KL log q(z|x) - log p(z) against a
Gaussian-mixture prior, checked against its (B, K, Z) broadcast reference run in float64, on
each fused backend (the `backend` fixture: the Triton kernels under the interpreter and the C++
kernels of the op vae_fast::mixture_kl).

- values for every reduction, dtype and parameter form (logits or equal weights, K = 1,
  broadcast and scalar log-variances), and the tight-component case where the float32 matmul
  expansion of the quadratic form loses every digit;
- gradients: gradcheck in float64 on all six inputs, float32 against the reference's autograd,
  each input's gradient in its own dtype, torch.func.grad; a second derivative raises (the
  backward is hand-written; the reference's gradgradcheck passes);
- memory: no allocation, forward or backward, inside the op's kernels included, is anything
  near (B, K, Z);
- argument errors (the public checks, a forced backend that cannot run, the raw op's own
  checks), torch.library.opcheck, torch.compile(fullgraph=True), thread-count determinism.
"""
import math
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vae_fast
from vae_fast import mixture_prior_kl
from vae_fast._enums import Backend, Reduction
from vae_fast.reference import mixture_prior_kl as mixture_prior_kl_reference

REDUCTIONS = ("batchmean", "sum", "none")
RTOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def _inputs(B=6, K=5, Z=7, dtype=torch.float32, lv="full", plv="full", logits=True, seed=0):
    """(z, mu, logvar, prior_mu, prior_logvar, prior_logits); lv / plv: "full" (the input's
    shape), "row" ((1, Z) / (K, 1)) or "float"."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    mu = r(B, Z)
    logvar = {"full": r(B, Z, scale=0.3), "row": r(1, Z, scale=0.3), "float": -0.4}[lv]
    z = (mu + 0.8 * torch.randn(B, Z, generator=g)).to(dtype)
    prior_logvar = {"full": r(K, Z, scale=0.3), "row": r(K, 1, scale=0.3), "float": 0.25}[plv]
    return z, mu, logvar, r(K, Z), prior_logvar, r(K) if logits else None


def _f64(args):
    return [a.detach().double() if isinstance(a, torch.Tensor) else a for a in args]


def _leaves(args):
    return [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


def _assert_rel(out, ref, rtol):
    """Relative to the largest reference value, so a per-example value near 0 is not a
    0/0 ratio."""
    err = (out.double() - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), (err, ref.abs().max().item())


CASES = {
    "logits": dict(),
    "equal_weights": dict(logits=False),
    "K1": dict(K=1),
    "K1_equal_weights": dict(K=1, logits=False),
    "plv_K1": dict(plv="row"),
    "plv_float": dict(plv="float", logits=False),
    "lv_float": dict(lv="float"),
    "lv_1Z": dict(lv="row", plv="row"),
}


@pytest.mark.parametrize("dtype", RTOL, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_values_match_float64_reference(backend, case, reduction, dtype):
    args = _inputs(dtype=dtype, **CASES[case])
    out = mixture_prior_kl(*args, reduction=reduction)
    ref = mixture_prior_kl_reference(*_f64(args), reduction=reduction)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ((6,) if reduction == "none" else ())
    _assert_rel(out, ref, RTOL[dtype])


def test_reductions_agree(backend):
    args = _inputs()
    per = mixture_prior_kl(*args, reduction="none")
    torch.testing.assert_close(mixture_prior_kl(*args, reduction="sum"), per.sum())
    torch.testing.assert_close(mixture_prior_kl(*args), per.sum() / 6)


def test_reference_is_the_formula(backend):
    """One example, one latent dimension, two components, by hand."""
    z, mu, lv = 0.3, -0.2, 0.1
    pm, plv, logits = [1.0, -0.5], [0.2, -0.3], [0.4, -1.0]

    def log_n(x, m, s):
        return -0.5 * (math.log(2 * math.pi) + s + (x - m) ** 2 * math.exp(-s))

    lw = [a - math.log(sum(math.exp(b) for b in logits)) for a in logits]
    want = log_n(z, mu, lv) - math.log(sum(math.exp(w + log_n(z, m, s)) for w, m, s in zip(lw, pm, plv)))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    args = (t([[z]]), t([[mu]]), t([[lv]]), t(pm)[:, None], t(plv)[:, None], t(logits))
    for fn in (mixture_prior_kl_reference, mixture_prior_kl):
        assert fn(*args).item() == pytest.approx(want, rel=1e-13)


def _tight(dtype, B=32, K=50, Z=64):
    """prior_logvar = -8 (e^-s ~ 3000), components' means |m| ~ 3, each z within one standard
    deviation of one of them: the matmul expansion's terms are ~1e6 times their difference."""
    g = torch.Generator().manual_seed(1)
    pm = 3 * torch.randn(K, Z, generator=g)
    z = pm[torch.randint(K, (B,), generator=g)] + math.exp(-4) * torch.randn(B, Z, generator=g)
    mu = z + 0.1 * torch.randn(B, Z, generator=g)
    lv = -6 + 0.3 * torch.randn(B, Z, generator=g)
    plv = torch.full((K, Z), -8.0)
    return [a.to(dtype) for a in (z, mu, lv, pm, plv, torch.randn(K, generator=g))]


def _naive_float32_expansion(z, mu, lv, pm, plv, logits):
    prec = torch.exp(-plv)
    quad = (z * z) @ prec.T - 2 * z @ (pm * prec).T + (pm * pm * prec).sum(1)
    log_q = -0.5 * (lv + (z - mu) ** 2 * torch.exp(-lv)).sum(1)
    return log_q - torch.logsumexp(torch.log_softmax(logits, 0) - 0.5 * (plv.sum(1) + quad), 1)


def test_tight_components_stay_accurate(backend):
    args = _tight(torch.float32)
    ref = mixture_prior_kl_reference(*_f64(args), reduction="none")
    assert ref.abs().min() > 1  # relative errors below are not ratios to ~0
    rel = lambda out: ((out.double() - ref).abs() / ref.abs()).max().item()  # noqa: E731
    assert rel(mixture_prior_kl(*args, reduction="none")) < 1e-6
    # the tolerance is meaningful: the same expansion in float32 misses by far more
    assert rel(_naive_float32_expansion(*args)) > 1e-3
    assert rel(mixture_prior_kl(*_tight(torch.float64), reduction="none")) < 1e-10


def test_mixed_dtypes_and_gradient_dtypes(backend):
    dts = (torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float32)
    args = _leaves([a.to(d) for a, d in zip(_inputs(), dts)])
    out = mixture_prior_kl(*args)
    assert out.dtype == torch.float32
    _assert_rel(out, mixture_prior_kl_reference(*_f64(args)), 1e-6)
    out.backward()
    assert [a.grad.dtype for a in args] == list(dts)
    # any float64 input, even the logits alone, makes it float64
    args = [a.detach() for a in args[:5]] + [args[5].detach().double()]
    assert mixture_prior_kl(*args).dtype == torch.float64


# (case, reduction): each case and each reduction at least once (the interpreter makes every
# evaluation of the Triton path slow, so not all nine pairs)
GRADCHECKS = [("logits", "none"), ("plv_K1", "batchmean"), ("lv_1Z", "sum"),
              ("plv_float", "none")]


@pytest.mark.parametrize("case,reduction", GRADCHECKS)
def test_gradcheck(backend, case, reduction):
    kw = {**CASES[case], "B": 3, "K": 3, "Z": 4, "dtype": torch.float64}
    args = _leaves(_inputs(**kw))
    fn = lambda *a: mixture_prior_kl(*a, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_many_components_and_rows():
    """More rows and components than one Triton tile / C++ row block holds (the C++ kernels'
    4-row blocks and their remainder, several [16, 16] tiles with masked edges)."""
    for name in vae_fast_backends():
        args = _leaves(_inputs(B=19, K=18, Z=2, dtype=torch.float64))
        with vae_fast.use_backend(name):
            assert torch.autograd.gradcheck(
                lambda *a: mixture_prior_kl(*a, reduction="sum"), args, fast_mode=True), name


def test_gradgradcheck_reference():
    args = _leaves(_inputs(B=3, K=4, Z=5, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(mixture_prior_kl_reference, args)


def test_second_derivative_raises(backend):
    args = _leaves(_inputs(B=3, K=4, Z=5, dtype=torch.float64))
    (g,) = torch.autograd.grad(mixture_prior_kl(*args), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        g.sum().backward()
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda z: mixture_prior_kl(z, *args[1:]), (args[0].detach(),),
                       (torch.ones_like(args[0]),))


@pytest.mark.parametrize("case", ["logits", "equal_weights", "plv_K1", "plv_float", "lv_1Z"])
def test_float32_grads_match_reference(backend, case):
    args = _leaves(_inputs(B=16, K=9, Z=11, **CASES[case]))
    ref_args = _leaves(_f64(args))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ref_tensors = [a for a in ref_args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(mixture_prior_kl(*args, reduction="sum"), tensors)
    ref_grads = torch.autograd.grad(mixture_prior_kl_reference(*ref_args, reduction="sum"), ref_tensors)
    for g, rg, a in zip(grads, ref_grads, tensors):
        assert g.dtype == torch.float32 and g.shape == a.shape
        _assert_rel(g, rg, 1e-6)


def test_func_grad(backend):
    args = _inputs(dtype=torch.float64)
    grads = torch.func.grad(mixture_prior_kl, argnums=tuple(range(6)))(*args)
    leaves = _leaves(args)
    want = torch.autograd.grad(mixture_prior_kl_reference(*leaves), leaves)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _largest_allocations(fn, B, K, Z):
    """The most any one op allocated (bytes) in the forward and in the backward: the profiler
    sees every allocation through torch's CPU allocator, the ops inside the C++ kernels
    included."""
    args = _leaves(_inputs(B=B, K=K, Z=Z))
    sizes = []
    for step in ("fwd", "bwd"):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            if step == "fwd":
                loss = fn(*args)
            else:
                loss.backward()
        # self: what an op allocated itself, not its children's (which count on their own)
        sizes.append(max((e.self_cpu_memory_usage for e in prof.events()), default=0))
    assert all(a.grad is not None for a in args)
    return sizes


def test_no_BKZ_intermediate(backend):
    B, K, Z = 32, 64, 32
    bkz = B * K * Z * 4
    fwd, bwd = _largest_allocations(mixture_prior_kl, B, K, Z)
    # the float32 (B, K) responsibilities and the (B, Z) / (K, Z) inputs are the largest (on
    # the C++ path exactly 4 * B * K; Triton's interpreter adds copies of its own, under twice)
    assert 0 < max(fwd, bwd) <= 8 * max(B * K, B * Z, K * Z) < bkz / 10
    if backend == "cpu":
        assert max(fwd, bwd) == 4 * B * K
    # the method can fail: the reference allocates (B, K, Z) both ways
    ref_fwd, ref_bwd = _largest_allocations(mixture_prior_kl_reference, B, K, Z)
    assert ref_fwd >= bkz and ref_bwd >= bkz


def _bad(**change):
    args = dict(zip(("z", "mu", "logvar", "prior_mu", "prior_logvar", "prior_logits"), _inputs()))
    args["reduction"] = "batchmean"
    args.update(change)
    return args


ERRORS = {
    "z_list": (dict(z=[[0.0] * 7] * 6), TypeError, "z must be a torch.Tensor, got list"),
    "z_int": (dict(z=torch.zeros(6, 7, dtype=torch.long)), TypeError, "z must be a floating point tensor"),
    "z_1d": (dict(z=torch.zeros(7), mu=torch.zeros(7), logvar=0.0), ValueError, r"z must be 2-D .* \(7,\)"),
    "z_3d": (dict(z=torch.zeros(6, 1, 7), mu=torch.zeros(6, 1, 7), logvar=0.0), ValueError, "z must be 2-D"),
    "mu_none": (dict(mu=None), TypeError, "mu must be a torch.Tensor"),
    "mu_shape": (dict(mu=torch.zeros(6, 8)), ValueError,
                 r"mu must have the shape of z: got mu \(6, 8\) and z \(6, 7\)"),
    "mu_bool": (dict(mu=torch.zeros(6, 7, dtype=torch.bool)), TypeError, "mu must be a floating point"),
    "logvar_shape": (dict(logvar=torch.zeros(6, 8)), ValueError, r"logvar of shape \(6, 8\) does not broadcast"),
    "logvar_3d": (dict(logvar=torch.zeros(1, 6, 7)), ValueError, "logvar of shape"),
    "logvar_int": (dict(logvar=torch.zeros(6, 7, dtype=torch.int32)), TypeError, "logvar must be a floating"),
    "logvar_str": (dict(logvar="0"), TypeError, "logvar must be a tensor or a real number, got str"),
    "logvar_none": (dict(logvar=None), TypeError, "logvar must be a tensor or a number, got None"),
    "prior_mu_float": (dict(prior_mu=0.0), TypeError, "prior_mu must be a torch.Tensor, got float"),
    "prior_mu_int": (dict(prior_mu=torch.zeros(5, 7, dtype=torch.long)), TypeError, "prior_mu must be a floating"),
    "prior_mu_Z": (dict(prior_mu=torch.zeros(5, 8)), ValueError,
                   r"prior_mu must have shape \(K, Z\).* Z = 7: got prior_mu \(5, 8\)"),
    "prior_mu_1d": (dict(prior_mu=torch.zeros(7)), ValueError, r"prior_mu must have shape \(K, Z\)"),
    "prior_mu_0d": (dict(prior_mu=torch.tensor(0.0)), ValueError, r"prior_mu must have shape \(K, Z\)"),
    "prior_mu_K0": (dict(prior_mu=torch.zeros(0, 7), prior_logvar=0.0, prior_logits=None), ValueError, "K >= 1"),
    "prior_logvar_shape": (dict(prior_logvar=torch.zeros(4, 1)), ValueError,
                           r"prior_logvar of shape \(4, 1\) does not broadcast to the shape of prior_mu \(5, 7\)"),
    "prior_logvar_3d": (dict(prior_logvar=torch.zeros(6, 5, 7)), ValueError, "prior_logvar of shape"),
    "prior_logvar_none": (dict(prior_logvar=None), TypeError, "prior_logvar must be a tensor or a number"),
    "prior_logvar_int": (dict(prior_logvar=torch.zeros(5, 7, dtype=torch.long)), TypeError,
                         "prior_logvar must be a floating"),
    "prior_logits_shape": (dict(prior_logits=torch.zeros(4)), ValueError,
                           r"prior_logits must have shape \(K,\) = \(5,\).*got \(4,\)"),
    "prior_logits_2d": (dict(prior_logits=torch.zeros(1, 5)), ValueError, "prior_logits must have shape"),
    "prior_logits_list": (dict(prior_logits=[0.0] * 5), TypeError,
                          "prior_logits must be a torch.Tensor or None, got list"),
    "prior_logits_int": (dict(prior_logits=torch.zeros(5, dtype=torch.long)), TypeError,
                         "prior_logits must be a floating"),
    "reduction": (dict(reduction="mean"), ValueError,
                  re.escape("reduction must be one of ('batchmean', 'sum', 'none'), got 'mean'")),
    "reduction_none": (dict(reduction=None), ValueError, "reduction must be one of"),
    "device": (dict(prior_mu=torch.zeros(5, 7, device="meta")), ValueError,
               "all tensors must be on one device, got .*prior_mu on meta"),
    "device_logits": (dict(prior_logits=torch.zeros(5, device="meta")), ValueError, "prior_logits on meta"),
}


@pytest.mark.parametrize("fn", [mixture_prior_kl, mixture_prior_kl_reference], ids=["fused", "reference"])
@pytest.mark.parametrize("name", ERRORS)
def test_errors(name, fn):
    change, exc, match = ERRORS[name]
    with pytest.raises(exc, match=match):
        fn(**_bad(**change))


def vae_fast_backends():
    from conftest import fused_backends

    return fused_backends()


def test_forced_backend_that_cannot_run_raises():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _inputs()]
    for name in ("cpu", "triton"):
        with vae_fast.use_backend(name), pytest.raises(NotImplementedError, match="cannot run on meta"):
            mixture_prior_kl(*args)
    if "cpu" in vae_fast_backends():
        z, mu, lv, pm, plv, lg = _inputs()
        op = torch.ops.vae_fast.mixture_kl
        red, cpu = int(Reduction.SUM), int(Backend.CPU)
        with pytest.raises(RuntimeError, match="unknown backend code 7"):
            op(z, mu, lv, pm, plv, lg, red, 7)
        with pytest.raises(RuntimeError, match="reduction must be"):
            op(z, mu, lv, pm, plv, lg, int(Reduction.MEAN), cpu)


RAW_ERRORS = [
    (lambda z, mu, lv, pm, plv, lg: (z, mu[:, :3], lv, pm, plv, lg), "z and mu must be"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv, pm[:, :3], plv, lg), "pmu must be"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv, pm[:0], plv[:0], lg[:0]), "pmu must be"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv[:, :2], pm, plv, lg), "lv and plv must broadcast"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv, pm, plv[:2], lg), "lv and plv must broadcast"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv, pm, plv, lg[:2]), "logits must be"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv.long(), pm, plv, lg), "floating point"),
    (lambda z, mu, lv, pm, plv, lg: (z, mu, lv, pm, plv, lg.to("meta")), "all tensors must be on"),
]


@pytest.mark.parametrize("bad", range(len(RAW_ERRORS)))
def test_raw_op_checks_its_shapes(backend, bad):
    """The op indexes its kernels by these shapes: called directly, it checks them itself."""
    make, msg = RAW_ERRORS[bad]
    code = int(Backend.CPU if backend == "cpu" else Backend.TRITON)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.vae_fast.mixture_kl(*make(*_inputs()), int(Reduction.SUM), code)


@pytest.mark.parametrize("case", ["logits", "lv_1Z", "plv_float"])
def test_opcheck(backend, case):
    args = _leaves(_inputs(B=5, K=3, Z=4, dtype=torch.float64, **CASES[case]))
    lv, plv = (a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64)
               for a in (args[2], args[4]))
    code = int(Backend.CPU if backend == "cpu" else Backend.TRITON)
    for red in (Reduction.BATCHMEAN, Reduction.PER_SAMPLE):
        torch.library.opcheck(torch.ops.vae_fast.mixture_kl.default,
                              (args[0], args[1], lv, args[3], plv, args[5], int(red), code))


def test_deterministic_whatever_the_threads():
    if "cpu" not in vae_fast_backends():
        pytest.skip("vae_fast._C unavailable")
    args = _inputs(B=37, K=29, Z=13)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = _leaves(args)
            with vae_fast.use_backend("cpu"):
                loss = mixture_prior_kl(*leaves, reduction="sum")
                outs.append([loss] + list(torch.autograd.grad(loss, leaves)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_torch_compile_fullgraph_matches_eager(backend):
    """The forward traces as one graph (no break); AOTAutograd's backward gives eager's grads."""
    def loss_fn(z, mu, lv, pm, plv, logits):
        return mixture_prior_kl(z, mu, lv, pm, plv, logits) + 0.5 * mixture_prior_kl(
            z, mu, 0.1, pm, plv[:, :1], None, reduction="none").sum()

    args = _inputs(B=8, K=6, Z=5)
    torch._dynamo.reset()
    try:
        leaves = _leaves(args)
        got = torch.compile(loss_fn, fullgraph=True)(*leaves)
        got_grads = torch.autograd.grad(got, leaves)
    finally:
        torch._dynamo.reset()
    leaves = _leaves(args)
    want = loss_fn(*leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g, w)
