"""The C++ eager fast path of the cpu backend (csrc/eager.cpp, entered from
vae_fast.functional._fast): which calls take it, and that it gives the general path's numbers
(same kernel): values, gradients for every kind of grad_output, retain_graph, gradcheck in
float64, and the general path's errors for everything it does not cover."""
import pytest
import torch

import vae_fast
from vae_fast import _backend, _cpu, functional as F
from vae_fast import reference as R

from conftest import require_backend

FAST_NODE = "CppNode<vae_fast::FusedLoss>"


@pytest.fixture(autouse=True)
def cpu_backend():
    require_backend("cpu")
    with _backend.use_backend("cpu"):
        yield


def took_fast(loss) -> bool:
    return loss.grad_fn is not None and FAST_NODE in loss.grad_fn.name()


class _General:
    """Runs a call on the general path (the extension's eager op hidden)."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __call__(self, fn, *args, **kwargs):
        real = _cpu.eager_op
        self.mp.setattr(_cpu, "eager_op", None)
        try:
            return fn(*args, **kwargs)
        finally:
            self.mp.setattr(_cpu, "eager_op", real)


@pytest.fixture
def general(monkeypatch):
    return _General(monkeypatch)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def cases(dt):
    """name -> (function, tensor kwargs, other kwargs); all in the fast path's case."""
    g = _gen(0)
    B, shape, Z = 4, (4, 3, 5, 6), 7

    def n(*s, scale=1.0):
        s = s[0] if len(s) == 1 and isinstance(s[0], tuple) else s
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dt)

    def u(*s):
        return torch.rand(*s, generator=g, dtype=torch.float64).to(dt)

    def post():
        return dict(mu=n(B, Z), logvar=n(B, Z, scale=0.5))

    return {
        "elbo_bernoulli": (F.elbo_loss, dict(recon=n(*shape, scale=3), target=u(*shape), **post()),
                           dict(beta=0.7, return_terms=True)),
        "elbo_bernoulli_bool": (F.elbo_loss, dict(recon=n(*shape, scale=3), target=u(*shape) > 0.5,
                                                  **post()), dict(beta=3)),
        "elbo_probs": (F.elbo_loss, dict(recon=u(*shape) * 0.9 + 0.05, target=u(*shape), **post()),
                       dict(likelihood="bernoulli_probs", return_terms=True)),
        "elbo_gaussian_full": (F.elbo_loss, dict(recon=n(*shape), target=n(*shape), **post(),
                                                 recon_logvar=n(*shape, scale=0.5),
                                                 prior_mu=n(B, Z), prior_logvar=n(B, Z, scale=0.5)),
                               dict(likelihood="gaussian", beta=2.0, return_terms=True)),
        "elbo_gaussian_consts": (F.elbo_loss, dict(recon=n(*shape), target=n(*shape), **post()),
                                 dict(likelihood="gaussian", recon_logvar=-0.5, prior_mu=0.3,
                                      prior_logvar=0.2)),
        "bernoulli_nll": (F.bernoulli_nll, dict(logits=n(*shape, scale=3), target=u(*shape)), {}),
        "gaussian_nll_full": (F.gaussian_nll, dict(mean=n(B, 9), target=n(B, 9),
                                                   logvar=n(B, 9, scale=0.5)), dict(full=False)),
        "gaussian_nll_float": (F.gaussian_nll, dict(mean=n(B, 9), target=n(B, 9)), dict(logvar=0.4)),
        "kl_standard": (F.gaussian_kl, post(), {}),
        "kl_full_prior": (F.gaussian_kl, dict(**post(), prior_mu=n(B, Z), prior_logvar=n(B, Z)), {}),
        "bce_logits": (F.binary_cross_entropy_with_logits, dict(input=n(B, 11, scale=3),
                                                                target=u(B, 11)), {}),
        "bce_probs": (F.binary_cross_entropy, dict(input=u(B, 11) * 0.9 + 0.05, target=u(B, 11)), {}),
        # learned broadcast parameters: a scalar recon log-variance, a per-feature prior
        "elbo_gaussian_learned": (F.elbo_loss, dict(recon=n(*shape), target=n(*shape), **post(),
                                                    recon_logvar=n((), scale=0.5), prior_mu=n(Z),
                                                    prior_logvar=n(Z, scale=0.5)),
                                  dict(likelihood="gaussian", beta=0.5, return_terms=True)),
        "gaussian_nll_channel": (F.gaussian_nll, dict(mean=n(*shape), target=n(*shape),
                                                      logvar=n(3, 1, 1, scale=0.5)), {}),
        "kl_per_sample_prior": (F.gaussian_kl, dict(**post(), prior_mu=n(B, 1),
                                                    prior_logvar=n(1, Z, scale=0.5)), {}),
        # as under autocast: a 16-bit decoder output and posterior, float32 data
        "elbo_autocast": (F.elbo_loss, dict(recon=n(*shape, scale=3), target=u(*shape).float(),
                                            **post()), dict(return_terms=True)),
    }


def reductions(fn):
    if fn in (F.binary_cross_entropy_with_logits, F.binary_cross_entropy):
        return ("mean", "sum")
    if fn is F.elbo_loss:
        return ("batchmean", "sum", "none")
    return ("batchmean", "sum", "mean", "none")


ALL = [(name, red) for name, (fn, _, _) in cases(torch.float32).items() for red in reductions(fn)]


def _terms(out):
    return list(out) if isinstance(out, tuple) else [out]


def _run(fn, tensors, kw, reduction, how, caller=None):
    """Outputs and the gradients of every float tensor, for one way of back-propagating."""
    leaves = {k: t.detach().clone().requires_grad_(t.is_floating_point()) for k, t in tensors.items()}
    call = (lambda: fn(**leaves, **kw, reduction=reduction))
    out = call() if caller is None else caller(call)
    terms = _terms(out)
    gen = _gen(1)
    if how == "ones":  # the coefficient 1: the stored gradients, unscaled
        (terms[0].sum() if terms[0].dim() else terms[0]).backward()
    elif how == "random":  # a random grad_output (per sample for "none")
        terms[0].backward(torch.randn(terms[0].shape, generator=gen, dtype=terms[0].dtype))
    elif how == "terms":  # every term with its own weight (return_terms), or loss * 3
        total = sum(t.sum() * w for t, w in zip(terms, (3.0, -0.5, 2.0)))
        total.backward()
    elif how == "retain":  # two backwards through one graph: the buffers must stay intact
        loss = terms[0].sum() * 1.5
        loss.backward(retain_graph=True)
        loss.backward()
    grads = {k: t.grad for k, t in leaves.items() if t.requires_grad}
    return terms, grads


DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("how", ("ones", "random", "terms", "retain"))
@pytest.mark.parametrize("name,reduction", ALL)
def test_fast_matches_general(general, name, reduction, how, dtype):
    fn, tensors, kw = cases(dtype)[name]
    fast, fast_g = _run(fn, tensors, kw, reduction, how)
    slow, slow_g = _run(fn, tensors, kw, reduction, how, caller=lambda c: general(c))
    assert took_fast(fast[0]) and not took_fast(slow[0])
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(a, b)
    assert fast_g.keys() == slow_g.keys()
    for k in fast_g:
        assert (fast_g[k] is None) == (slow_g[k] is None), k
        if fast_g[k] is not None:
            assert fast_g[k].dtype == tensors[k].dtype
            torch.testing.assert_close(fast_g[k], slow_g[k], msg=lambda m: f"grad of {k}: {m}")


@pytest.mark.parametrize("name", ("elbo_bernoulli", "elbo_gaussian_full", "kl_full_prior"))
def test_fast_matches_reference(name):
    """Against the plain-torch twin too (the general path is itself checked against it)."""
    fn, tensors, kw = cases(torch.float64)[name]
    ref_fn = getattr(R, fn.__name__)
    for red in reductions(fn):
        out, grads = _run(fn, tensors, kw, red, "random")
        ref, ref_grads = _run(ref_fn, tensors, kw, red, "random")
        assert took_fast(out[0])
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)


def test_forward_only_takes_fast_path(monkeypatch):
    """No tensor needs a gradient: one C++ call, no autograd node, no Python path."""
    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    expected = fn(**tensors, **kw)

    def boom(*a, **k):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(F, "compute", boom)
    out = fn(**tensors, **kw)
    assert out.loss.grad_fn is None
    for a, b in zip(out, expected):
        assert torch.equal(a, b)
    with torch.no_grad():  # requires_grad inputs, but grad mode off
        out = fn(**{k: t.clone().requires_grad_(t.is_floating_point()) for k, t in tensors.items()}, **kw)
    assert out.loss.grad_fn is None and not out.loss.requires_grad


def _general_only():
    """Calls outside the fast path's case (each must still be right: the general path)."""
    g = _gen(2)
    x, y = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    mu, lv = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 0.5
    return {
        "non_contiguous": (F.elbo_loss, (x.t().contiguous().t(), y, mu, lv), {}),
        "channels_last": (F.bernoulli_nll, (torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
                                            torch.rand(2, 3, 4, 5, generator=g)), {}),
        "bce_0d": (F.binary_cross_entropy_with_logits, (x[0, 0], y[0, 0]), {}),
        "gapped_broadcast": (F.gaussian_nll, (torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g),
                                              torch.zeros(3, 1, 5)), {}),
        "float_posterior_logvar": (F.gaussian_kl, (mu, -1.0), {}),
        "tensor_beta": (F.elbo_loss, (x, y, mu, lv), dict(beta=torch.tensor(0.5))),
        "bce_weight": (F.binary_cross_entropy_with_logits, (x, y, torch.rand(6, generator=g)), {}),
        "bce_elementwise": (F.binary_cross_entropy_with_logits, (x, y), dict(reduction="none")),
        "empty_batch": (F.elbo_loss, (x[:0], y[:0], mu[:0], lv[:0]), {}),
    }


@pytest.mark.parametrize("name", list(_general_only()))
def test_other_calls_take_general_path(name):
    fn, args, kw = _general_only()[name]
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    out = fn(*leaves, **kw)
    out = out[0] if isinstance(out, tuple) else out
    assert not took_fast(out)
    ref = getattr(R, fn.__name__)(*args, **kw)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_other_backends_skip_fast_path():
    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    with _backend.use_backend("reference"):
        assert not took_fast(fn(**leaves, **kw).loss)
    assert took_fast(fn(**leaves, **kw).loss)


def test_bad_arguments_raise_the_general_errors():
    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    t = tensors
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], reduction="mean")
    with pytest.raises(ValueError, match="beta must be a non-negative"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], beta=-1.0)
    with pytest.raises(ValueError, match="beta must be a non-negative"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], beta=float("nan"))
    with pytest.raises(TypeError, match="beta must be"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], beta=True)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], likelihood="poisson")
    with pytest.raises(ValueError, match="target must have the shape"):
        F.elbo_loss(t["recon"], t["target"][:, :1], t["mu"], t["logvar"])
    with pytest.raises(ValueError, match="batch size"):
        F.elbo_loss(t["recon"], t["target"], t["mu"][:2], t["logvar"][:2])
    with pytest.raises(ValueError, match="recon_logvar is only used"):
        F.elbo_loss(t["recon"], t["target"], t["mu"], t["logvar"], recon_logvar=0.0)
    with pytest.raises(TypeError, match="floating point"):
        F.bernoulli_nll(t["recon"].long(), t["target"])


def test_second_order_and_second_backward_raise():
    fn, tensors, kw = cases(torch.float64)["elbo_bernoulli"]
    leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    loss = fn(**leaves, **kw).loss
    assert took_fast(loss)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(loss, leaves["recon"], create_graph=True)
    loss = fn(**leaves, **kw).loss
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def _backward_allocations(loss) -> int:
    """Bytes allocated (not freed) by the CPU allocator during loss.backward()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return sum(e.nbytes() for e in events if e.nbytes() > 0)


def test_grad_becomes_the_buffer_and_accumulates():
    """With grad_output 1 the stored buffer itself becomes .grad (the engine frees the node's
    reference first): the backward allocates nothing of the recon's size; a second loss adds
    to it."""
    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    fn(**leaves, **kw)  # warm-up (the profiler's own first-use allocations)
    loss = fn(**leaves, **kw).loss
    assert took_fast(loss)
    for t in leaves.values():
        t.grad = None
    assert _backward_allocations(loss) < tensors["recon"].numel() * 4
    first = {k: t.grad.clone() for k, t in leaves.items()}
    fn(**leaves, **kw).loss.backward()
    for k, t in leaves.items():
        torch.testing.assert_close(t.grad, 2 * first[k])
    ref = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    R.elbo_loss(**ref, **kw).loss.backward()
    for k in leaves:
        torch.testing.assert_close(first[k], ref[k].grad)


@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
def test_gradcheck_fast_path(reduction):
    """float64 gradcheck through the C++ node, every input taking a gradient (targets and a
    full-shape prior included), per-sample grad_outputs for "none"."""
    g = _gen(3)

    def t(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()

    def p(*s):
        return (torch.rand(*s, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()

    args = (t(3, 2, 4, scale=2), p(3, 2, 4), t(3, 5), t(3, 5, scale=0.5), t(3, 5), t(3, 5, scale=0.5))

    def bern(x, y, mu, lv, pmu, plv):
        out = F.elbo_loss(x, y, mu, lv, prior_mu=pmu, prior_logvar=plv, beta=0.6,
                          reduction=reduction, return_terms=True)
        assert took_fast(out.loss)
        return out

    assert torch.autograd.gradcheck(bern, args)
    args = (t(3, 6), t(3, 6), t(3, 6, scale=0.5), t(3, 5), t(3, 5, scale=0.5))

    def gauss(x, y, s, mu, lv):
        out = F.elbo_loss(x, y, mu, lv, likelihood="gaussian", recon_logvar=s, reduction=reduction)
        assert took_fast(out)
        return out

    assert torch.autograd.gradcheck(gauss, args)


def test_gradcheck_can_fail_on_fast_path(monkeypatch):
    """gradcheck through the fast path is not vacuous: a gradient off by 1% at the C++ node's
    output (a hook on the node) is caught."""
    real = _cpu.eager_op
    seen = []

    def wrong(*args):
        out = real(*args)
        if out and out[0].grad_fn is not None:
            seen.append(out[0].grad_fn.name())
            out[0].grad_fn.register_hook(
                lambda grad_in, grad_out: tuple(None if gi is None else gi * 1.01 for gi in grad_in))
        return out

    monkeypatch.setattr(_cpu, "eager_op", wrong)
    g = _gen(4)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 5, generator=g, dtype=torch.float64)
    assert not torch.autograd.gradcheck(lambda a: F.bernoulli_nll(a, y), (x,), raise_exception=False)
    assert seen and all(FAST_NODE in s for s in seen)


def test_threads_give_identical_results():
    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    big = {k: (t.repeat(16, 4, 1, 1) if t.dim() == 4 else t.repeat(16, 1)) for k, t in tensors.items()}
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(fn, big, kw, "none", "random"))
    finally:
        torch.set_num_threads(old)
    (a, ga), (b, gb) = results
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for k in ga:
        assert torch.equal(ga[k], gb[k])


def test_jit_trace_raises_instead_of_recording_nothing():
    """A pybind call is invisible to torch.jit.trace (a trace of it returned a stale number):
    tracing skips the fast path, and the fused backends refuse to be traced; the reference
    traces fine."""
    def f(*a):
        return F.elbo_loss(*a)

    g = _gen(5)
    a = [torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g), torch.randn(4, 3, generator=g),
         torch.randn(4, 3, generator=g)]
    b = [torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g), torch.randn(4, 3, generator=g),
         torch.randn(4, 3, generator=g)]
    f(*a)
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record"):
        torch.jit.trace(f, a, check_trace=False)
    with _backend.use_backend("reference"):
        traced = torch.jit.trace(f, a, check_trace=False)
    torch.testing.assert_close(traced(*b), R.elbo_loss(*b))


def test_export_takes_the_custom_op():
    """torch.export (which the jit.trace error points to) traces the custom op, not the fast
    path, and the exported program computes the loss of new inputs."""
    class Loss(torch.nn.Module):
        def forward(self, *a):
            return F.elbo_loss(*a)

    g = _gen(6)
    a = (torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g), torch.randn(4, 3, generator=g),
         torch.randn(4, 3, generator=g))
    b = tuple(torch.randn_like(t) if i != 1 else torch.rand_like(t) for i, t in enumerate(a))
    ep = torch.export.export(Loss(), a)
    assert "vae_fast.fused_loss" in str(ep.graph)
    torch.testing.assert_close(ep.module()(*b), R.elbo_loss(*b))


def test_modes_see_the_ops():
    """Under make_fx (a dispatch mode) or a torch-function mode the fast path steps aside, so
    the traced graph computes the loss of new inputs (through the fast path it returned 0.0)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.overrides import TorchFunctionMode

    def f(*a):
        return F.elbo_loss(*a)

    g = _gen(7)
    a = [torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g), torch.randn(4, 3, generator=g),
         torch.randn(4, 3, generator=g)]
    b = [torch.randn_like(t) if i != 1 else torch.rand_like(t) for i, t in enumerate(a)]
    f(*a)
    gm = make_fx(f)(*a)
    torch.testing.assert_close(gm(*b), R.elbo_loss(*b))

    class Seen(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Seen.calls += 1
            return func(*args, **(kwargs or {}))

    with Seen():
        out = f(*[t.clone().requires_grad_() for t in a])
    assert Seen.calls > 0 and not took_fast(out)


def test_profiler_names_the_fast_path():
    from torch.profiler import profile

    fn, tensors, kw = cases(torch.float32)["elbo_bernoulli"]
    leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    with profile() as prof:
        fn(**leaves, **kw).loss.backward()
    names = {e.key for e in prof.key_averages()}
    assert "vae_fast::eager_loss" in names and any(FAST_NODE in n for n in names)
