"""`nn.Module` forms of the losses; the drop-in BCE modules subclass torch's."""
from __future__ import annotations

import torch

from . import functional as F


def _show(v) -> str:
    return f"tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


class _Settings:
    """`repr` shows the settings: always those named in `_always`, the others where they differ
    from the constructor's default."""

    _always: tuple = ("reduction",)
    _defaults: dict = {}

    def extra_repr(self) -> str:
        parts = []
        for name, default in self._defaults.items():
            v = getattr(self, name)
            if name in self._always or isinstance(v, torch.Tensor) or v != default:
                parts.append(f"{name}={_show(v)}")
        return ", ".join(parts)


class ELBOLoss(_Settings, torch.nn.Module):
    """Negative ELBO, `vae_fast.elbo_loss` as a module. `forward(recon, target, mu, logvar,
    recon_logvar=None)`; a `recon_logvar` given to forward overrides the constructor's."""

    _always = ("likelihood", "reduction")
    _defaults = dict(likelihood="bernoulli", recon_logvar=None, full=True, prior_mu=None,
                     prior_logvar=None, beta=1.0, capacity=None, free_bits=None,
                     reduction="batchmean", return_terms=False, num_bins=256)

    def __init__(self, *, likelihood="bernoulli", recon_logvar=None, full=True, prior_mu=None,
                 prior_logvar=None, beta=1.0, capacity=None, free_bits=None,
                 reduction="batchmean", return_terms=False, num_bins=256):
        super().__init__()
        self.num_bins = num_bins
        self.likelihood, self.recon_logvar, self.beta = likelihood, recon_logvar, beta
        self.full, self.capacity, self.free_bits = full, capacity, free_bits
        self.prior_mu, self.prior_logvar = prior_mu, prior_logvar
        self.reduction, self.return_terms = reduction, return_terms

    def forward(self, recon, target, mu, logvar, recon_logvar=None):
        return F.elbo_loss(
            recon, target, mu, logvar, likelihood=self.likelihood,
            recon_logvar=self.recon_logvar if recon_logvar is None else recon_logvar,
            full=self.full, prior_mu=self.prior_mu, prior_logvar=self.prior_logvar, beta=self.beta,
            capacity=self.capacity, free_bits=self.free_bits,
            reduction=self.reduction, return_terms=self.return_terms, num_bins=self.num_bins,
        )


class DiscretizedLogisticMixtureNLLLoss(_Settings, torch.nn.Module):
    """`vae_fast.discretized_logistic_mixture_nll` as a module: `forward(params, target)`."""

    _always = ("num_bins", "reduction")
    _defaults = dict(num_bins=256, reduction="batchmean")

    def __init__(self, *, num_bins=256, reduction="batchmean"):
        super().__init__()
        self.num_bins, self.reduction = num_bins, reduction

    def forward(self, params, target):
        return F.discretized_logistic_mixture_nll(params, target, num_bins=self.num_bins,
                                                  reduction=self.reduction)


class BernoulliNLLLoss(_Settings, torch.nn.Module):
    _defaults = dict(reduction="batchmean")

    def __init__(self, *, reduction="batchmean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, target):
        return F.bernoulli_nll(logits, target, reduction=self.reduction)


class GaussianNLLLoss(_Settings, torch.nn.Module):
    """Gaussian NLL with a log-variance (not torch.nn.GaussianNLLLoss's variance)."""

    _defaults = dict(logvar=0.0, full=True, reduction="batchmean")

    def __init__(self, *, logvar=0.0, full=True, reduction="batchmean"):
        super().__init__()
        self.logvar, self.full, self.reduction = logvar, full, reduction

    def forward(self, mean, target, logvar=None):
        return F.gaussian_nll(mean, target, self.logvar if logvar is None else logvar,
                              full=self.full, reduction=self.reduction)


class GaussianKLLoss(_Settings, torch.nn.Module):
    _defaults = dict(prior_mu=None, prior_logvar=None, reduction="batchmean")

    def __init__(self, *, prior_mu=None, prior_logvar=None, reduction="batchmean"):
        super().__init__()
        self.prior_mu, self.prior_logvar, self.reduction = prior_mu, prior_logvar, reduction

    def forward(self, mu, logvar):
        return F.gaussian_kl(mu, logvar, self.prior_mu, self.prior_logvar, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Drop-in for `torch.nn.BCEWithLogitsLoss` on vae_fast's fused kernels."""

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction,
                                                  self.pos_weight)


class BCELoss(torch.nn.BCELoss):
    """Drop-in for `torch.nn.BCELoss` on vae_fast's fused kernels."""

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, self.weight, self.reduction)
