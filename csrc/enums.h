// The named codes of vae_fast's operators, defined once for the C++ side. Python mirrors them
// in vae_fast/_enums.py; tests/test_ops.py checks the two against each other (the extension
// exports these values as vae_fast._C.enums()).
#pragma once

#include <cstdint>

namespace vae_fast {

// What the reconstruction term is (the op's `kind`). kNone: no reconstruction term (the KL
// alone). Adding a likelihood means a value here, its formula and gradient in the reference,
// the Triton tile and the C++ vector code.
enum Likelihood : int64_t {
  kNone = 0,
  kBernoulli = 1,       // recon are logits
  kBernoulliProbs = 2,  // recon are probabilities (F.binary_cross_entropy semantics)
  kGaussian = 3,        // recon are means, rlv the log-variance
  kContinuousBernoulli = 4,  // recon are logits of a continuous Bernoulli on [0, 1]
  kDmol = 5,  // x: (B, P, *spatial) parameters of a discretized logistic mixture per pixel,
              // y: (B, C, *spatial) 8-bit-style data in [-1, 1]; not elementwise (its own
              // kernels, csrc/dmol_impl.h); num_bins travels in consts[kRlv]
  kNumLikelihoods = 6,
};

// How the per-element terms are reduced (the op's `reduction`).
enum Reduction : int64_t {
  kSum = 0,
  kBatchmean = 1,    // sum / size(0)
  kMean = 2,         // sum / number of elements of the term
  kPerSample = 3,    // "none" of the VAE losses: one value per row, shape (B,)
  kElementwise = 4,  // "none" of the drop-in BCE: one value per element, no KL term
  kNumReductions = 5,
};

// The reduction as the kernels see it: one total, one sum per row, or no sum at all.
enum RedMode : int {
  kTotal = 0,
  kRows = 1,
  kPerElement = 2,
};

inline RedMode red_mode_of(Reduction r) {
  return r == kPerSample ? kRows : (r == kElementwise ? kPerElement : kTotal);
}

// How a parameter tensor is read by its stream (element `off` of the stream reads ...).
enum ParamMode : int {
  kConst = 0,     // no tensor: a number
  kFull = 1,      // p[off]: the partner's shape
  kPeriodic = 2,  // p[(off / inner) % count]: a broadcast whose non-1 dims are one run
  kExpand = 3,    // any other broadcast: materialized to the partner's shape, then kFull
};

// Which kernels run (the op's `backend`): "auto" and "reference" are resolved in Python.
enum Backend : int64_t {
  kCpuBackend = 0,     // the C++ vector kernels of csrc/ (CPU tensors)
  kTritonBackend = 1,  // the Triton kernels of vae_fast/triton_kernels.py (CUDA; CPU under
                       // TRITON_INTERPRET=1)
  kNumBackends = 2,
};

// Which public function called the op: it decides the argument names in error messages.
enum Api : int64_t {
  kRawApi = 0,  // the op called directly: slot names
  kElboLoss = 1,
  kBernoulliNll = 2,
  kGaussianNll = 3,
  kGaussianKl = 4,
  kBceWithLogits = 5,
  kBce = 6,
  kSampledNll = 7,  // the NLL of K samples of recon, rows k*B + b, against one (B, ...) target
                    // (elbo_loss with a sample dimension, iwae_loss): y is read periodically
  kDmolNll = 8,  // discretized_logistic_mixture_nll: x = params, y = target
  kNumApis = 9,
};

// The op's nine tensor slots: a reconstruction stream (x, y and its parameters) and a KL
// stream (mu and its parameters).
enum Slot : int {
  kX = 0,
  kY = 1,
  kRlv = 2,  // Gaussian log-variance of the reconstruction
  kW = 3,    // BCE weight
  kPw = 4,   // BCE pos_weight
  kMu = 5,
  kLv = 6,  // posterior log-variance
  kPmu = 7,
  kPlv = 8,
  kNumSlots = 9,
};

constexpr bool is_recon_slot(int s) {
  return s < kMu;
}
constexpr bool is_param_slot(int s) {
  return s != kX && s != kY && s != kMu;
}
// the slot whose shape a slot's tensor must have or broadcast to
constexpr int partner_of(int s) {
  return is_recon_slot(s) ? kX : kMu;
}

}  // namespace vae_fast
