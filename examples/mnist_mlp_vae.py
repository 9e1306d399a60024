"""The classic MLP VAE (the 784-400-20 model of PyTorch's examples/vae) with a Bernoulli
decoder, trained on scikit-learn's 8x8 handwritten digits (1797 images, 64 pixels in [0, 1];
shipped with scikit-learn, nothing is downloaded).

    python examples/mnist_mlp_vae.py --loss reference          # the plain PyTorch loss
    python examples/mnist_mlp_vae.py --loss vae_fast           # the fused vae_fast.elbo_loss
    python examples/mnist_mlp_vae.py --decoder probs --save out/digits

The swap is one function: `reference_loss` below is what VAE code writes today,
`vae_fast_loss` the fused drop-in. `--decoder probs` ends the decoder in a sigmoid and uses
`F.binary_cross_entropy`, exactly like the PyTorch example; vae_fast's twin for it is
`likelihood="bernoulli_probs"`. (With `--amp` on CUDA, torch refuses `F.binary_cross_entropy`
under autocast, so `--decoder probs --loss reference --amp` fails there; the vae_fast loss and
the logits decoder run under autocast everywhere.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _train_loop as loop  # noqa: E402

import vae_fast  # noqa: E402


class MLPVAE(nn.Module):
    """x -> 400 -> (mu, logvar) of 20 -> 400 -> logits (or probabilities) of every pixel."""

    def __init__(self, pixels: int = 64, hidden: int = 400, latent: int = 20, probs: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, pixels)
        self.probs = probs

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):
        out = self.fc4(F.relu(self.fc3(z)))
        return torch.sigmoid(out) if self.probs else out

    def forward(self, x, eps):
        mu, logvar = self.encode(x)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation; eps ~ N(0, I) from the loop
        return self.decode(z), mu, logvar


# ---- the loss: before (plain PyTorch) and after (vae_fast) -------------------------------------

def reference_loss(out, x):
    """Negative ELBO per example, as VAE code writes it today."""
    logits, mu, logvar = out
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kl, recon, kl


def vae_fast_loss(out, x):
    """The same negative ELBO in one fused call; `return_terms` also gives both terms."""
    logits, mu, logvar = out
    return vae_fast.elbo_loss(logits, x, mu, logvar, return_terms=True)


def reference_loss_probs(out, x):
    """PyTorch's examples/vae loss: a sigmoid decoder and F.binary_cross_entropy."""
    probs, mu, logvar = out
    recon = F.binary_cross_entropy(probs, x, reduction="sum") / x.shape[0]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kl, recon, kl


def vae_fast_loss_probs(out, x):
    probs, mu, logvar = out
    return vae_fast.elbo_loss(probs, x, mu, logvar, likelihood="bernoulli_probs", return_terms=True)


LOSSES = {
    ("reference", "logits"): reference_loss,
    ("vae_fast", "logits"): vae_fast_loss,
    ("reference", "probs"): reference_loss_probs,
    ("vae_fast", "probs"): vae_fast_loss_probs,
}


def load_digits() -> torch.Tensor:
    """(1797, 64) float32 in [0, 1]: scikit-learn's bundled 8x8 digits (values 0..16)."""
    from sklearn.datasets import load_digits as sk_load_digits

    return torch.tensor(sk_load_digits().data / 16.0, dtype=torch.float32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    loop.add_common_args(p, epochs=30, batch_size=128, lr=1e-3)
    p.add_argument("--decoder", choices=("logits", "probs"), default="logits",
                   help="decoder output: logits (BCE with logits) or sigmoid probabilities (BCE)")
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--latent", type=int, default=20)
    return p.parse_args(argv)


def train(*, loss="vae_fast", decoder="logits", backend=None, epochs=30, batch_size=128, lr=1e-3,
          hidden=400, latent=20, limit=None, compile=False, amp=False, dtype="float32",
          device="cpu", seed=0, save=None, progress=True, log=print):
    """Train the MLP VAE; returns (model, History). Same seed -> same data, init and noise."""
    torch.manual_seed(seed)
    train_x, test_x = loop.split(load_digits(), limit=limit, seed=seed)
    model = MLPVAE(train_x.shape[1], hidden, latent, probs=decoder == "probs")
    with loop.backend_scope(backend):
        hist = loop.fit(model, LOSSES[(loss, decoder)], train_x, test_x, latent=latent,
                        epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                        compile=compile, amp=amp, dtype=dtype, progress=progress, log=log,
                        name=loss)
    if save:
        _save(save, model, test_x, hist, latent, title=f"MLP VAE on 8x8 digits, loss={loss}")
    return model, hist


@torch.no_grad()
def _save(directory, model, test_x, hist, latent, title):
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    x = test_x[:10].to(device, dtype)
    out, _, _ = model(x, x.new_zeros(len(x), latent))  # decode the posterior mean
    recon = out if model.probs else torch.sigmoid(out)
    z = torch.randn(10, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    samples = model.decode(z)
    samples = samples if model.probs else torch.sigmoid(samples)
    to_img = lambda t: t.float().reshape(-1, 8, 8).cpu().numpy()  # noqa: E731
    rows = [("test images", to_img(x)), ("reconstructions", to_img(recon)),
            ("samples z ~ N(0, I)", to_img(samples))]
    loop.save_figures(directory, hist, rows, title=title)


def main(argv=None):
    args = parse_args(argv)
    print(f"MLP VAE on 8x8 digits: {loop.describe(args)} decoder={args.decoder}", flush=True)
    _, hist = train(**vars(args))
    loop.report_done(hist, args.save)


if __name__ == "__main__":
    main()
