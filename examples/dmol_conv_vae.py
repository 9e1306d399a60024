"""A small convolutional VAE with a discretized logistic mixture decoder (PixelCNN++'s
likelihood, as in VDVAE and NVAE), trained on random 32x32 crops of scikit-image's bundled 8-bit
colour photographs (astronaut, coffee, chelsea, rocket, hubble_deep_field,
immunohistochemistry; nothing is downloaded), reporting bits per dimension.

    python examples/dmol_conv_vae.py
    python examples/dmol_conv_vae.py --steps 2000 --mixtures 10 --save out/dmol
    python examples/dmol_conv_vae.py --fast --save out/dmol-fast      # a few seconds

The decoder outputs 10 M channels per pixel: M mixture logits, then per colour channel M means,
M log-scales and M coefficients (PixelCNN++'s order, channel dim 1). The loss is one call:

    vae_fast.elbo_loss(params, x, mu, logvar, likelihood="discretized_logistic_mixture",
                       num_bins=256, return_terms=True)

with x the 8-bit image on the bin centres in [-1, 1] (k / 127.5 - 1). Bits per dimension is the
negative ELBO per image divided by (3 * H * W * ln 2). `--save DIR` writes samples.png (test
crops, reconstructions and prior samples, each drawn from the mixture as PixelCNN++'s
`sample_from_discretized_mix_logistic`), bpd_curve.png and history.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _train_loop as loop  # noqa: E402

import vae_fast  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
FAST = dict(steps=30, batch_size=8, patch=16, crops=96, mixtures=3, latent=16, lr=3e-3)


class DMOLConvVAE(nn.Module):
    """Three stride-2 convolutions down to (128, P/8, P/8), a linear map to (mu, logvar), and the
    mirror image up to the 10 M mixture parameters per pixel."""

    def __init__(self, patch: int = 32, latent: int = 64, mixtures: int = 5):
        super().__init__()
        if patch % 8:
            raise ValueError(f"--patch must be a multiple of 8, got {patch}")
        self.side, self.mixtures = patch // 8, mixtures
        flat = 128 * self.side ** 2
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        )
        self.to_latent = nn.Linear(flat, 2 * latent)
        self.from_latent = nn.Linear(latent, flat)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 10 * mixtures, 1),  # the mixture parameters, per pixel
        )

    def decode(self, z):
        return self.decoder(self.from_latent(z).view(len(z), 128, self.side, self.side))

    def forward(self, x, eps):
        mu, logvar = self.to_latent(self.encoder(x)).chunk(2, dim=1)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def loss_terms(out, x):
    """(negative ELBO, NLL, KL), nats per image: one fused call."""
    params, mu, logvar = out
    return vae_fast.elbo_loss(params, x, mu, logvar, likelihood="discretized_logistic_mixture",
                              num_bins=256, return_terms=True)


def bits_per_dim(nats_per_image, x) -> float:
    return float(nats_per_image) / (x[0].numel() * math.log(2))


@torch.no_grad()
def sample_from_dmol(params: torch.Tensor, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] drawn from the mixture, as PixelCNN++'s
    `sample_from_discretized_mix_logistic`: a component per pixel by the Gumbel-max trick on the
    logits, a logistic sample of each channel, the coupling of green to red and blue to red and
    green, each clamped to [-1, 1]."""
    b, p, h, w = params.shape
    m = p // 10
    l = params.permute(0, 2, 3, 1)  # (B, H, W, 10 M)
    logits = l[..., :m]
    rest = l[..., m:].reshape(b, h, w, 3, 3 * m)
    uniform = lambda *shape: torch.rand(*shape, generator=generator, dtype=l.dtype).to(l.device) * (1 - 2e-5) + 1e-5  # noqa: E731
    k = (logits - torch.log(-torch.log(uniform(b, h, w, m)))).argmax(-1)  # (B, H, W)
    pick = lambda t: torch.gather(t, -1, k[..., None, None].expand(b, h, w, 3, 1))[..., 0]  # noqa: E731
    means = pick(rest[..., :m])
    log_scales = pick(rest[..., m:2 * m]).clamp_min(-7.0)
    coeffs = pick(torch.tanh(rest[..., 2 * m:]))
    u = uniform(b, h, w, 3)
    x = means + torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))
    x0 = x[..., 0].clamp(-1, 1)
    x1 = (x[..., 1] + coeffs[..., 0] * x0).clamp(-1, 1)
    x2 = (x[..., 2] + coeffs[..., 1] * x0 + coeffs[..., 2] * x1).clamp(-1, 1)
    return torch.stack((x0, x1, x2), 1)


@functools.lru_cache(maxsize=None)
def _image(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    assert img.dtype == np.uint8 and img.ndim == 3, (name, img.dtype, img.shape)
    img = img[..., :3]
    img.flags.writeable = False
    return img


def load_crops(n: int, patch: int = 32, seed: int = 0, images=IMAGES) -> torch.Tensor:
    """n random patch x patch crops of the photographs (the same for one seed), as 8-bit values
    on the bin centres in [-1, 1]: (n, 3, patch, patch) float32 `k / 127.5 - 1`."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, patch, patch, 3), dtype=np.uint8)
    for i in range(n):
        img = _image(images[i % len(images)])
        r, c = rng.integers(0, img.shape[0] - patch + 1), rng.integers(0, img.shape[1] - patch + 1)
        out[i] = img[r:r + patch, c:c + patch]
    return torch.from_numpy(out).permute(0, 3, 1, 2).double().div(127.5).sub(1.0).float().contiguous()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mixtures", type=int, default=5, help="logistic components M per pixel")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--patch", type=int, default=32, help="crop side (a multiple of 8)")
    p.add_argument("--crops", type=int, default=4096, help="random crops drawn once (10%% held out)")
    p.add_argument("--fast", action="store_true",
                   help="a few-second smoke run: " + ", ".join(f"{k}={v}" for k, v in FAST.items())
                        + " (unless given)")
    p.add_argument("--backend", choices=loop.BACKENDS, default=None,
                   help="vae_fast backend (default: $VAE_FAST_BACKEND or auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", default=None,
                   help="write samples.png, bpd_curve.png and history.json here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.fast:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for k, v in FAST.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    return args


def train(*, steps=600, batch_size=32, lr=2e-3, mixtures=5, latent=64, patch=32, crops=4096,
          backend=None, device="cpu", seed=0, save=None, progress=True, log=print, fast=False):
    """Train; returns (model, history dict with per-step bpd and nll/kl bpd, the test bpd)."""
    torch.manual_seed(seed)
    data = load_crops(crops, patch, seed)
    n_test = max(batch_size, len(data) // 10) if len(data) > 2 * batch_size else 1
    train_x, test_x = data[n_test:].to(device), data[:n_test].to(device)
    model = DMOLConvVAE(patch, latent, mixtures).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = dict(step_bpd=[], step_nll_bpd=[], step_kl_bpd=[], seconds=0.0)
    terms = []
    with loop.backend_scope(backend):
        start = time.perf_counter()
        bar = tqdm(range(steps), desc="dmol VAE", disable=not progress, dynamic_ncols=True)
        for step in bar:
            idx = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), device=device)
            x = train_x[idx]
            eps = torch.randn(len(x), latent, device=device)
            loss, nll, kl = loss_terms(model(x, eps), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            terms.append(torch.stack([loss.detach(), nll.detach(), kl.detach()]))
            if progress and step % 10 == 0:
                bar.set_postfix(bpd=f"{bits_per_dim(loss, x):.3f}")
        bar.close()
        hist["seconds"] = time.perf_counter() - start
        per_dim = x[0].numel() * math.log(2)
        t = (torch.stack(terms).double().cpu() / per_dim) if terms else torch.zeros(0, 3)
        hist["step_bpd"], hist["step_nll_bpd"], hist["step_kl_bpd"] = (t[:, i].tolist() for i in range(3))
        hist["test_bpd"] = evaluate(model, test_x, latent, batch_size)
    last = hist["step_bpd"][-min(10, steps):] if steps else [math.nan]
    log(f"{steps} steps in {hist['seconds']:.1f} s: train bits/dim {hist['step_bpd'][0] if steps else math.nan:.3f} "
        f"(first step) -> {sum(last) / len(last):.3f} (mean of the last {len(last)}), "
        f"test bits/dim {hist['test_bpd']:.3f} (negative ELBO, {len(test_x)} held-out crops)")
    if save:
        _save(save, model, test_x, hist, latent, backend_name(backend))
    return model, hist


@torch.no_grad()
def evaluate(model, data, latent, batch_size) -> float:
    """Negative ELBO in bits per dimension over held-out crops, with fixed noise."""
    model.eval()
    g = torch.Generator().manual_seed(12345)
    total = 0.0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        eps = torch.randn(len(x), latent, generator=g).to(x.device)
        total += float(loss_terms(model(x, eps), x)[0]) * len(x)
    model.train()
    return total / len(data) / (data[0].numel() * math.log(2))


def backend_name(backend) -> str:
    return backend or os.environ.get("VAE_FAST_BACKEND") or "auto"


@torch.no_grad()
def _save(directory, model, test_x, hist, latent, backend):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(hist, f, indent=1)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = test_x[:10]
    recon = sample_from_dmol(model(x, x.new_zeros(len(x), latent))[0], g)
    z = torch.randn(10, latent, generator=g).to(x.device)
    samples = sample_from_dmol(model.decode(z), g)
    to_img = lambda t: ((t.float().permute(0, 2, 3, 1).cpu().numpy() + 1) / 2).clip(0, 1)  # noqa: E731
    rows = [("held-out crops", to_img(x)), ("reconstructions (sampled, z = mu)", to_img(recon)),
            ("samples z ~ N(0, I)", to_img(samples))]
    n_cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.2 * n_cols, 1.3 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            axes[r][c].axis("off")
            if c < len(imgs):
                axes[r][c].imshow(imgs[c], interpolation="nearest")
        axes[r][0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(f"conv VAE, discretized logistic mixture decoder (M={model.mixtures}), backend={backend}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "samples.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(hist["step_bpd"], lw=0.8, label="negative ELBO")
    ax.plot(hist["step_nll_bpd"], lw=0.8, label="reconstruction (NLL)")
    ax.plot(hist["step_kl_bpd"], lw=0.8, label="KL")
    ax.axhline(hist["test_bpd"], color="0.4", ls="--", lw=0.8, label=f"test {hist['test_bpd']:.3f}")
    ax.set(xlabel="step", ylabel="bits per dimension", title="training, bits/dim per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "bpd_curve.png"), dpi=100)
    plt.close(fig)
    print(f"saved {os.path.join(directory, 'samples.png')}, bpd_curve.png, history.json")


def main(argv=None):
    args = parse_args(argv)
    print(f"conv VAE with a discretized logistic mixture decoder: backend={backend_name(args.backend)} "
          f"device={args.device} seed={args.seed} M={args.mixtures} patch={args.patch} "
          f"steps={args.steps} batch={args.batch_size}", flush=True)
    train(**vars(args))


if __name__ == "__main__":
    main()
