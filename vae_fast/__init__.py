"""vae_fast: fused VAE losses (negative ELBO, Bernoulli/Gaussian NLL, Gaussian KL) with
hand-written backward passes, and the discretized logistic mixture likelihood, on Triton (CUDA) and C++ (CPU) kernels."""
from . import _ext  # noqa: F401  (loads the compiled operators first)
from ._backend import use_backend
from ._common import ELBOTerms
from .functional import (
    bernoulli_nll,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    discretized_logistic_mixture_nll,
    elbo_loss,
    gaussian_kl,
    gaussian_nll,
    iwae_loss,
)
from .mixture import mixture_prior_kl
from .modules import (BCELoss, BCEWithLogitsLoss, BernoulliNLLLoss, DiscretizedLogisticMixtureNLLLoss,
                      ELBOLoss, GaussianKLLoss, GaussianNLLLoss)

__version__ = "0.1.0"

__all__ = [
    "BCELoss", "BCEWithLogitsLoss", "BernoulliNLLLoss", "DiscretizedLogisticMixtureNLLLoss", "ELBOLoss", "ELBOTerms", "GaussianKLLoss",
    "GaussianNLLLoss", "bernoulli_nll", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "discretized_logistic_mixture_nll", "elbo_loss", "gaussian_kl", "gaussian_nll", "iwae_loss", "mixture_prior_kl", "use_backend",
]
