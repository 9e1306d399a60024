"""The public surface: the canonical PyTorch VAE example swapped to vae_fast, modules, drop-in
BCE modules, backend choice, and the errors of docs/design.md (the full adversarial matrix is in
test_adversarial.py)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vae_fast
from vae_fast import reference as R


class CanonicalVAE(nn.Module):
    """The VAE of the PyTorch examples repository (MNIST, 784-400-20)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x, eps, logits=False):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + eps * torch.exp(0.5 * logvar)
        out = self.fc4(F.relu(self.fc3(z)))
        return (out if logits else torch.sigmoid(out)), mu, logvar


def canonical_loss(recon_x, x, mu, logvar):  # verbatim from the example
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


@pytest.mark.parametrize("decoder", ("probs", "logits"))
def test_canonical_vae_example_same_loss_and_gradients(backend, decoder):
    torch.manual_seed(0)
    model = CanonicalVAE()
    x = torch.rand(16, 1, 28, 28)
    eps = torch.randn(16, 20)

    def grads(loss_fn):
        model.zero_grad()
        recon, mu, logvar = model(x, eps, logits=decoder == "logits")
        loss = loss_fn(recon, mu, logvar)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    if decoder == "probs":
        before = lambda r, m, lv: canonical_loss(r, x, m, lv)  # noqa: E731
        after = lambda r, m, lv: vae_fast.elbo_loss(  # noqa: E731
            r, x.view(-1, 784), m, lv, likelihood="bernoulli_probs", reduction="sum")
    else:
        before = lambda r, m, lv: (F.binary_cross_entropy_with_logits(r, x.view(-1, 784), reduction="sum")  # noqa: E731
                                   - 0.5 * torch.sum(1 + lv - m.pow(2) - lv.exp()))
        after = lambda r, m, lv: vae_fast.elbo_loss(r, x.view(-1, 784), m, lv, reduction="sum")  # noqa: E731
    want, want_g = grads(before)
    got, got_g = grads(after)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_modules_match_functions(backend):
    x, y = torch.randn(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    mu, lv = torch.randn(3, 5), torch.randn(3, 5)
    prior_mu = nn.Parameter(torch.zeros(5))
    loss = vae_fast.ELBOLoss(beta=0.5, prior_mu=prior_mu, return_terms=True)
    assert any(p is prior_mu for p in loss.parameters())  # a learned prior is a module parameter
    torch.testing.assert_close(tuple(loss(x, y, mu, lv)),
                               tuple(R.elbo_loss(x, y, mu, lv, beta=0.5, prior_mu=prior_mu, return_terms=True)))
    lvar = torch.randn(2, 1, 1)
    torch.testing.assert_close(vae_fast.GaussianNLLLoss(reduction="sum")(x, y, lvar),
                               R.gaussian_nll(x, y, lvar, reduction="sum"))
    torch.testing.assert_close(vae_fast.BernoulliNLLLoss()(x, y), R.bernoulli_nll(x, y))
    torch.testing.assert_close(vae_fast.GaussianKLLoss(reduction="none")(mu, lv), R.gaussian_kl(mu, lv, reduction="none"))
    torch.testing.assert_close(vae_fast.ELBOLoss(likelihood="gaussian", recon_logvar=0.3)(x, y, mu, lv),
                               R.elbo_loss(x, y, mu, lv, likelihood="gaussian", recon_logvar=0.3))


def test_drop_in_bce_modules_subclass_torch(backend):
    w, pw = torch.rand(6), torch.rand(6) * 2
    ours = vae_fast.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    assert isinstance(ours, nn.BCEWithLogitsLoss)
    assert isinstance(vae_fast.BCELoss(), nn.BCELoss)
    x, y = torch.randn(4, 6), torch.rand(4, 6)
    torch.testing.assert_close(ours(x, y), nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")(x, y))
    p = torch.rand(4, 6)
    torch.testing.assert_close(vae_fast.BCELoss(weight=w)(p, y), nn.BCELoss(weight=w)(p, y))
    # torch's state_dict layout is kept, so a checkpoint of the torch module loads
    w2 = torch.rand(6)
    ours.load_state_dict(nn.BCEWithLogitsLoss(weight=w2, pos_weight=pw).state_dict())
    torch.testing.assert_close(ours.weight, w2)


def test_backend_selection_context_and_env(monkeypatch):
    from vae_fast import _backend

    assert _backend.current() == os.environ.get("VAE_FAST_BACKEND", "auto")
    with vae_fast.use_backend("reference"):
        assert _backend.resolve(torch.device("cpu")) == "reference"
        with vae_fast.use_backend("triton"):
            assert _backend.resolve(torch.device("cpu")) == "triton"
        assert _backend.current() == "reference"
    monkeypatch.setenv("VAE_FAST_BACKEND", "reference")
    assert _backend.current() == "reference"
    monkeypatch.setenv("VAE_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match=r"\$VAE_FAST_BACKEND \(the vae_fast backend\) must be one of"):
        _backend.current()
    with pytest.raises(ValueError, match="backend must be one of"):
        with vae_fast.use_backend("fast"):
            pass


def test_forced_backend_never_falls_back():
    x, y = torch.randn(2, 3, device="meta"), torch.rand(2, 3, device="meta")
    for name in ("triton", "cpu"):
        with vae_fast.use_backend(name), pytest.raises(NotImplementedError, match=f"the {name} backend cannot run on meta"):
            vae_fast.bernoulli_nll(x, y)


def test_forced_triton_on_cpu_without_interpreter_raises():
    code = ("import torch, vae_fast\n"
            "with vae_fast.use_backend('triton'):\n"
            "    try:\n"
            "        vae_fast.bernoulli_nll(torch.randn(2, 3), torch.rand(2, 3))\n"
            "    except NotImplementedError as e:\n"
            "        print('raised:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "raised: vae_fast: the triton backend cannot run on cpu (set TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.parametrize("call,error,words", [
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y[:, :3], m, v), ValueError, "target must have the shape of recon"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m[:1], v[:1]), ValueError, "batch size of recon"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v[:, :2]), ValueError, "logvar of shape (2, 2) does not broadcast"),
    (lambda x, y, m, v: vae_fast.bernoulli_nll(x[0, 0], y[0, 0]), ValueError, "logits must have a batch dimension"),
    (lambda x, y, m, v: vae_fast.bernoulli_nll(x.long(), y), TypeError, "logits must be a floating point tensor"),
    (lambda x, y, m, v: vae_fast.bernoulli_nll(x.to(torch.complex64), y), TypeError, "logits must be a floating point"),
    (lambda x, y, m, v: vae_fast.gaussian_nll(x, y > 0), TypeError, "target must be a floating point tensor"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, reduction="mean"), ValueError, "reduction must be one of"),
    (lambda x, y, m, v: vae_fast.bernoulli_nll(x, y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, likelihood="poisson"), ValueError, "likelihood must be one of"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, beta=-1), ValueError, "beta must be a non-negative"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, beta="1"), TypeError, "beta must be a real Python number"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, beta=torch.ones(2)), TypeError, "beta must be a number or a 0-d floating tensor"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m, v, recon_logvar=v), ValueError, "recon_logvar is only used"),
    (lambda x, y, m, v: vae_fast.elbo_loss(x, y, m.to("meta"), v), ValueError, "all tensors must be on one device"),
])
def test_bad_input_raises_before_any_kernel(launches, call, error, words):
    x, y = torch.randn(2, 4), torch.rand(2, 4)
    m, v = torch.randn(2, 3), torch.randn(2, 3)
    with vae_fast.use_backend("triton"), pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(x, y, m, v)
    assert launches == {}


def test_bool_targets(backend):
    x, y = torch.randn(3, 10), torch.rand(3, 10) > 0.5
    torch.testing.assert_close(vae_fast.bernoulli_nll(x, y), R.bernoulli_nll(x, y.float()))
    torch.testing.assert_close(vae_fast.binary_cross_entropy_with_logits(x, y),
                               F.binary_cross_entropy_with_logits(x, y.float()))


def test_tensor_beta_anneals_without_recompiling(backend):
    compiles = []

    def count(gm, example_inputs):
        compiles.append(1)
        return gm

    x, y = torch.randn(4, 10, requires_grad=True), torch.rand(4, 10)
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    step = torch.compile(lambda b: vae_fast.elbo_loss(x, y, mu, lv, beta=b), fullgraph=True, backend=count)
    for beta in (0.0, 0.25, 0.5, 1.0):
        got = step(torch.tensor(beta))
        torch.testing.assert_close(got, R.elbo_loss(x, y, mu, lv, beta=beta))
    assert len(compiles) == 1


def test_modules_show_their_settings():
    s = nn.Parameter(torch.zeros(3, 1, 1))
    assert repr(vae_fast.ELBOLoss(likelihood="gaussian", recon_logvar=s, beta=0.5)) == (
        "ELBOLoss(likelihood='gaussian', recon_logvar=tensor of shape (3, 1, 1), beta=0.5, "
        "reduction='batchmean')")
    assert repr(vae_fast.ELBOLoss()) == "ELBOLoss(likelihood='bernoulli', reduction='batchmean')"
    assert repr(vae_fast.GaussianNLLLoss(full=False)) == "GaussianNLLLoss(full=False, reduction='batchmean')"
    assert repr(vae_fast.GaussianKLLoss(prior_mu=torch.zeros(4), reduction="none")) == (
        "GaussianKLLoss(prior_mu=tensor of shape (4,), reduction='none')")
    assert repr(vae_fast.BernoulliNLLLoss(reduction="sum")) == "BernoulliNLLLoss(reduction='sum')"
