"""What the benchmark measures: the problem sizes, the likelihoods, the contenders, and the
minimum memory traffic that every effective-bandwidth number is counted against."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import vae_fast

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple  # recon / target, batch first
    latent: int  # Z: mu and logvar are (B, Z)
    label: str


CASES = {c.name: c for c in (
    Case("mnist", (128, 784), 32, "MNIST-like, 128 x 784, Z=32"),
    Case("celeba64", (64, 3, 64, 64), 128, "CelebA-64, 64 x 3x64x64, Z=128"),
    Case("img256", (32, 3, 256, 256), 256, "256^2 images, 32 x 3x256x256, Z=256"),
    Case("vol128", (4, 1, 128, 128, 128), 256, "3-D volume, 4 x 1x128^3, Z=256"),
    # beyond every cache of a GPU (L2 of 50-60 MB): its bandwidth ceiling; not in the default set
    Case("img512", (64, 3, 512, 512), 512, "512^2 images, 64 x 3x512x512, Z=512"),
)}
DEFAULT_CASES = ("mnist", "celeba64", "img256", "vol128")

# "bernoulli": logits with a float target in [0, 1]; "bernoulli_bool": the same with a bool
# target; "gaussian": means with a per-pixel log-variance of recon's shape that requires grad.
LIKELIHOODS = ("bernoulli", "bernoulli_bool", "gaussian")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = ("eager", "compile", "vae_fast")
PASSES = ("fwd", "fwd+bwd")


# --- the contenders ------------------------------------------------------------------------
# The eager baselines are the formulas users write today. For 16-bit inputs they go through
# `.float()` (fp32 math and sums, as a careful user does); a bool target needs `.float()` too.
# Both conversions are part of what users pay, so they are timed. `torch.compile` compiles
# these same functions.

def eager_bernoulli(recon, target, mu, logvar):
    B = recon.shape[0]
    nll = F.binary_cross_entropy_with_logits(recon.float(), target.float(), reduction="sum") / B
    lv = logvar.float()
    kl = -0.5 * torch.sum(1 + lv - mu.float().pow(2) - lv.exp()) / B
    return nll + kl


def eager_gaussian(recon, target, mu, logvar, recon_logvar):
    B = recon.shape[0]
    m, y, s = recon.float(), target.float(), recon_logvar.float()
    nll = 0.5 * (s + (y - m) ** 2 * torch.exp(-s)).sum() / B + HALF_LOG_2PI * recon.numel() / B
    lv = logvar.float()
    kl = -0.5 * torch.sum(1 + lv - mu.float().pow(2) - lv.exp()) / B
    return nll + kl


def fused_bernoulli(recon, target, mu, logvar):
    return vae_fast.elbo_loss(recon, target, mu, logvar, likelihood="bernoulli",
                              reduction="batchmean")


def fused_gaussian(recon, target, mu, logvar, recon_logvar):
    return vae_fast.elbo_loss(recon, target, mu, logvar, likelihood="gaussian",
                              recon_logvar=recon_logvar, reduction="batchmean")


def loss_functions(likelihood: str) -> tuple[Callable, Callable]:
    """(eager formula, vae_fast call) for a likelihood."""
    if likelihood == "gaussian":
        return eager_gaussian, fused_gaussian
    return eager_bernoulli, fused_bernoulli


# --- inputs and their traffic ----------------------------------------------------------------

@dataclass
class Inputs:
    recon: torch.Tensor
    target: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    recon_logvar: Optional[torch.Tensor]

    @property
    def args(self) -> tuple:
        extra = (self.recon_logvar,) if self.recon_logvar is not None else ()
        return (self.recon, self.target, self.mu, self.logvar) + extra

    def differentiable(self) -> "Inputs":
        """Fresh leaves that require grad, as in a training step (the target does not)."""
        leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
        return Inputs(leaf(self.recon), self.target, leaf(self.mu), leaf(self.logvar),
                      leaf(self.recon_logvar))

    @property
    def leaves(self) -> list:
        return [t for t in self.args if t.requires_grad]


def make_inputs(case: Case, likelihood: str, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    B = case.shape[0]

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)

    recon = randn(case.shape)
    if likelihood == "bernoulli":
        target = torch.rand(case.shape, generator=g).to(device=device, dtype=dtype)
    elif likelihood == "bernoulli_bool":
        target = (torch.rand(case.shape, generator=g) < 0.5).to(device)
    else:
        target = randn(case.shape)
    recon_logvar = randn(case.shape, 0.5) if likelihood == "gaussian" else None
    return Inputs(recon, target, randn((B, case.latent)), randn((B, case.latent), 0.5), recon_logvar)


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()  # bool: 1 byte


def min_traffic_bytes(x: Inputs, backward: bool) -> int:
    """The least a loss must move (docs/design.md): read recon, target (+ recon_logvar), mu and
    logvar once; a training step also writes one gradient per input that requires grad
    (recon, recon_logvar, mu, logvar), each in its input's dtype."""
    read = sum(_nbytes(t) for t in x.args)
    if not backward:
        return read
    return read + sum(_nbytes(t) for t in (x.recon, x.recon_logvar, x.mu, x.logvar))
