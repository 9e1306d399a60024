"""The named codes of vae_fast's operators, for the Python side. csrc/enums.h defines the same
values for C++; tests/test_ops.py checks that the two agree (vae_fast._C.enums())."""
from __future__ import annotations

import enum


class Likelihood(enum.IntEnum):
    """The reconstruction term (the op's `kind`). NONE: the KL term alone."""

    NONE = 0
    BERNOULLI = 1  # recon are logits
    BERNOULLI_PROBS = 2  # recon are probabilities (F.binary_cross_entropy semantics)
    GAUSSIAN = 3  # recon are means
    CONTINUOUS_BERNOULLI = 4  # recon are logits of a continuous Bernoulli on [0, 1]
    DMOL = 5  # recon are the parameters of a discretized logistic mixture per pixel


class Reduction(enum.IntEnum):
    """How the per-element terms are reduced (the op's `reduction`)."""

    SUM = 0
    BATCHMEAN = 1  # sum / size(0)
    MEAN = 2  # sum / number of elements of the term
    PER_SAMPLE = 3  # "none" of the VAE losses: one value per row
    ELEMENTWISE = 4  # "none" of the drop-in BCE: one value per element


class RedMode(enum.IntEnum):
    """The reduction as the kernels see it."""

    TOTAL = 0
    ROWS = 1
    PER_ELEMENT = 2


class ParamMode(enum.IntEnum):
    """How a parameter is read by its stream: element `off` reads a number (CONST), p[off]
    (FULL), p[(off // inner) % count] (PERIODIC); EXPAND is materialized to FULL first."""

    CONST = 0
    FULL = 1
    PERIODIC = 2
    EXPAND = 3


class Backend(enum.IntEnum):
    """The kernels that run (the op's `backend`); "auto" and "reference" resolve in Python."""

    CPU = 0
    TRITON = 1


class Api(enum.IntEnum):
    """The public function that called the op: it names the arguments in error messages."""

    RAW = 0
    ELBO_LOSS = 1
    BERNOULLI_NLL = 2
    GAUSSIAN_NLL = 3
    GAUSSIAN_KL = 4
    BCE_WITH_LOGITS = 5
    BCE = 6
    SAMPLED_NLL = 7  # K samples of recon (rows k*B + b) against one (B, ...) target
    DMOL_NLL = 8  # discretized_logistic_mixture_nll (x: params, y: target)


ENUMS = (Likelihood, Reduction, RedMode, ParamMode, Backend, Api)
