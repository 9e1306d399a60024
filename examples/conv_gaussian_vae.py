"""A small convolutional VAE with a Gaussian decoder and a learned log-variance, trained on
32x32 patches cut from scikit-image's bundled sample photographs (astronaut, coffee, chelsea,
rocket, hubble_deep_field, immunohistochemistry, camera, coins, moon, gravel, brick, grass;
nothing is downloaded).

    python examples/conv_gaussian_vae.py --loss reference
    python examples/conv_gaussian_vae.py --loss vae_fast
    python examples/conv_gaussian_vae.py --logvar pixel --save out/patches

`--logvar channel` (default) learns one decoder log-variance per colour channel, an
`nn.Parameter` of shape (C, 1, 1) that broadcasts over the image; `--logvar pixel` adds a
decoder head that predicts a log-variance for every pixel. Either is passed to
`vae_fast.elbo_loss(..., likelihood="gaussian", recon_logvar=...)` as it is; the gradient
comes back in the parameter's own shape.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _train_loop as loop  # noqa: E402

import vae_fast  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "camera", "coins", "moon", "gravel", "brick", "grass")
LOG_2PI = math.log(2 * math.pi)


class ConvVAE(nn.Module):
    """Three stride-2 convolutions down to (128, P/8, P/8), a linear map to (mu, logvar), and
    the mirror image up to the mean image in [0, 1] (and per-pixel log-variances)."""

    def __init__(self, channels: int = 3, patch: int = 32, latent: int = 32, logvar: str = "channel"):
        super().__init__()
        if patch % 8:
            raise ValueError(f"--patch must be a multiple of 8, got {patch}")
        self.side = patch // 8
        flat = 128 * self.side ** 2
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        )
        self.to_latent = nn.Linear(flat, 2 * latent)
        self.from_latent = nn.Linear(latent, flat)
        out_channels = channels * (2 if logvar == "pixel" else 1)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, out_channels, 4, 2, 1),
        )
        self.channels = channels
        self.per_pixel = logvar == "pixel"
        # one learned decoder log-variance per channel, broadcast over (H, W); the per-pixel head
        # predicts an offset from `logvar_init`
        self.recon_logvar = None if self.per_pixel else nn.Parameter(torch.zeros(channels, 1, 1))
        self.register_buffer("logvar_init", torch.zeros(channels, 1, 1))

    @torch.no_grad()
    def init_logvar(self, data: torch.Tensor):
        """Start the decoder variance at the data's per-channel variance (the best fit of a
        constant mean) instead of 1: Adam moves a log-variance by about lr per step, so from 0
        it would take thousands of steps to reach the pixel noise level."""
        self.logvar_init.copy_(data.var(dim=(0, 2, 3)).clamp_min(1e-4).log().view(-1, 1, 1))
        if self.recon_logvar is not None:
            self.recon_logvar.copy_(self.logvar_init)

    def decode(self, z):
        h = self.decoder(self.from_latent(z).view(len(z), 128, self.side, self.side))
        mean = torch.sigmoid(h[:, :self.channels])
        return mean, (h[:, self.channels:] + self.logvar_init if self.per_pixel else self.recon_logvar)

    def forward(self, x, eps):
        mu, logvar = self.to_latent(self.encoder(x)).chunk(2, dim=1)
        z = mu + eps * torch.exp(0.5 * logvar)
        mean, recon_logvar = self.decode(z)
        return mean, recon_logvar, mu, logvar


# ---- the loss: before (plain PyTorch) and after (vae_fast) -------------------------------------

def reference_loss(out, x):
    """Negative ELBO per example: Gaussian NLL with a learned log-variance, plus the KL."""
    mean, recon_logvar, mu, logvar = out
    nll = 0.5 * (recon_logvar + (x - mean) ** 2 * torch.exp(-recon_logvar) + LOG_2PI)
    recon = nll.sum() / x.shape[0]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kl, recon, kl


def vae_fast_loss(out, x):
    """The same negative ELBO in one fused call."""
    mean, recon_logvar, mu, logvar = out
    return vae_fast.elbo_loss(mean, x, mu, logvar, likelihood="gaussian",
                              recon_logvar=recon_logvar, return_terms=True)


LOSSES = {"reference": reference_loss, "vae_fast": vae_fast_loss}


@functools.lru_cache(maxsize=None)
def _rgb_image(name: str) -> np.ndarray:
    """A skimage.data sample as (H, W, 3) float32 in [0, 1] (decoded once per process)."""
    import skimage.data

    img = getattr(skimage.data, name)().astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    img.flags.writeable = False
    return img


def load_patches(patch: int = 32, channels: int = 3, images=IMAGES) -> torch.Tensor:
    """Non-overlapping patch x patch tiles of each image, (N, channels, patch, patch) float32 in
    [0, 1]; grayscale images are repeated over RGB, colour ones averaged for channels=1."""
    tiles = []
    for name in images:
        img = _rgb_image(name)
        if channels == 1:
            img = img.mean(axis=2, keepdims=True)
        h, w = (img.shape[0] // patch) * patch, (img.shape[1] // patch) * patch
        t = torch.tensor(img[:h, :w]).permute(2, 0, 1)  # (C, H, W)
        t = t.unfold(1, patch, patch).unfold(2, patch, patch)  # (C, h/p, w/p, p, p)
        tiles.append(t.permute(1, 2, 0, 3, 4).reshape(-1, channels, patch, patch))
    return torch.cat(tiles).contiguous()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    loop.add_common_args(p, epochs=8, batch_size=64, lr=1e-3)
    p.add_argument("--logvar", choices=("channel", "pixel"), default="channel",
                   help="learned decoder log-variance: per channel (C,1,1) or a per-pixel head")
    p.add_argument("--patch", type=int, default=32, help="patch side (a multiple of 8)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--latent", type=int, default=32)
    return p.parse_args(argv)


def train(*, loss="vae_fast", logvar="channel", backend=None, epochs=8, batch_size=64, lr=1e-3,
          patch=32, channels=3, latent=32, limit=None, compile=False, amp=False, dtype="float32",
          device="cpu", seed=0, save=None, progress=True, log=print):
    """Train the conv VAE; returns (model, History). Same seed -> same data, init and noise."""
    torch.manual_seed(seed)
    train_x, test_x = loop.split(load_patches(patch, channels), limit=limit, seed=seed)
    model = ConvVAE(channels, patch, latent, logvar)
    model.init_logvar(train_x)
    with loop.backend_scope(backend):
        hist = loop.fit(model, LOSSES[loss], train_x, test_x, latent=latent, epochs=epochs,
                        batch_size=batch_size, lr=lr, device=device, compile=compile, amp=amp,
                        dtype=dtype, progress=progress, log=log, name=loss)
    if model.recon_logvar is not None:
        sigma = torch.exp(0.5 * model.recon_logvar.detach()).flatten().tolist()
        log(f"learned decoder sigma per channel: {[round(s, 4) for s in sigma]}")
    if save:
        _save(save, model, test_x, hist, latent,
              title=f"conv Gaussian VAE on {patch}x{patch} patches, loss={loss}, logvar={logvar}")
    return model, hist


@torch.no_grad()
def _save(directory, model, test_x, hist, latent, title):
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    x = test_x[:10].to(device, dtype)
    mean, _, _, _ = model(x, x.new_zeros(len(x), latent))
    z = torch.randn(10, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    samples, _ = model.decode(z)
    to_img = lambda t: t.float().permute(0, 2, 3, 1).squeeze(-1).cpu().numpy()  # noqa: E731
    rows = [("test patches", to_img(x)), ("reconstructions (mean)", to_img(mean)),
            ("samples z ~ N(0, I) (mean)", to_img(samples))]
    loop.save_figures(directory, hist, rows, title=title)


def main(argv=None):
    args = parse_args(argv)
    print(f"conv Gaussian VAE on image patches: {loop.describe(args)} logvar={args.logvar}",
          flush=True)
    _, hist = train(**vars(args))
    loop.report_done(hist, args.save)


if __name__ == "__main__":
    main()
