// Interface between the op layer (ops.cpp: tensors, the plan, registration) and the CPU
// vector kernels (kernels_impl.h, compiled once per instruction set: kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp; cpu_dispatch.cpp picks one at run time).  Plain
// pointers and small structs, so the kernel translation units need no tensor headers.
#pragma once

#include "enums.h"

#include <cstdint>
#include <string>
#include <vector>

namespace vae_fast {

enum class DType : int8_t { Bool, Half, BFloat16, Float, Double };

// How one input of a stream is read.  Element `i` of the stream (flat offset
// in [0, n)) reads:
//   Const:    `value` (no tensor)
//   Full:     data[i]
//   Periodic: data[(i / inner) % count]   (scalar tensors, per-feature,
//                                          per-channel parameters)
enum class ReadMode : int8_t { Const = 0, Full = 1, Periodic = 2 };

struct Operand {
  const void* data = nullptr;
  DType dtype = DType::Float;
  ReadMode mode = ReadMode::Const;
  int64_t inner = 1;
  int64_t count = 1;
  double value = 0.0;
};

// A full-size per-element output (a gradient, or the elementwise loss).
struct Output {
  void* data = nullptr;  // nullptr: not wanted, not computed
  DType dtype = DType::Float;
};

struct ReconStream {
  Likelihood kind = kNone;
  bool full = false;     // Gaussian: add 0.5*log(2*pi) per element
  int64_t n = 0;         // rows * row_len
  int64_t row_len = 0;
  Operand x, y, s, w, pw;                 // s: Gaussian log-variance
  Output gx, gy, gs, gw, gpw, elem_loss;  // grads already multiplied by `scale`
  double scale = 1.0;
};

struct KLStream {
  bool present = false;
  int64_t n = 0;
  int64_t row_len = 0;
  Operand mu, lv, pmu, plv;
  Output gmu, glv, gpmu, gplv;
  double scale = 1.0;
};

// The discretized logistic mixture (kDmol; PixelCNN++'s discretized_mix_logistic_loss with
// num_bins bins): one term per pixel (b, s), over all channels of that pixel. Element strides
// (in elements, not bytes) address the tensors: param channel p of pixel s of example b is
// x[b * x_sb + p * x_sp + s * x_ss] (NCHW contiguous: x_sb = P * S, x_sp = S, x_ss = 1;
// channels_last: x_sb = S * P, x_sp = 1, x_ss = P), and the same for y with channel c; gx has
// x's strides. P = 10 * mix for channels == 3, 3 * mix for channels == 1, in PixelCNN++'s
// channel order (mix logits, then per colour channel mix means, mix log-scales, mix coefficients;
// for one channel: logits, means, log-scales).
struct DmolStream {
  int64_t batch = 0;   // B
  int64_t pixels = 0;  // S, the product of the spatial sizes
  int64_t mix = 0;     // M
  int channels = 3;    // C: 1 or 3
  double num_bins = 256.0;
  const void* x = nullptr;
  DType x_dtype = DType::Float;
  int64_t x_sb = 0, x_sp = 0, x_ss = 0;
  const void* y = nullptr;
  DType y_dtype = DType::Float;
  int64_t y_sb = 0, y_sc = 0, y_ss = 0;
  Output gx;  // d(-log p)/d(x) * scale, written for every element of x (nullptr: not wanted)
  double scale = 1.0;
};

// Fills sums[b] (sums is resized to batch) with the unscaled sum over the pixels of example b
// of -log p(y | x), in a fixed order whatever the thread count. acc_double: float64 math.
void dmol_forward_kernel(const DmolStream& ds, bool acc_double, std::vector<double>& sums);

// Runs both streams in one parallel pass (the instruction set picked by cpu_dispatch.cpp).  Returns the unscaled sums per
// segment (one segment for TOTAL/ELEMENTWISE, `rows` for ROWS) in sums_r /
// sums_k, each sized to the number of segments (zeros for an absent stream).
// acc_double: compute in float64 instead of float32.
void fused_forward_kernel(const ReconStream& rs, const KLStream& ks, int red_mode,
                          int64_t rows, bool acc_double, std::vector<double>& sums_r,
                          std::vector<double>& sums_k);

// The importance-weighted bound's pass (vae_fast::iwae_fwd): rs over the rows k*B + b of K
// samples of B examples, per row. For each example b: nll[k] = the unscaled sum of row k*B + b,
// added in the chunk order of fused_forward_kernel's ROWS sums (the same bits), then
// finish(b, nll, coef, ctx) gives each row's gradient coefficient (run.cpp: the importance
// weights), and the gradients just written (rs.gx, rs.gs) are multiplied by it while they are
// still in cache, instead of in one more pass over memory. Parallel over examples; finish is
// called once per example, from any thread.
struct IwaeStream {
  const ReconStream* rs = nullptr;
  int64_t samples = 0, batch = 0;
  void (*finish)(int64_t b, const double* nll, double* coef, void* ctx) = nullptr;
  void* ctx = nullptr;
};
void iwae_forward_kernel(const IwaeStream& is, bool acc_double);

// buf[i] *= coef(i), where coef is a scalar (n_coef == 1), per row
// (n_coef == rows, row of i = i / row_len), or per element (n_coef == n).
// Coefficients equal to exactly 1 leave their range untouched.
// For the per-element case `coef_elem` points at n coefficients in acc dtype
// `coef_dtype` (one or two tensors, summed: a[i] + b[i], either may be null).
struct ScaleSpec {
  // scalar / per-row coefficients, already combined in double
  const double* coef = nullptr;
  int64_t n_coef = 0;
  int64_t row_len = 0;
  // per-element coefficients
  const void* elem_a = nullptr;
  const void* elem_b = nullptr;
  DType elem_dtype = DType::Float;
  bool elementwise = false;
};
void scale_kernel(void* buf, DType dtype, int64_t n, const ScaleSpec& spec);

// The instruction set the two entry points above use: "avx512", "avx2" or "default", the
// best this CPU runs among those built, lowered by $ATEN_CPU_CAPABILITY as for torch's own
// kernels (read once).
const std::string& cpu_capability();

// Each instruction-set build defines the same two entry points in its own namespace.
#define VAE_FAST_DECLARE_KERNELS(isa)                                                        \
  namespace isa {                                                                            \
  void fused_forward_kernel(const ReconStream& rs, const KLStream& ks, int red_mode,          \
                            int64_t rows, bool acc_double, std::vector<double>& sums_r,      \
                            std::vector<double>& sums_k);                                    \
  void scale_kernel(void* buf, DType dtype, int64_t n, const ScaleSpec& spec);               \
  void iwae_forward_kernel(const IwaeStream& is, bool acc_double);                           \
  void dmol_forward_kernel(const DmolStream& ds, bool acc_double, std::vector<double>& sums);  \
  }
VAE_FAST_DECLARE_KERNELS(vae_fast_default)
VAE_FAST_DECLARE_KERNELS(vae_fast_avx2)
VAE_FAST_DECLARE_KERNELS(vae_fast_avx512)
#undef VAE_FAST_DECLARE_KERNELS

}  // namespace vae_fast
