// The device kernels of vae_fast::fused_fwd and of the backward's in-place scaling: thin
// runners that lower a planned call (plan.h) to what the CPU vector kernels (cpu_kernels.h) or
// the Triton kernels (vae_fast/triton_kernels.py, through the vae_fast::triton_fwd /
// triton_scale ops that Python registers) take, and launch them.
#pragma once

#include "plan.h"

#include <cstdint>
#include <vector>

namespace vae_fast {

// Fills the outputs that allocate() made: losses, and the gradients asked for in c.needs.
void run_forward(const Plan& p, const Call& c, std::vector<Tensor>& out);

// The importance-weighted bound (vae_fast::iwae_fwd) over a planned kSampledNll call (rows
// k*B + b of K samples of B examples, per sample) whose `lat` (K, B) holds the latent terms
// log p(z_kb) - log q(z_kb | x_b): fills per (B,) with -(logsumexp_k (lat_kb - nll_kb) - log K)
// and w (K, B) with the importance weights softmax_k(lat_kb - nll_kb), and leaves the
// gradients in out (x's, rlv's) multiplied row by row by gscale * w_kb. On CPU each example's
// rows are weighted while still in cache (cpu_kernels.h: IwaeStream).
void run_iwae(const Plan& p, const Call& c, const Tensor& lat, double gscale,
              std::vector<Tensor>& out, Tensor& per, Tensor& w);

// Backward of one stream, in place: every buffer in `bufs` (the stream's full-size gradients,
// all of one layout) times its coefficient: c = w * g_loss + g_term (a missing one counts 0;
// w = 1 for the reconstruction stream, beta for the KL stream), one value (kTotal), one per
// row (kRows) or one per element (kPerElement). A coefficient of exactly 1 touches no memory.
struct ScaleArgs {
  RedMode red = kTotal;
  int64_t rows = 1;
  Backend backend = kCpuBackend;
  double beta = 1.0;  // the KL stream's weight (when beta_t is undefined)
  Tensor beta_t;
};
void scale_in_place(const ScaleArgs& a, std::vector<Tensor>& bufs_r, std::vector<Tensor>& bufs_k,
                    const Tensor& g_loss, const Tensor& g_nll, const Tensor& g_kl);

// How many fused forward kernels this process ran (tests: nothing runs before the checks).
int64_t kernel_calls();

// A CPU scalar tensor's value (no dispatcher call).
double scalar_value(const Tensor& t);

}  // namespace vae_fast
