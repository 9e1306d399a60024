"""What "fused" must mean, checked on the Triton path under the interpreter (and, where it
applies, on the C++ path): launches per forward/backward (counted through Triton's own hooks),
no hidden torch compute, memory touched by the backward, determinism, inputs left alone,
repeated backward."""
import pytest
import torch
from triton.runtime.interpreter import InterpreterBuilder

import vae_fast
from vae_fast import reference as R

# aten ops that allocate or re-view memory: everything else in a profile is compute
NO_COMPUTE = {"aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
              "aten::as_strided", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::contiguous",
              "aten::expand", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view",
              "aten::empty_like", "aten::result_type"}


def elbo_inputs(B=4, D=40, Z=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype).requires_grad_()
    y = torch.rand(B, D, generator=g).to(dtype)
    mu = torch.randn(B, Z, generator=g).to(dtype).requires_grad_()
    lv = torch.randn(B, Z, generator=g).to(dtype).requires_grad_()
    return x, y, mu, lv


def aten_compute_ops(fn, monkeypatch):
    """aten compute ops run by fn, less those of the Triton interpreter itself (it copies every
    kernel argument to host storage and back around each launch; a GPU launch does not)."""
    from triton.runtime.interpreter import GridExecutor

    real = GridExecutor.__call__

    def launch(self, *a, **k):
        with torch.profiler.record_function("triton_interpreter_launch"):
            return real(self, *a, **k)

    monkeypatch.setattr(GridExecutor, "__call__", launch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    monkeypatch.setattr(GridExecutor, "__call__", real)

    def in_interpreter(e):
        while e is not None:
            if e.name == "triton_interpreter_launch":
                return True
            e = e.cpu_parent
        return False

    return sorted({e.name for e in prof.events()
                   if e.name.startswith("aten::") and e.name not in NO_COMPUTE and not in_interpreter(e)})


@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
def test_one_fused_launch_forward_one_scale_launch_backward(launches, reduction, monkeypatch):
    x, y, mu, lv = elbo_inputs()
    grad = torch.ones(4) if reduction == "none" else torch.ones(())
    with vae_fast.use_backend("triton"):
        fwd = aten_compute_ops(lambda: launches.setdefault("loss", vae_fast.elbo_loss(x, y, mu, lv, reduction=reduction)), monkeypatch)
        loss = launches.pop("loss")
        assert launches == {"_fused_loss_fwd_kernel": 1, "_finalize_kernel": 1}
        assert fwd == [], f"torch compute in the forward: {fwd}"
        launches.clear()
        bwd = aten_compute_ops(lambda: loss.backward(grad), monkeypatch)
        assert launches == {"_scale_grads_kernel": 1}
        assert bwd == [], f"torch compute in the backward: {bwd}"


def test_elementwise_bce_is_one_launch_each_way(launches):
    x, y = torch.randn(3, 7, requires_grad=True), torch.rand(3, 7)
    with vae_fast.use_backend("triton"):
        out = vae_fast.binary_cross_entropy_with_logits(x, y, reduction="none")
        assert launches == {"_fused_loss_fwd_kernel": 1}
        launches.clear()
        out.backward(torch.rand(3, 7))
        assert launches == {"_scale_grads_kernel": 1}
    torch.testing.assert_close(out, R.binary_cross_entropy_with_logits(x, y, reduction="none"))


class MemoryCounter:
    """Counts element loads and stores the interpreter executes (masked-off lanes excluded)."""

    def __init__(self, monkeypatch):
        self.loads = self.stores = 0
        real_load, real_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        real_sload, real_sstore = InterpreterBuilder.create_load, InterpreterBuilder.create_store
        counter = self

        def masked_load(b, ptrs, mask, *a, **k):
            counter.loads += int(mask.data.sum()) if mask is not None else ptrs.data.size
            return real_load(b, ptrs, mask, *a, **k)

        def masked_store(b, ptrs, value, mask, *a, **k):
            counter.stores += int(mask.data.sum()) if mask is not None else ptrs.data.size
            return real_store(b, ptrs, value, mask, *a, **k)

        def load(b, ptr, *a, **k):
            counter.loads += ptr.data.size
            return real_sload(b, ptr, *a, **k)

        def store(b, ptr, val, *a, **k):
            counter.stores += ptr.data.size
            return real_sstore(b, ptr, val, *a, **k)

        monkeypatch.setattr(InterpreterBuilder, "create_masked_load", masked_load)
        monkeypatch.setattr(InterpreterBuilder, "create_masked_store", masked_store)
        monkeypatch.setattr(InterpreterBuilder, "create_load", load)
        monkeypatch.setattr(InterpreterBuilder, "create_store", store)


def test_traffic_of_a_training_step(monkeypatch):
    """Bernoulli ELBO, grads for x, mu, logvar: the forward reads x, y, mu, logvar once and
    writes their gradients once (plus partial sums); a backward with grad_output 1 reads only
    the coefficient; with grad_output 2 it reads and writes each gradient once."""
    B, D, Z = 4, 200, 8
    x, y, mu, lv = elbo_inputs(B, D, Z)
    N, M = B * D, B * Z
    with vae_fast.use_backend("triton"):
        mem = MemoryCounter(monkeypatch)
        loss = vae_fast.elbo_loss(x, y, mu, lv)
        assert 2 * N + 2 * M <= mem.loads <= 2 * N + 2 * M + 64  # + the partials read by finalize
        assert N + 2 * M <= mem.stores <= N + 2 * M + 64
        mem.loads = mem.stores = 0
        loss.backward()
        assert mem.stores == 0 and mem.loads <= 64  # one coefficient read per program, nothing else
        x2, y2, mu2, lv2 = elbo_inputs(B, D, Z)
        loss = vae_fast.elbo_loss(x2, y2, mu2, lv2)
        mem.loads = mem.stores = 0
        (2 * loss).backward()
        assert mem.stores == N + 2 * M and N + 2 * M <= mem.loads <= N + 2 * M + 64
    torch.testing.assert_close(x2.grad, 2 * x.grad)


def test_none_scales_each_sample_by_its_own_grad_output(backend):
    x, y, mu, lv = elbo_inputs()
    w = torch.tensor([0.0, 1.0, 2.0, -3.0])
    vae_fast.elbo_loss(x, y, mu, lv, reduction="none").backward(w)
    got = [t.grad.clone() for t in (x, mu, lv)]
    for t in (x, mu, lv):
        t.grad = None
    R.elbo_loss(x, y, mu, lv, reduction="none").backward(w)
    for a, t in zip(got, (x, mu, lv)):
        torch.testing.assert_close(a, t.grad)
    assert (got[0][0] == 0).all() and not (got[0][1] == 0).all()


def test_bitwise_deterministic(backend):
    outs = []
    for _ in range(2):
        x, y, mu, lv = elbo_inputs(B=3, D=5000, seed=7)
        t = vae_fast.elbo_loss(x, y, mu, lv, return_terms=True, beta=0.3)
        (t.loss * 1.5).backward()
        outs.append([*t, x.grad, mu.grad, lv.grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_inputs_unchanged_and_gradients_fresh(backend):
    x, y, mu, lv = elbo_inputs()
    before = [t.detach().clone() for t in (x, y, mu, lv)]
    loss = vae_fast.elbo_loss(x, y, mu, lv)
    (loss * 3).backward()
    for t, b in zip((x, y, mu, lv), before):
        assert torch.equal(t.detach(), b)
    assert x.grad.data_ptr() != x.data_ptr()


def test_repeated_backward_with_retain_graph_is_right(backend):
    x, y, mu, lv = elbo_inputs()
    loss = vae_fast.elbo_loss(x, y, mu, lv, beta=0.5)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = x.grad.clone()
    loss.backward(torch.tensor(3.0))  # must see the intact buffers, not the ones scaled by 2
    torch.testing.assert_close(x.grad, first * 2.5)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_grads_of_terms_combine(backend):
    """d/dx of (a*loss + b*nll + c*kl) with loss = nll + beta*kl."""
    x, y, mu, lv = elbo_inputs()
    t = vae_fast.elbo_loss(x, y, mu, lv, beta=0.5, return_terms=True)
    gx, gmu = torch.autograd.grad(2 * t.loss + 3 * t.nll + 5 * t.kl, (x, mu))
    r = R.elbo_loss(x, y, mu, lv, beta=0.5, return_terms=True)
    hx, hmu = torch.autograd.grad(2 * r.loss + 3 * r.nll + 5 * r.kl, (x, mu))
    torch.testing.assert_close(gx, hx)
    torch.testing.assert_close(gmu, hmu)
    only_kl = torch.autograd.grad(vae_fast.elbo_loss(x, y, mu, lv, return_terms=True).kl, (x, mu), allow_unused=True)
    assert only_kl[0] is None or (only_kl[0] == 0).all()


def test_no_grad_computes_no_gradients(backend, launches):
    x, y, mu, lv = elbo_inputs()
    with torch.no_grad():
        loss = vae_fast.elbo_loss(x, y, mu, lv)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, R.elbo_loss(x, y, mu, lv).detach())


def test_channels_last_is_read_in_place(launches, monkeypatch):
    """A conv decoder's channels_last output is walked in memory order: no copy to contiguous
    (no aten compute at all), gradients come back channels_last, numbers as the reference."""
    g = torch.Generator().manual_seed(0)
    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 5, 6, generator=g).contiguous(**cl).requires_grad_()
    y = torch.rand(3, 4, 5, 6, generator=g).contiguous(**cl)
    mu, lv = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    with vae_fast.use_backend("triton"):
        ops = aten_compute_ops(lambda: launches.setdefault("loss", vae_fast.elbo_loss(x, y, mu, lv, reduction="none")), monkeypatch)
        loss = launches.pop("loss")
        assert ops == [] and launches == {"_fused_loss_fwd_kernel": 1, "_finalize_kernel": 1}
        loss.backward(torch.rand(3))
    assert x.grad.is_contiguous(memory_format=torch.channels_last) and not x.grad.is_contiguous()
    want = R.elbo_loss(x, y, mu, lv, reduction="none")
    torch.testing.assert_close(loss, want)
