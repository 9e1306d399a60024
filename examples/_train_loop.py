"""What the two example scripts share: the command line, the training loop and the figures.

The loop is plain PyTorch (Adam, autocast, torch.compile). The one thing that differs between
`--loss reference` and `--loss vae_fast` is the loss function a script passes to `fit`: both
return `(loss, recon, kl)`, so the same loop logs the same ELBO terms for either.

Both variants consume the random number generator identically (initialisation, shuffling,
the reparameterisation noise drawn here and handed to the model), so with one seed the two
runs differ only by rounding: in float32 the first steps agree to ~1e-7, and training then
amplifies the difference (examples/README.md); `--dtype float64` keeps them together.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import vae_fast

BACKENDS = ("auto", "triton", "cpu", "reference")
DTYPES = ("float32", "float64")


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float):
    parser.add_argument("--loss", choices=("reference", "vae_fast"), default="vae_fast",
                        help="plain PyTorch loss, or the fused vae_fast.elbo_loss (default)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="vae_fast backend (default: $VAE_FAST_BACKEND or auto)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N examples (after shuffling), for quick runs")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile(fullgraph=True) the model forward and the loss")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: torch.autocast with bfloat16")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="precision of the weights, data, noise and loss (float64: to compare "
                             "the two losses without float32 rounding)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="write reconstructions.png, loss_curves.png and history.json here")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no tqdm progress bar")


@dataclass
class History:
    """Training loss of every step, and per epoch the mean ELBO terms and the time taken."""

    step_loss: list = field(default_factory=list)
    epochs: list = field(default_factory=list)  # dicts: loss, recon, kl, test_loss, seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


LossFn = Callable[..., tuple]  # (model_output, x) -> (loss, recon, kl)


def split(data: torch.Tensor, *, limit: Optional[int], seed: int, test_fraction: float = 0.1):
    """Shuffle with `seed`, keep `limit` examples, hold out a test fraction (at least one)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    data = data[order[:limit] if limit else order]
    n_test = max(1, int(round(len(data) * test_fraction)))
    return data[n_test:], data[:n_test]


def backend_scope(backend: Optional[str]):
    return vae_fast.use_backend(backend) if backend else contextlib.nullcontext()


def fit(model: torch.nn.Module, loss_fn: LossFn, train_x: torch.Tensor, test_x: torch.Tensor, *,
        latent: int, epochs: int, batch_size: int, lr: float, device: str = "cpu",
        compile: bool = False, amp: bool = False, dtype: str = "float32", progress: bool = True,
        log=print, name: str = "") -> History:
    """Train with Adam; every epoch log the mean loss, reconstruction term, KL and seconds.

    The model is called as `model(x, eps)`, eps ~ N(0, I) of shape (batch, latent), so that the
    noise comes from here and not from inside a compiled graph (Inductor's RNG differs from
    eager's, which would make compiled and eager runs incomparable). `dtype` ("float32" or
    "float64") is that of the weights, the data and the noise: the model is built and
    initialised in float32 and then converted, and the noise is drawn in float32, so a float64
    run computes the float32 run's steps in double precision.
    """
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if amp and dtype == torch.float64:
        raise ValueError("--amp (bfloat16 autocast) leaves float64 alone: use float32 with it")
    model.to(device=device, dtype=dtype)
    train_x, test_x = train_x.to(device, dtype), test_x.to(device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch_size = min(batch_size, len(train_x))
    n_batches = len(train_x) // batch_size  # drop the ragged last batch: one shape to compile

    def forward_loss(x, eps):
        return loss_fn(model(x, eps), x)

    step_fn = torch.compile(forward_loss, fullgraph=True) if compile else forward_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    hist = History()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_x)).to(device)
        terms = []  # per step (loss, recon, kl), kept on the device: no sync per step
        bar = tqdm(range(n_batches), desc=f"{name} epoch {epoch}/{epochs}".strip(),
                   disable=not progress, leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for b in bar:
            x = train_x[order[b * batch_size:(b + 1) * batch_size]]
            eps = torch.randn(len(x), latent, device=device).to(dtype)  # the same draws in float64
            with autocast:
                loss, recon, kl = step_fn(x, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            terms.append(torch.stack([loss.detach(), recon.detach(), kl.detach()]))
            if progress and b % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        terms = torch.stack(terms).double().cpu() if terms else torch.zeros(0, 3, dtype=torch.float64)
        seconds = time.perf_counter() - start
        bar.close()
        hist.step_loss += terms[:, 0].tolist()
        mean = terms.mean(0).tolist() if n_batches else [math.nan] * 3
        test_loss = evaluate(model, loss_fn, test_x, latent=latent, batch_size=batch_size, amp=amp)
        row = dict(epoch=epoch, loss=mean[0], recon=mean[1], kl=mean[2], test_loss=test_loss,
                   seconds=seconds)
        hist.epochs.append(row)
        log(f"{name} epoch {epoch:3d}/{epochs}  loss {mean[0]:10.4f}  recon {mean[1]:10.4f}  "
            f"kl {mean[2]:8.4f}  test {test_loss:10.4f}  {seconds:6.2f} s "
            f"({n_batches * batch_size / max(seconds, 1e-9):,.0f} examples/s)"
            + (" incl. one-time compilation" if epoch == 1 and compile else ""))
    return hist


@torch.no_grad()
def evaluate(model, loss_fn, data, *, latent: int, batch_size: int, amp: bool = False) -> float:
    """Mean test loss (negative ELBO per example), with fixed noise so every run sees the same."""
    model.eval()
    g = torch.Generator(device=data.device).manual_seed(12345)
    total = 0.0
    autocast = torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=amp)
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        eps = torch.randn(len(x), latent, device=data.device, generator=g).to(data.dtype)
        with autocast:
            loss = loss_fn(model(x, eps), x)[0]
        total += loss.item() * len(x)
    return total / len(data)


def save_figures(directory: str, hist: History, image_rows, *, title: str):
    """reconstructions.png (rows of images, each (n, H, W) or (n, H, W, 3) in [0, 1]),
    loss_curves.png, history.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "history.json"), "w") as f:
        f.write(hist.to_json())

    n_rows, n_cols = len(image_rows), max(len(imgs) for _, imgs in image_rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.2 * n_cols, 1.3 * n_rows), squeeze=False)
    for r, (label, imgs) in enumerate(image_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c].clip(0, 1), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "reconstructions.png"), dpi=100)
    plt.close(fig)

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.5))
    ax1.plot(hist.step_loss, lw=0.8)
    ax1.set(xlabel="step", ylabel="negative ELBO per example", title="training loss per step")
    ep = [e["epoch"] for e in hist.epochs]
    for key in ("loss", "recon", "test_loss"):
        ax2.plot(ep, [e[key] for e in hist.epochs], marker="o", label=key)
    ax2.set(xlabel="epoch", title="per epoch (mean)")
    ax2.legend()
    ax3.plot(ep, [e["kl"] for e in hist.epochs], marker="o", color="C3")
    ax3.set(xlabel="epoch", title="KL(q(z|x) || p(z)) per epoch")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "loss_curves.png"), dpi=100)
    plt.close(fig)


def describe(args) -> str:
    backend = args.backend or os.environ.get("VAE_FAST_BACKEND") or "auto"
    words = [f"loss={args.loss}"] + [f"backend={backend}"] * (args.loss == "vae_fast")
    words += ["compile"] * args.compile + ["amp(bf16)"] * args.amp
    words += [args.dtype] * (args.dtype != "float32")
    return " ".join(words + [f"device={args.device}", f"seed={args.seed}"])


def report_done(hist, save_dir) -> None:
    """The last lines of a run: final losses, time, and what was saved."""
    total = sum(e["seconds"] for e in hist.epochs)
    print(f"done: final loss {hist.epochs[-1]['loss']:.4f}, test {hist.epochs[-1]['test_loss']:.4f}, "
          f"{total:.1f} s training ({total / len(hist.epochs):.2f} s/epoch)")
    if save_dir:
        print(f"saved {os.path.join(save_dir, 'reconstructions.png')}, loss_curves.png, history.json")
