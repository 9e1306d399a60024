"""vae_fast inside real training steps: torch.compile, torch.autocast, torch.library.opcheck.

- torch.compile(fullgraph=True) of the model forward + `vae_fast.elbo_loss` traces the fused
  custom op as one node (no graph break), and the compiled step gives eager's losses and
  gradients. With `torch._dynamo.config.trace_autograd_ops` the whole step (forward, loss,
  `torch.autograd.grad`, parameter update) is one graph. (`torch.optim` optimizers
  graph-break on purpose inside `step()`, pytorch/pytorch#104053, so the one-graph step
  updates the weights by hand.)
- torch.autocast("cpu", bfloat16): the losses take the bf16 activations autocast produces,
  return float32, and gradients flow; a short training run matches float32. For contrast,
  `F.binary_cross_entropy` raises under CUDA autocast ("unsafe to autocast"); on CPU torch runs
  it in float32. vae_fast's `binary_cross_entropy` / `likelihood="bernoulli_probs"` work in both.
- opcheck of `vae_fast::fused_loss` and `vae_fast::fused_fwd` on representative argument sets.

Compilation is slow on CPU: each test here compiles at most one function.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import vae_fast
from vae_fast import _backend, ops
from vae_fast._enums import Api, Backend, Likelihood, Reduction

from conftest import require_backend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import mnist_mlp_vae  # noqa: E402

FUSED_OP = torch.ops.vae_fast.fused_loss.default


@pytest.fixture(params=["triton", "cpu", "reference"])
def any_backend(request):
    """Every backend, the reference included, forced."""
    require_backend(request.param)
    with vae_fast.use_backend(request.param):
        yield request.param


class TinyVAE(nn.Module):
    """64 inputs -> (mu, logvar) of 8 -> 64 outputs. "gaussian": the outputs are the means of
    (B, 4, 4, 4) images and a learned per-channel (4, 1, 1) log-variance; "gaussian_pixel":
    a second head predicts a log-variance per pixel."""

    def __init__(self, likelihood="bernoulli"):
        super().__init__()
        self.likelihood = likelihood
        self.enc = nn.Linear(64, 32)
        self.to_latent = nn.Linear(32, 16)
        self.dec = nn.Linear(8, 32)
        self.out = nn.Linear(32, 128 if likelihood == "gaussian_pixel" else 64)
        self.recon_logvar = nn.Parameter(torch.full((4, 1, 1), -0.5)) if likelihood == "gaussian" else None

    def forward(self, x, eps):
        mu, logvar = self.to_latent(torch.relu(self.enc(x))).chunk(2, dim=1)
        h = self.out(torch.relu(self.dec(mu + eps * torch.exp(0.5 * logvar))))
        if self.likelihood == "bernoulli_probs":
            h = torch.sigmoid(h)
        return h, mu, logvar

    def loss(self, x, eps):
        recon, mu, logvar = self(x, eps)
        if self.likelihood == "gaussian":
            return vae_fast.elbo_loss(recon.view(-1, 4, 4, 4), x.view(-1, 4, 4, 4), mu, logvar,
                                      likelihood="gaussian", recon_logvar=self.recon_logvar,
                                      return_terms=True)
        if self.likelihood == "gaussian_pixel":
            mean, rlv = recon.chunk(2, dim=1)
            return vae_fast.elbo_loss(mean, x, mu, logvar, likelihood="gaussian", recon_logvar=rlv,
                                      return_terms=True)
        return vae_fast.elbo_loss(recon, x, mu, logvar, likelihood=self.likelihood, return_terms=True)


def _batches(n, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 64, generator=g), torch.randn(batch, 8, generator=g)) for _ in range(n)]


def _recording_inductor(graphs):
    """Inductor, keeping each Dynamo graph it is given (to look for the fused op in it)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def _fused_nodes(graphs):
    return [n for g in graphs for n in g.graph.nodes if n.target is FUSED_OP]


# ---- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_compiled_forward_and_loss_match_eager(backend, likelihood):
    """The usual recipe: compile forward + loss (fullgraph), then loss.backward() runs the
    compiled backward and Adam steps eagerly. Three steps, same losses and gradients."""
    torch.manual_seed(0)
    eager = TinyVAE(likelihood)
    compiled = copy.deepcopy(eager)
    graphs = []
    counter = CompileCounterWithBackend(_recording_inductor(graphs))
    step = torch.compile(compiled.loss, backend=counter, fullgraph=True)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2)
    opt_c = torch.optim.Adam(compiled.parameters(), lr=1e-2)
    for x, eps in _batches(3):
        out_e, out_c = eager.loss(x, eps), step(x, eps)
        for name in ("loss", "nll", "kl"):
            torch.testing.assert_close(getattr(out_c, name), getattr(out_e, name), rtol=1e-5, atol=1e-5)
        for opt, out in ((opt_e, out_e), (opt_c, out_c)):
            opt.zero_grad()
            out.loss.backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            assert pc.grad is not None, name
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        opt_e.step()
        opt_c.step()
    assert counter.frame_count == 1  # one graph: no break, no recompilation
    nodes = _fused_nodes(graphs)
    assert len(nodes) == 1 and nodes[0].args[-1] == BACKEND_CODES[backend]


def test_whole_training_step_is_one_graph(backend):
    """forward, elbo_loss, backward and the weight update traced as one graph.

    The backward is `torch.autograd.grad`: with `loss.backward()` and `p.grad = None` in the
    graph, torch 2.13's trace_autograd_ops gives wrong updates from the second step on even
    for plain PyTorch losses (not a vae_fast matter)."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace autograd in a graph")

    def train_step(model, x, eps, lr: float = 0.05):
        out = model.loss(x, eps)
        params = list(model.parameters())
        grads = torch.autograd.grad(out.loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
        return out.loss.detach()

    torch.manual_seed(0)
    eager = TinyVAE("gaussian")
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(train_step, backend=counter, fullgraph=True)
        for x, eps in _batches(4):
            torch.testing.assert_close(step(compiled, x, eps), train_step(eager, x, eps), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_graph_follows_use_backend():
    """Switching the backend after compiling recompiles for the new one (Dynamo guards on the
    backend choice) instead of silently running the backend the graph was traced with."""
    torch.manual_seed(0)
    model = TinyVAE("bernoulli")
    graphs = []
    counter = CompileCounterWithBackend(lambda gm, inputs: graphs.append(gm) or gm.forward)
    step = torch.compile(model.loss, backend=counter, fullgraph=True)
    x, eps = _batches(1)[0]
    names = ["triton"] + ["cpu"] * (_backend.cpu_extension()[0] is not None)
    for name in names + ["reference"]:
        with vae_fast.use_backend(name):
            step(x, eps).loss.backward()
    assert counter.frame_count == len(names) + 1
    assert [n.args[-1] for n in _fused_nodes(graphs)] == [BACKEND_CODES[n] for n in names]
    assert not [n for n in graphs[-1].graph.nodes if n.target is FUSED_OP]  # reference: plain torch


def test_example_compile_flag_matches_eager(backend):
    """`examples/mnist_mlp_vae.py --compile` trains exactly like the eager run."""
    kw = dict(loss="vae_fast", epochs=1, limit=120, batch_size=16, progress=False, log=lambda s: None)
    _, eager = mnist_mlp_vae.train(**kw)
    _, compiled = mnist_mlp_vae.train(compile=True, **kw)
    torch.testing.assert_close(torch.tensor(compiled.step_loss), torch.tensor(eager.step_loss),
                               rtol=1e-5, atol=1e-5)


def test_first_call_of_a_fresh_process_may_be_compiled(tmp_path):
    """In a fresh process the first vae_fast call may happen while torch.compile traces (the
    default "auto" backend then picks the C++ kernels for CPU tensors): no graph break."""
    require_backend("cpu")
    code = (
        "import torch, vae_fast\n"
        "x, y = torch.randn(4, 8, requires_grad=True), torch.rand(4, 8)\n"
        "f = torch.compile(lambda x, y: vae_fast.bernoulli_nll(x, y), fullgraph=True, backend='eager')\n"
        "f(x, y).backward()\n"
        "print('ok', float(x.grad.abs().sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VAE_FAST_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


# ---- opcheck -----------------------------------------------------------------------------------

def _leaf(*shape, low=None):
    t = torch.randn(*shape) if low is None else torch.rand(*shape) * (1 - 2 * low) + low
    return t.requires_grad_()


BACKEND_CODES = {"cpu": int(Backend.CPU), "triton": int(Backend.TRITON)}


def _op_args(kind, *, reduction=Reduction.BATCHMEAN, full=True, beta=1.0, backend, **tensors):
    """Positional arguments of vae_fast::fused_loss, laid out by its schema (tensor slots not
    given are None; numeric constants 0; the raw api)."""
    values = dict(kind=int(kind), reduction=int(reduction), full=full, beta=beta, api=int(Api.RAW),
                  backend=BACKEND_CODES[backend], rlv_c=0.0, lv_c=0.0, pmu_c=0.0, plv_c=0.0, **tensors)
    schema = torch.ops.vae_fast.fused_loss.default._schema
    return tuple(values.get(a.name) for a in schema.arguments)


L = Likelihood
OP_CASES = {
    "bernoulli-logits": lambda b: _op_args(
        L.BERNOULLI, x=_leaf(4, 16), y=torch.rand(4, 16), mu=_leaf(4, 3), lv=_leaf(4, 3), backend=b),
    "bernoulli-probs-sum": lambda b: _op_args(
        L.BERNOULLI_PROBS, x=_leaf(4, 16, low=0.05), y=torch.rand(4, 16), mu=_leaf(4, 3),
        lv=_leaf(4, 3), reduction=Reduction.SUM, beta=0.5, backend=b),
    "gaussian-tensor-logvar": lambda b: _op_args(
        L.GAUSSIAN, x=_leaf(4, 2, 3, 3), y=_leaf(4, 2, 3, 3), rlv=_leaf(2, 1, 1), mu=_leaf(4, 3),
        lv=_leaf(4, 3), backend=b),
    "continuous-bernoulli": lambda b: _op_args(
        L.CONTINUOUS_BERNOULLI, x=_leaf(4, 16), y=_leaf(4, 16, low=0.05), mu=_leaf(4, 3),
        lv=_leaf(4, 3), backend=b),
    "kl-learned-prior": lambda b: _op_args(
        L.NONE, mu=_leaf(4, 5), lv=_leaf(4, 5), pmu=_leaf(5), plv=_leaf(5), backend=b),
    "elbo-reduction-none": lambda b: _op_args(
        L.BERNOULLI, x=_leaf(4, 16), y=torch.rand(4, 16), mu=_leaf(4, 3), lv=_leaf(4, 3),
        reduction=Reduction.PER_SAMPLE, backend=b),
    "bce-elementwise": lambda b: _op_args(  # the drop-in BCE's reduction="none"
        L.BERNOULLI, x=_leaf(4, 16), y=torch.rand(4, 16), w=_leaf(16), pw=_leaf(4, 1),
        reduction=Reduction.ELEMENTWISE, full=False, backend=b),
    "elbo-tensor-beta": lambda b: _op_args(  # KL annealing with a 0-d tensor beta
        L.BERNOULLI, x=_leaf(4, 16), y=torch.rand(4, 16), mu=_leaf(4, 3), lv=_leaf(4, 3),
        beta_t=torch.tensor(0.3, requires_grad=True), backend=b),
    "channels-last-fp16": lambda b: _op_args(
        L.GAUSSIAN, x=_leaf(2, 3, 4, 4).half().contiguous(memory_format=torch.channels_last),
        y=torch.rand(2, 3, 4, 4).half().contiguous(memory_format=torch.channels_last),
        mu=_leaf(2, 5), lv=_leaf(2, 5), reduction=Reduction.PER_SAMPLE, backend=b),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_opcheck_fused_loss(backend, case):
    torch.manual_seed(0)
    torch.library.opcheck(ops.fused_loss, OP_CASES[case](backend))


@pytest.mark.parametrize("case", list(OP_CASES))
def test_opcheck_fused_fwd(backend, case):
    """The pass itself, writing the gradients of every input that required grad above. Its
    outputs are gradients, not differentiable (differentiating them raises, see
    tests/test_ops.py), so its inputs are given here without requires_grad."""
    torch.manual_seed(0)
    args = OP_CASES[case](backend)
    needs = sum(1 << i for i, t in enumerate(args[:10]) if isinstance(t, torch.Tensor) and t.requires_grad
                and i < 9)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.fused_fwd, args + (needs,))


# ---- torch.autocast ----------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "bernoulli_probs", "gaussian", "gaussian_pixel"])
def test_losses_take_autocast_bf16(any_backend, likelihood):
    """bf16 activations from Linear layers under autocast: float32 losses, gradients for every
    weight, close to the float32 run."""
    torch.manual_seed(0)
    model = TinyVAE(likelihood)
    x, eps = _batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, mu, logvar = model(x, eps)
        assert recon.dtype == mu.dtype == logvar.dtype == torch.bfloat16
        out = model.loss(x, eps)
    assert out.loss.dtype == out.nll.dtype == out.kl.dtype == torch.float32
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model.loss(x, eps)  # float32
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for name, p in model.named_parameters():
        g = grads[name]
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        cos = F.cosine_similarity(g.flatten(), p.grad.flatten(), dim=0)
        assert cos > 0.98, (name, cos)


def test_bce_under_cpu_autocast(any_backend):
    """torch on CPU runs F.binary_cross_entropy in float32 under autocast (on CUDA it raises,
    see test_bce_under_cuda_autocast); the vae_fast drop-ins give the same numbers."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    x, y = torch.randn(8, 16), torch.rand(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        probs = torch.sigmoid(logits)
        assert probs.dtype == torch.bfloat16
        expected = [F.binary_cross_entropy(probs, y), F.binary_cross_entropy_with_logits(logits, y)]
        got = [vae_fast.binary_cross_entropy(probs, y), vae_fast.BCELoss()(probs, y),
               vae_fast.binary_cross_entropy_with_logits(logits, y)]
    assert all(t.dtype == torch.float32 for t in expected + got)
    for ours, theirs in zip(got, [expected[0], expected[0], expected[1]]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        (g_ours,) = torch.autograd.grad(ours, lin.weight, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(theirs, lin.weight, retain_graph=True)
        # both gradients pass through the bf16 sigmoid/Linear backward: bf16 rounding apart
        torch.testing.assert_close(g_ours, g_theirs, rtol=2e-2, atol=1e-2 * g_theirs.abs().max().item())


@pytest.mark.gpu_required
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bce_under_cuda_autocast():
    lin = nn.Linear(16, 16).cuda()
    x, y = torch.randn(8, 16, device="cuda"), torch.rand(8, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        probs = torch.sigmoid(lin(x))
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(probs, y)
        loss = vae_fast.binary_cross_entropy(probs, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_training_under_autocast_matches_fp32(backend):
    """`examples/mnist_mlp_vae.py --amp`: bf16 autocast tracks the float32 run closely."""
    kw = dict(loss="vae_fast", epochs=2, limit=120, batch_size=16, progress=False, log=lambda s: None)
    _, fp32 = mnist_mlp_vae.train(**kw)
    _, amp = mnist_mlp_vae.train(amp=True, **kw)
    torch.testing.assert_close(torch.tensor(amp.step_loss), torch.tensor(fp32.step_loss), rtol=1e-2, atol=1e-2)
    for a, f in zip(amp.epochs, fp32.epochs):
        assert a["recon"] == pytest.approx(f["recon"], rel=1e-2)
        assert a["kl"] == pytest.approx(f["kl"], rel=5e-2, abs=1e-2)
