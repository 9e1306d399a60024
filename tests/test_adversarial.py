"""Adversarial inputs: each gets a clear ValueError/TypeError naming the argument (raised before
any kernel runs, with the same words on every backend and in the reference) or a documented,
tested result. Nothing crashes the process, reads outside its tensors or masks a NaN.

Documented results tested here:
- empty tensors follow torch: `sum` = 0, `batchmean`/`mean` = nan, `none` = empty; zero-size
  feature dims give 0 per row (`mean` = nan);
- zero-stride (expand), overlapping (as_strided) and aliased inputs give the reference's values
  and gradients (inputs are only read);
- NaN/Inf in any input, tensor or number, reach the loss: non-finite exactly where the
  reference is non-finite, on every row it touches and no other;
- a second backward through one graph is correct or a clear RuntimeError;
- a forced backend that cannot run the tensors' device raises NotImplementedError.
"""
from __future__ import annotations

import fractions
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")  # before vae_fast imports triton (conftest does too)

import vae_fast  # noqa: E402
from vae_fast import _backend, reference  # noqa: E402

F32, F64 = torch.float32, torch.float64


from conftest import fused_backends  # noqa: E402


BACKENDS = ["reference"] + fused_backends()
FUSED = fused_backends()

_gen = torch.Generator().manual_seed(1234)


def T(*shape, dtype=F32, device="cpu", lo=None):
    """Random floats (uniform in [0, 1) when lo is given as 0, else normal)."""
    v = torch.rand(shape, generator=_gen) if lo == 0 else torch.randn(shape, generator=_gen)
    return v.to(dtype).to(device)


def P(*shape, dtype=F32):
    return T(*shape, dtype=dtype, lo=0)


def I(*shape):  # noqa: E743
    return torch.randint(0, 2, shape, generator=_gen)


def C(*shape):
    return torch.randn(shape, dtype=torch.complex64, generator=_gen)


def B(*shape):
    return torch.rand(shape, generator=_gen) < 0.5


def M(*shape):
    return torch.empty(shape, device="meta")


# ---------------------------------------------------------------------------------------------
# bad input: (id, call(module), exception, words the message must contain)

BAD = [
    # shapes
    ("bernoulli_target_shape", lambda m: m.bernoulli_nll(T(4, 5), P(4, 6)), ValueError,
     ["target", "(4, 6)", "(4, 5)"]),
    ("gaussian_target_shape", lambda m: m.gaussian_nll(T(4, 5), T(5, 4)), ValueError,
     ["target", "(5, 4)", "(4, 5)"]),
    ("elbo_target_shape", lambda m: m.elbo_loss(T(4, 5), P(4, 5, 1), T(4, 2), T(4, 2)),
     ValueError, ["target", "(4, 5, 1)"]),
    ("elbo_batch_mismatch", lambda m: m.elbo_loss(T(4, 5), P(4, 5), T(3, 2), T(3, 2)),
     ValueError, ["batch", "recon", "mu", "(4, 5)", "(3, 2)"]),
    ("kl_logvar_shape", lambda m: m.gaussian_kl(T(4, 5), T(3, 5)), ValueError,
     ["logvar", "(3, 5)", "(4, 5)"]),
    ("kl_logvar_enlarges", lambda m: m.gaussian_kl(T(4, 5), T(2, 4, 5)), ValueError,
     ["logvar", "(2, 4, 5)"]),
    ("kl_prior_mu_shape", lambda m: m.gaussian_kl(T(4, 5), T(4, 5), T(6)), ValueError,
     ["prior_mu", "(6,)"]),
    ("kl_prior_logvar_shape", lambda m: m.gaussian_kl(T(4, 5), T(4, 5), None, T(4, 1, 5)),
     ValueError, ["prior_logvar", "(4, 1, 5)"]),
    ("gaussian_logvar_shape", lambda m: m.gaussian_nll(T(4, 5), T(4, 5), T(4, 4)), ValueError,
     ["logvar", "(4, 4)"]),
    ("elbo_logvar_shape", lambda m: m.elbo_loss(T(4, 5), P(4, 5), T(4, 2), T(4, 3)), ValueError,
     ["logvar", "(4, 3)"]),
    ("elbo_recon_logvar_shape", lambda m: m.elbo_loss(T(4, 5), T(4, 5), T(4, 2), T(4, 2),
                                                      likelihood="gaussian", recon_logvar=T(7)),
     ValueError, ["recon_logvar", "(7,)"]),
    ("elbo_prior_shape", lambda m: m.elbo_loss(T(4, 5), P(4, 5), T(4, 2), T(4, 2),
                                               prior_mu=T(3)), ValueError, ["prior_mu", "(3,)"]),
    ("bce_target_shape", lambda m: m.binary_cross_entropy_with_logits(T(4, 5), P(20)),
     ValueError, ["target", "(20,)"]),
    ("bce_weight_shape", lambda m: m.binary_cross_entropy(P(4, 5), P(4, 5), P(3)), ValueError,
     ["weight", "(3,)"]),
    ("bce_pos_weight_shape", lambda m: m.binary_cross_entropy_with_logits(
        T(4, 5), P(4, 5), pos_weight=P(4)), ValueError, ["pos_weight", "(4,)"]),
    # dtypes
    ("int_recon", lambda m: m.elbo_loss(I(4, 5), P(4, 5), T(4, 2), T(4, 2)), TypeError,
     ["recon", "int64"]),
    ("int_logits", lambda m: m.bernoulli_nll(I(4, 5), P(4, 5)), TypeError, ["logits", "int64"]),
    ("complex_logits", lambda m: m.bernoulli_nll(C(4, 5), P(4, 5)), TypeError,
     ["logits", "complex64"]),
    ("int_target_bernoulli", lambda m: m.bernoulli_nll(T(4, 5), I(4, 5)), TypeError,
     ["target", "int64"]),
    ("complex_target", lambda m: m.bernoulli_nll(T(4, 5), C(4, 5)), TypeError,
     ["target", "complex64"]),
    ("uint8_target_bce", lambda m: m.binary_cross_entropy(P(4, 5), I(4, 5).to(torch.uint8)),
     TypeError, ["target", "uint8"]),
    ("bool_target_gaussian", lambda m: m.gaussian_nll(T(4, 5), B(4, 5)), TypeError,
     ["target", "bool"]),
    ("bool_target_elbo_gaussian", lambda m: m.elbo_loss(T(4, 5), B(4, 5), T(4, 2), T(4, 2),
                                                        likelihood="gaussian"),
     TypeError, ["target", "bool"]),
    ("int_mean", lambda m: m.gaussian_nll(I(4, 5), T(4, 5)), TypeError, ["mean", "int64"]),
    ("complex_mu", lambda m: m.gaussian_kl(C(4, 5), T(4, 5)), TypeError, ["mu", "complex64"]),
    ("int_mu_elbo", lambda m: m.elbo_loss(T(4, 5), P(4, 5), I(4, 2), T(4, 2)), TypeError,
     ["mu", "int64"]),
    ("int_logvar", lambda m: m.gaussian_kl(T(4, 5), I(4, 5)), TypeError, ["logvar", "int64"]),
    ("bool_logvar", lambda m: m.gaussian_nll(T(4, 5), T(4, 5), B(4, 5)), TypeError,
     ["logvar", "bool"]),
    ("int_prior_mu", lambda m: m.gaussian_kl(T(4, 5), T(4, 5), I(5)), TypeError,
     ["prior_mu", "int64"]),
    ("complex_prior_logvar", lambda m: m.gaussian_kl(T(4, 5), T(4, 5), None, C(5)), TypeError,
     ["prior_logvar", "complex64"]),
    ("int_recon_logvar", lambda m: m.elbo_loss(T(4, 5), T(4, 5), T(4, 2), T(4, 2),
                                               likelihood="gaussian", recon_logvar=I(5)),
     TypeError, ["recon_logvar", "int64"]),
    ("int_bce_input", lambda m: m.binary_cross_entropy(I(4, 5), P(4, 5)), TypeError,
     ["input", "int64"]),
    ("int_weight", lambda m: m.binary_cross_entropy(P(4, 5), P(4, 5), I(5)), TypeError,
     ["weight", "int64"]),
    ("int_pos_weight", lambda m: m.binary_cross_entropy_with_logits(T(4, 5), P(4, 5),
                                                                    pos_weight=I(5)),
     TypeError, ["pos_weight", "int64"]),
    # not tensors
    ("list_logits", lambda m: m.bernoulli_nll([[0.0, 1.0]], P(1, 2)), TypeError,
     ["logits", "list"]),
    ("numpy_target", lambda m: m.bernoulli_nll(T(2, 2), np.zeros((2, 2))), TypeError,
     ["target", "ndarray"]),
    ("none_target", lambda m: m.gaussian_nll(T(2, 2), None), TypeError, ["target", "NoneType"]),
    ("none_mu", lambda m: m.elbo_loss(T(2, 2), P(2, 2), None, T(2, 2)), TypeError, ["mu"]),
    ("none_logvar_nll", lambda m: m.gaussian_nll(T(2, 2), T(2, 2), None), TypeError, ["logvar"]),
    ("none_logvar_kl", lambda m: m.gaussian_kl(T(2, 2), None), TypeError, ["logvar"]),
    ("str_prior_mu", lambda m: m.gaussian_kl(T(2, 2), T(2, 2), "0"), TypeError,
     ["prior_mu", "str"]),
    ("bool_logvar_number", lambda m: m.gaussian_nll(T(2, 2), T(2, 2), True), TypeError,
     ["logvar", "bool"]),
    ("float_weight", lambda m: m.binary_cross_entropy(P(2, 2), P(2, 2), 0.5), TypeError,
     ["weight", "float"]),
    ("float_pos_weight", lambda m: m.binary_cross_entropy_with_logits(T(2, 2), P(2, 2),
                                                                      pos_weight=2.0),
     TypeError, ["pos_weight", "float"]),
    # devices ("meta" is the second device)
    ("meta_target", lambda m: m.bernoulli_nll(T(4, 5), M(4, 5)), ValueError,
     ["device", "target", "meta", "logits", "cpu"]),
    ("meta_mu", lambda m: m.elbo_loss(T(4, 5), P(4, 5), M(4, 2), M(4, 2)), ValueError,
     ["device", "mu", "meta", "recon", "cpu"]),
    ("meta_logvar", lambda m: m.gaussian_kl(T(4, 5), M(4, 5)), ValueError,
     ["logvar", "meta", "mu", "cpu"]),
    ("meta_prior_logvar", lambda m: m.gaussian_kl(T(4, 5), T(4, 5), None, M(5)), ValueError,
     ["prior_logvar", "meta"]),
    ("meta_recon_logvar", lambda m: m.elbo_loss(T(4, 5), T(4, 5), T(4, 2), T(4, 2),
                                                likelihood="gaussian", recon_logvar=M(5)),
     ValueError, ["recon_logvar", "meta"]),
    ("meta_weight", lambda m: m.binary_cross_entropy(P(4, 5), P(4, 5), M(5)), ValueError,
     ["weight", "meta"]),
    ("meta_input_cpu_target", lambda m: m.binary_cross_entropy_with_logits(M(4, 5), P(4, 5)),
     ValueError, ["input", "meta", "target", "cpu"]),
    # 0-d (no batch dimension)
    ("0d_logits", lambda m: m.bernoulli_nll(T(), P()), ValueError, ["logits", "0-d"]),
    ("0d_mean", lambda m: m.gaussian_nll(T(), T()), ValueError, ["mean", "0-d"]),
    ("0d_mu", lambda m: m.gaussian_kl(T(), T()), ValueError, ["mu", "0-d"]),
    ("0d_recon", lambda m: m.elbo_loss(T(), P(), T(2), T(2)), ValueError, ["recon", "0-d"]),
    ("0d_mu_elbo", lambda m: m.elbo_loss(T(3, 4), P(3, 4), T(), T()), ValueError, ["mu", "0-d"]),
    ("0d_target_for_1d_logits", lambda m: m.bernoulli_nll(T(3), P()), ValueError,
     ["target", "()"]),
    # unknown options
    ("reduction_typo", lambda m: m.bernoulli_nll(T(2, 3), P(2, 3), reduction="avg"), ValueError,
     ["reduction", "'avg'"]),
    ("reduction_case", lambda m: m.gaussian_kl(T(2, 3), T(2, 3), reduction="MEAN"), ValueError,
     ["reduction", "'MEAN'"]),
    ("reduction_none_object", lambda m: m.gaussian_nll(T(2, 3), T(2, 3), reduction=None),
     ValueError, ["reduction", "None"]),
    ("reduction_int", lambda m: m.bernoulli_nll(T(2, 3), P(2, 3), reduction=0), ValueError,
     ["reduction"]),
    ("reduction_internal_name", lambda m: m.bernoulli_nll(T(2, 3), P(2, 3),
                                                          reduction="elementwise"),
     ValueError, ["reduction", "'elementwise'"]),
    ("elbo_reduction_mean", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                                  reduction="mean"),
     ValueError, ["reduction", "'mean'"]),
    ("bce_reduction_batchmean", lambda m: m.binary_cross_entropy(P(2, 3), P(2, 3),
                                                                 reduction="batchmean"),
     ValueError, ["reduction", "'batchmean'"]),
    ("likelihood_unknown", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                                 likelihood="poisson"),
     ValueError, ["likelihood", "'poisson'"]),
    ("likelihood_case", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                              likelihood="Bernoulli"),
     ValueError, ["likelihood", "'Bernoulli'"]),
    ("likelihood_none", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                              likelihood=None),
     ValueError, ["likelihood"]),
    ("recon_logvar_with_bernoulli", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                                          recon_logvar=0.5),
     ValueError, ["recon_logvar", "bernoulli"]),
    # beta
    ("beta_negative", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=-1.0),
     ValueError, ["beta", "-1"]),
    ("beta_negative_tiny", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                                 beta=-1e-300), ValueError, ["beta"]),
    ("beta_negative_inf", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                                beta=float("-inf")), ValueError, ["beta"]),
    ("beta_nan", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=float("nan")),
     ValueError, ["beta", "nan"]),
    ("beta_str", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta="1.0"),
     TypeError, ["beta", "str"]),
    ("beta_tensor_1d", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                             beta=torch.tensor([1.0])),
     TypeError, ["beta", "(1,)"]),
    ("beta_tensor_int", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2),
                                              beta=torch.tensor(1)), TypeError, ["beta", "int64"]),
    ("beta_tensor_meta", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=M()),
     ValueError, ["beta", "meta"]),
    ("beta_bool", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=True),
     TypeError, ["beta", "bool"]),
    ("beta_none", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=None),
     TypeError, ["beta", "NoneType"]),
    ("beta_complex", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=1j),
     TypeError, ["beta", "complex"]),
    ("beta_huge_int", lambda m: m.elbo_loss(T(2, 3), P(2, 3), T(2, 2), T(2, 2), beta=10**400),
     (ValueError, TypeError), ["beta"]),
    ("logvar_huge_int", lambda m: m.gaussian_nll(T(2, 3), T(2, 3), 10**400),
     (ValueError, TypeError), ["logvar"]),
    ("prior_logvar_huge_int", lambda m: m.gaussian_kl(T(2, 3), T(2, 3), None, -10**400),
     (ValueError, TypeError), ["prior_logvar"]),
]


@pytest.fixture
def no_compute(monkeypatch):
    """Inside: no loss may run on any backend (checks come first): the reference's compute
    fails the test, and the compiled extension's count of fused kernel runs must not move."""
    def boom(*args, **kwargs):
        raise AssertionError("a backend ran before the arguments were checked")

    monkeypatch.setattr(vae_fast.reference, "compute", boom)
    ext = _backend.cpu_extension()[0]
    before = ext.kernel_calls() if ext is not None else None
    yield monkeypatch
    if ext is not None:
        assert ext.kernel_calls() == before, "a fused kernel ran before the arguments were checked"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused(backend, call, exc, words, no_compute):
    with vae_fast.use_backend(backend), pytest.raises(exc) as info:
        call(vae_fast)
    msg = str(info.value)
    missing = [w for w in words if w not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.parametrize("call,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_reference_refuses_the_same_way(call, exc, words):
    with pytest.raises(exc) as ours:
        call(vae_fast)
    with pytest.raises(exc) as theirs:
        call(reference)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        with vae_fast.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend"):
        with vae_fast.use_backend(None):
            pass


def test_unknown_backend_in_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VAE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError) as info:
        vae_fast.bernoulli_nll(T(2, 3), P(2, 3))
    assert "'bogus'" in str(info.value) and "VAE_FAST_BACKEND" in str(info.value)


@pytest.mark.parametrize("backend", FUSED)
def test_forced_backend_on_a_device_it_cannot_run_raises(backend):
    """A forced fused backend never falls back: meta tensors raise NotImplementedError."""
    with vae_fast.use_backend(backend), pytest.raises(NotImplementedError, match=backend):
        vae_fast.elbo_loss(M(4, 5), M(4, 5), M(4, 2), M(4, 2))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_meta_tensors_get_shapes_from_the_reference(backend):
    with vae_fast.use_backend(backend):
        terms = vae_fast.elbo_loss(M(4, 5), M(4, 5), M(4, 2), M(4, 2), reduction="none",
                                   return_terms=True)
    assert all(t.device.type == "meta" and tuple(t.shape) == (4,) for t in terms)




# ---------------------------------------------------------------------------------------------
# helpers for documented results

def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad and t.is_floating_point())


def _run(backend, fn, args, kw, gout=None):
    """(outputs, grads of the leaves among args) of one call and backward on `backend`."""
    with vae_fast.use_backend(backend):
        out = getattr(vae_fast, fn)(*args, **kw)
    outs = list(out) if isinstance(out, tuple) else [out]
    leaves = [a for a in list(args) + list(kw.values())
              if isinstance(a, torch.Tensor) and a.requires_grad and a.is_leaf]
    for a in leaves:
        a.grad = None
    if outs[0].requires_grad:
        g = torch.ones_like(outs[0]) if gout is None else torch.full_like(outs[0], gout)
        outs[0].backward(g)
    return [o.detach() for o in outs], [a.grad for a in leaves]


def _same(ours, theirs, rtol=2e-5, atol=1e-6):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def _fresh(args):
    return [_leaf(a) for a in args]


def _compare_with_reference(backend, fn, args, kw, gout=0.37):
    """The backend must match the reference on fresh leaf copies of `args`."""
    ours = _run(backend, fn, _fresh(args), kw, gout)
    theirs = _run("reference", fn, _fresh(args), kw, gout)
    _same(ours[0], theirs[0])
    _same(ours[1], theirs[1])
    return ours


# ---------------------------------------------------------------------------------------------
# empty and zero-size tensors

VAE_CALLS = {
    "bernoulli_nll": lambda s, z: ((T(*s), P(*s)), {}),
    "gaussian_nll": lambda s, z: ((T(*s), T(*s), T(*s[1:])), {}),
    "gaussian_kl": lambda s, z: ((T(*z), T(*z), T(*z[1:]), T(*z[1:])), {}),
    "elbo_loss": lambda s, z: ((T(*s), P(*s), T(*z), T(*z)), {"return_terms": True}),
}
# every (function, reduction) that exists: elbo_loss has no "mean"
FN_REDUCTIONS = [(fn, r) for fn in VAE_CALLS for r in ("sum", "batchmean", "mean", "none")
                 if not (fn == "elbo_loss" and r == "mean")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,reduction", FN_REDUCTIONS)
def test_empty_batch_follows_torch(backend, fn, reduction):
    """Batch 0: sum = 0, batchmean and mean = nan (0/0), none = empty (0,); grads empty."""
    args, kw = VAE_CALLS[fn]((0, 5), (0, 3))
    args = [_leaf(a) for a in args]
    outs, grads = _run(backend, fn, args, {**kw, "reduction": reduction})
    for o in outs:
        assert o.dtype == F32
        if reduction == "none":
            assert tuple(o.shape) == (0,)
        elif reduction == "sum":
            assert tuple(o.shape) == () and o.item() == 0.0
        else:
            assert tuple(o.shape) == () and o.isnan().item()
    for a, g in zip(args, grads):
        assert g is None or (tuple(g.shape) == tuple(a.shape) and g.dtype == a.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,reduction", FN_REDUCTIONS)
def test_zero_size_features(backend, fn, reduction):
    """Rows of length 0: sum = batchmean = 0, mean = nan, none = zeros(B); a (Z,) = (0,)
    prior is read by nobody (no modulo by zero)."""
    args, kw = VAE_CALLS[fn]((3, 0), (3, 0))
    args = [_leaf(a) for a in args]
    outs, grads = _run(backend, fn, args, {**kw, "reduction": reduction})
    for o in outs:
        if reduction == "none":
            torch.testing.assert_close(o, torch.zeros(3))
        elif reduction == "mean":
            assert o.isnan().item()
        else:
            assert o.item() == 0.0
    for a, g in zip(args, grads):
        assert g is None or (tuple(g.shape) == tuple(a.shape) and not g.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_empty_drop_in_matches_torch(backend, fn, reduction, shape):
    x, y, w = _leaf(P(*shape)), _leaf(P(*shape)), _leaf(P(*shape[1:]))
    outs, grads = _run(backend, fn, (x, y, w), {"reduction": reduction})
    want = getattr(F, fn)(x.detach(), y.detach(), w.detach(), reduction=reduction)
    torch.testing.assert_close(outs[0], want, equal_nan=True)
    for a, g in zip((x, y, w), grads):
        assert g is None or (tuple(g.shape) == tuple(a.shape) and not g.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_0d_drop_in_matches_torch(backend, fn, reduction):
    """torch's BCE takes 0-d tensors, so the drop-ins do too."""
    args = (P(), P(), P())
    outs, grads = _compare_with_reference(backend, fn, args, {"reduction": reduction})
    torch.testing.assert_close(outs[0], getattr(F, fn)(*args, reduction=reduction))
    assert all(g.shape == () for g in grads)


# ---------------------------------------------------------------------------------------------
# strides and memory overlap

@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_stride_views(backend):
    """expand() views (stride 0) as inputs and as full-shaped parameters."""
    base = {k: T(*s) for k, s in dict(x=(1, 7), y=(1, 7), mu=(1, 5), lv=(5,), pmu=(5,)).items()}

    def make():
        leaves = {k: _leaf(v) for k, v in base.items()}
        return ([leaves["x"].expand(4, 7), torch.sigmoid(leaves["y"]).expand(4, 7),
                 leaves["mu"].expand(4, 5), leaves["lv"].expand(4, 5)], leaves)

    results = []
    for be in (backend, "reference"):
        args, leaves = make()
        with vae_fast.use_backend(be):
            loss = vae_fast.elbo_loss(*args, prior_mu=leaves["pmu"].expand(4, 5), beta=0.5)
        (loss * 0.37).backward()
        results.append([loss.detach()] + [leaves[k].grad for k in sorted(leaves)])
    _same(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_memory(backend):
    """as_strided views whose rows share storage: only read, so any overlap is fine."""
    base_x, base_z = T(20), T(14)

    def make():
        bx, bz = _leaf(base_x), _leaf(base_z)
        x = bx.as_strided((4, 8), (3, 1))      # rows overlap by 5 elements
        mu = bz.as_strided((4, 4), (2, 1))
        lv = bz.as_strided((4, 4), (1, 3))     # mu and logvar overlap each other
        return (x, torch.sigmoid(bx.detach()).as_strided((4, 8), (3, 1)), mu, lv), (bx, bz)

    results = []
    for be in (backend, "reference"):
        args, bases = make()
        with vae_fast.use_backend(be):
            loss = vae_fast.elbo_loss(*args, reduction="none")
        loss.backward(torch.tensor([1.0, 0.5, -2.0, 3.0]))
        results.append([loss.detach()] + [b.grad for b in bases])
    _same(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliased_arguments(backend):
    """One tensor passed as both recon and target, and as both mu and logvar."""
    xs, zs = T(3, 6), T(3, 4)

    def make():
        x, z = _leaf(xs), _leaf(zs)
        return (x, x, z, z), {"likelihood": "gaussian", "recon_logvar": 0.3}

    results = []
    for be in (backend, "reference"):
        args, kw = make()
        outs, _ = _run(be, "elbo_loss", args, kw, gout=0.37)
        results.append(outs + [args[0].grad, args[2].grad])
    _same(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["binary_cross_entropy", "binary_cross_entropy_with_logits",
                                "bernoulli_nll", "gaussian_nll"])
@pytest.mark.parametrize("fmt", ["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_channels_last_with_any_grad_output(backend, fn, fmt, reduction):
    """channels_last inputs (which a backend may walk in memory order) with a grad_output per
    element (the drop-ins' "none"), per row or a number: the reference's gradients, in the
    inputs' logical order."""
    shape = (2, 3, 4, 5) if fmt == "channels_last" else (2, 3, 2, 4, 5)
    mf = getattr(torch, fmt)
    gen = torch.Generator().manual_seed(11)
    x0, y0 = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    results = []
    for be in (backend, "reference"):
        x = x0.contiguous(memory_format=mf).requires_grad_()
        y = y0.contiguous(memory_format=mf).requires_grad_()
        with vae_fast.use_backend(be):
            out = getattr(vae_fast, fn)(x, y, reduction=reduction)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
        out.backward(g)
        results.append([out.detach(), x.grad, y.grad])
    _same(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,args", [
    ("bernoulli_nll", (T(4, 9), P(4, 9))),
    ("binary_cross_entropy", (P(4, 9), P(4, 9), P(9))),
    ("binary_cross_entropy_with_logits", (T(4, 9), P(4, 9), P(9))),
    ("gaussian_nll", (T(4, 9), T(4, 9), T(9))),
], ids=["bernoulli", "bce", "bce_logits", "gaussian"])
def test_requires_grad_on_targets(backend, fn, args):
    """A float target that requires grad gets the reference's gradient."""
    _compare_with_reference(backend, fn, args, {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_modified(backend):
    gen = torch.Generator().manual_seed(5)
    vals = [torch.randn(s, generator=gen) for s in ((3, 2, 5), (3, 2, 5), (3, 4), (3, 4), (4,))]
    leaves = [_leaf(v) for v in vals]
    leaves[1] = _leaf(torch.sigmoid(vals[1]))
    before = [t.detach().clone() for t in leaves]
    with vae_fast.use_backend(backend):
        loss = vae_fast.elbo_loss(*leaves[:4], prior_logvar=leaves[4], reduction="none")
    loss.backward(torch.tensor([0.5, 1.0, -3.0]))
    for t, b in zip(leaves, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["offset", "slice"])
def test_views_never_read_outside(backend, layout):
    """Every input a view into NaN-filled storage: a stray read would poison the loss."""
    def view(t):
        if layout == "offset":
            v = torch.full((t.numel() + 2,), float("nan"))[1:-1].view(t.shape)
        else:
            v = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"))[..., 1::2]
        return v.copy_(t)

    gen = torch.Generator().manual_seed(9)
    shapes = {"recon": (5, 3, 37), "target": (5, 3, 37), "mu": (5, 11), "logvar": (5, 11),
              "recon_logvar": (3, 1), "prior_mu": (11,), "prior_logvar": (11,)}
    vals = {k: torch.rand(s, generator=gen) for k, s in shapes.items()}
    for reduction in ("none", "sum"):
        ours = {k: view(v).requires_grad_() for k, v in vals.items()}
        theirs = {k: v.clone().requires_grad_() for k, v in vals.items()}
        got = []
        for be, args in ((backend, ours), ("reference", theirs)):
            with vae_fast.use_backend(be):
                loss = vae_fast.elbo_loss(likelihood="gaussian", reduction=reduction, **args)
            assert loss.isfinite().all()
            loss.sum().backward()
            got.append([loss.detach()] + [args[k].grad for k in shapes])
        _same(got[0], got[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [33, 100])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_many_short_rows(backend, rows, reduction):
    """More rows than one block of the finalize kernel, per-row grad_output differing."""
    vals = (T(rows, 3), P(rows, 3), T(rows, 2), T(rows, 2))
    gen = torch.Generator().manual_seed(rows)
    g = torch.where(torch.rand(rows, generator=gen) < 0.5, 1.0, torch.randn(rows, generator=gen))
    results = []
    for be in (backend, "reference"):
        args = _fresh(vals)
        with vae_fast.use_backend(be):
            loss = vae_fast.elbo_loss(*args, reduction=reduction, beta=0.3)
        loss.backward(g if reduction == "none" else torch.tensor(0.37))
        results.append([loss.detach()] + [a.grad for a in args])
    _same(results[0], results[1])


# ---------------------------------------------------------------------------------------------
# NaN / Inf propagate

POISON_CALLS = {
    # fn: (builder of fresh args, slots that can be poisoned)
    "bernoulli_nll": (lambda: ([T(3, 8), P(3, 8)], {}), ["0", "1"]),
    "gaussian_nll": (lambda: ([T(3, 8), T(3, 8), T(3, 8)], {}), ["0", "1", "2"]),
    "gaussian_kl": (lambda: ([T(3, 6), T(3, 6), T(6), T(6)], {}), ["0", "1", "2", "3"]),
    "elbo_loss": (lambda: ([T(3, 8), T(3, 8), T(3, 6), T(3, 6)],
                           {"likelihood": "gaussian", "recon_logvar": T(8), "prior_mu": T(6),
                            "prior_logvar": T(6)}),
                  ["0", "1", "2", "3", "recon_logvar", "prior_mu", "prior_logvar"]),
    "elbo_bernoulli": (lambda: ([T(3, 8), P(3, 8), T(3, 6), T(3, 6)], {}), ["0", "1", "2", "3"]),
    "binary_cross_entropy_with_logits": (lambda: ([T(3, 8), P(3, 8), P(8)],
                                                  {"pos_weight": P(8)}),
                                         ["0", "1", "2", "pos_weight"]),
    "binary_cross_entropy": (lambda: ([P(3, 8), P(3, 8), P(8)], {}), ["0", "1", "2"]),
}
POISON = [(fn, slot) for fn, (_, slots) in POISON_CALLS.items() for slot in slots]


def _poisoned(fn, slot, value):
    args, kw = POISON_CALLS[fn][0]()
    t = args[int(slot)] if slot.isdigit() else kw[slot]
    if t.dim() == 1:
        t[2] = value          # a broadcast parameter: every row reads it
    else:
        t[1, 2] = value       # one element of row 1
    return "elbo_loss" if fn == "elbo_bernoulli" else fn, args, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn,slot", POISON, ids=[f"{f}-{s}" for f, s in POISON])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_and_inf_reach_the_loss(backend, value, fn, slot, reduction):
    """A NaN/Inf anywhere makes the loss non-finite exactly where the reference's is (only the
    rows it touches for "none"); a NaN input always gives a NaN loss; the gradients are
    non-finite exactly where the reference's are."""
    results = []
    name, args0, kw0 = _poisoned(fn, slot, value)
    for be in (backend, "reference"):
        args = _fresh(args0)
        kw = {k: _leaf(v) if isinstance(v, torch.Tensor) else v for k, v in kw0.items()}
        with vae_fast.use_backend(be):
            out = getattr(vae_fast, name)(*args, **kw, reduction=reduction)
        (out * 0.37).sum().backward()
        grads = [a.grad for a in list(args) + list(kw.values())
                 if isinstance(a, torch.Tensor) and a.requires_grad]
        results.append((out.detach(), grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert not ref.isfinite().all(), "the reference masks the poison"
    torch.testing.assert_close(ours.isfinite(), ref.isfinite())
    if value != value:
        assert ours.isnan().any()
    finite = ref.isfinite()
    torch.testing.assert_close(ours[finite], ref[finite], rtol=2e-5, atol=1e-6)
    for g, h in zip(our_grads, ref_grads):
        torch.testing.assert_close(g.isfinite(), h.isfinite())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["logvar", "prior_mu", "prior_logvar", "recon_logvar"])
def test_non_finite_numbers_reach_the_loss(backend, value, which):
    vals = (T(3, 5), T(3, 5), T(3, 4), T(3, 4))
    kw = {"likelihood": "gaussian"} if which == "logvar" else {"likelihood": "gaussian",
                                                               which: value}
    results = []
    for be in (backend, "reference"):
        recon, target, mu, logvar = _fresh(vals)
        with vae_fast.use_backend(be):
            out = vae_fast.elbo_loss(recon, target, mu, value if which == "logvar" else logvar,
                                     **kw, reduction="none")
        results.append(out.detach())
    assert not results[1].isfinite().any()
    torch.testing.assert_close(results[0].isfinite(), results[1].isfinite())
    torch.testing.assert_close(results[0].isnan(), results[1].isnan())


# ---------------------------------------------------------------------------------------------
# beta, autograd corner cases

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1e-30, 1e30, float("inf"), np.float64(0.25),
                                  fractions.Fraction(1, 3), 2],
                         ids=["0", "1e-30", "1e30", "inf", "np.float64", "Fraction", "int"])
def test_beta_values_accepted(backend, beta):
    """Any real non-negative number. beta = inf gives loss = inf and non-finite KL gradients
    (inf * 0 where the KL gradient vanishes: NaN in the reference, which differentiates the
    unsimplified formula, may be +-inf in a fused backend: only finiteness is compared)."""
    vals = (T(3, 5), P(3, 5), T(3, 4), T(3, 4))
    kw = {"beta": beta, "return_terms": True}
    if beta == float("inf"):
        ours = _run(backend, "elbo_loss", _fresh(vals), kw, 0.37)
        theirs = _run("reference", "elbo_loss", _fresh(vals), kw, 0.37)
        for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
            torch.testing.assert_close(a.isfinite(), b.isfinite())
            torch.testing.assert_close(a[a.isfinite()], b[a.isfinite()])
        assert ours[0][0].item() == float("inf")
        return
    ours = _compare_with_reference(backend, "elbo_loss", vals, kw)
    if beta == 0:
        assert torch.equal(ours[0][0], ours[0][1])  # loss == nll exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_beta_as_a_tensor(backend, dtype, grad):
    """A 0-d floating tensor beta (KL annealing without recompiles) acts as the number; the
    loss keeps the inputs' accumulation dtype; a beta that requires grad gets d loss/d beta
    = kl (or is refused with a TypeError naming beta)."""
    vals = (T(3, 5), P(3, 5), T(3, 4), T(3, 4))
    results = []
    for be in (backend, "reference"):
        beta = torch.tensor(0.3, dtype=dtype, requires_grad=grad)
        args = _fresh(vals)
        try:
            with vae_fast.use_backend(be):
                terms = vae_fast.elbo_loss(*args, beta=beta, return_terms=True)
        except TypeError as e:
            assert grad and "beta" in str(e)
            return
        assert terms.loss.dtype == F32, terms.loss.dtype
        (terms.loss * 0.37).backward()
        results.append([terms.loss.detach(), terms.kl.detach()] + [a.grad for a in args]
                       + ([beta.grad] if grad else []))
    _same(results[0], results[1], rtol=1e-2 if dtype == torch.bfloat16 else 2e-5)
    as_number = float(torch.tensor(0.3, dtype=dtype))
    number = _run("reference", "elbo_loss", _fresh(vals), {"beta": as_number})
    torch.testing.assert_close(results[0][0], number[0][0])
    if grad:
        torch.testing.assert_close(results[0][-1].float(), 0.37 * results[0][1], rtol=1e-2,
                                   atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("gout", [1.0, 0.37])
def test_second_backward_is_right_or_refused(backend, reduction, gout):
    """Two backward passes through one graph: the gradients add up, or a RuntimeError that
    says what happened. Never wrong numbers."""
    x, y, mu, lv = T(3, 7), P(3, 7), T(3, 4), T(3, 4)
    leaves = [_leaf(t) for t in (x, y, mu, lv)]
    with vae_fast.use_backend(backend):
        loss = vae_fast.elbo_loss(*leaves, reduction=reduction)
    g = torch.full_like(loss, gout)
    loss.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    try:
        loss.backward(g)
    except RuntimeError as e:
        assert "backward" in str(e)
        assert all(torch.equal(t.grad, f) for t, f in zip(leaves, first))
        return
    for t, f in zip(leaves, first):
        torch.testing.assert_close(t.grad, 2 * f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_differentiation_is_right_or_refused(backend):
    """create_graph=True (a gradient penalty): the gradient must itself be differentiable and
    right, or the call must raise. A constant gradient would silently drop the penalty's
    second-order term."""
    x0, y0 = T(3, 4), P(3, 4)

    def penalized(be):
        x = _leaf(x0)
        with vae_fast.use_backend(be):
            loss = vae_fast.bernoulli_nll(x, y0)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + (g ** 2).sum()).backward()
        return x.grad

    want = penalized("reference")
    try:
        got = penalized(backend)
    except RuntimeError as e:
        assert "create_graph" in str(e) or "double" in str(e) or "twice" in str(e)
        return
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_term_differentiated(backend):
    """Backward through `kl` alone: the reconstruction inputs get no (or zero) gradient, even
    where their stored gradient is infinite (0 * inf must not become NaN)."""
    x = _leaf(torch.tensor([[0.0, 0.3, 1.0]]))  # probabilities at 0 and 1: d/dtarget = inf
    y = _leaf(torch.tensor([[1.0, 0.5, 0.0]]))
    mu, lv = _leaf(T(1, 2)), _leaf(T(1, 2))
    with vae_fast.use_backend(backend):
        terms = vae_fast.elbo_loss(x, y, mu, lv, likelihood="bernoulli_probs", return_terms=True)
    terms.kl.backward()
    for t in (x, y):
        assert t.grad is None or not t.grad.any(), t.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_is_safe(backend):
    """Under CPU autocast the losses run (in the inputs' dtypes) and match the plain call."""
    args = (T(4, 9), P(4, 9), T(4, 3), T(4, 3))
    with vae_fast.use_backend(backend):
        plain = vae_fast.elbo_loss(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = vae_fast.elbo_loss(*args)
            half = vae_fast.elbo_loss(*(a.bfloat16() for a in args))
    assert auto.dtype == F32 and half.dtype == F32 and half.isfinite()
    torch.testing.assert_close(auto, plain)
