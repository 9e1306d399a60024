// vae_fast::mixture_kl: the single-sample KL against a Gaussian-mixture prior
// (vae_fast.mixture_prior_kl), with its forward and backward kernels and its autograd node.
//
// Per example b (d = z - mu, e = exp(-lv), u_k = z - m_k, p_k = exp(-plv_k), all over j):
//
//   log q_b  = sum_j -0.5 (lv_bj + d_bj^2 e_bj)
//   log N_bk = sum_j -0.5 (plv_kj + u_bkj^2 p_kj)          (0.5 log 2pi cancels in KL)
//   log p_b  = logsumexp_k (log w_k + log N_bk),   log w = log_softmax(logits) (or -log K)
//   KL_b     = log q_b - log p_b
//
// With r_bk = exp(log w_k + log N_bk - log p_b) (the responsibilities, softmax over k) and
// g_b = dLoss/dKL_b (g/B for batchmean, g for sum, g_b for none):
//
//   dKL/dz_bj    = g_b (-d_bj e_bj + sum_k r_bk u_bkj p_kj)
//   dKL/dmu_bj   = g_b d_bj e_bj
//   dKL/dlv_bj   = g_b 0.5 (d_bj^2 e_bj - 1)
//   dKL/dm_kj    = -p_kj sum_b g_b r_bk u_bkj
//   dKL/dplv_kj  = 0.5 (sum_b g_b r_bk - p_kj sum_b g_b r_bk u_bkj^2)
//   dKL/dlogit_k = -sum_b g_b r_bk + w_k sum_b g_b
//
// The quadratic forms are summed as (z - m)^2 directly, never expanded into matmuls
// (z^2 p - 2 z m p + m^2 p cancels when z sits near a tight component's mean), so float32
// accumulation is accurate; inputs are read in float32 (float64 when any input is float64).
//
// Ops (schemas at the bottom):
//   mixture_kl       the public op: the reduced KL. Its autograd kernel runs mixture_kl_fwd
//                    with the responsibilities (B, K) kept for the backward: the node saves the
//                    inputs and r, never anything of (B, K, Z).
//   mixture_kl_fwd   per-example KL (B,) and, when asked, r (B, K).
//   mixture_kl_bwd   the gradients from g_b and r (full shapes; the node sums broadcast
//                    log-variances back and forms the logits' gradient from sum_b g_b r_bk).
//   triton_mixture_fwd / triton_mixture_bwd   launch-only ops whose kernels
//                    vae_fast/triton_mixture.py registers from Python (vae_fast/_ext.py).
// CPU kernels: parallel over b for the forward and the z / mu / logvar gradients, over k for
// the prior's (each sums over b in a fixed order: deterministic, no atomics).
#include "autograd_util.h"
#include "cpu_kernels.h"
#include "enums.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vae_fast {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

constexpr int kRows = 4;  // examples per block: each prior row loaded is used four times

enum MixSlot : int { kMz = 0, kMmu, kMlv, kMpmu, kMplv, kMlogits, kMixSlots };

// ---- CPU kernels ----------------------------------------------------------------------------
// Written as plain loops with `omp simd` reductions (no -ffast-math needed to vectorise a
// sum); the hot ones are compiled three times, with the instruction sets of the main kernels'
// builds (setup.py's ISA_FLAGS: AVX-512, AVX2, baseline), and picked at run time by
// cpu_capability(), which honours $ATEN_CPU_CAPABILITY as the main kernels do (so a test can
// force each build, and one process never mixes two builds' bits).
#if defined(VAE_FAST_X86_BUILDS) && defined(__GNUC__)
#define VAE_FAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define VAE_FAST_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VAE_FAST_ISA_BUILDS 1
#endif

// 2: the AVX-512 build, 1: AVX2, 0: baseline (read once)
int isa_level() {
  static const int level = [] {
    const std::string& c = cpu_capability();
    return c == "avx512" ? 2 : c == "avx2" ? 1 : 0;
  }();
  return level;
}

// name##_avx512, name##_avx2, name##_default: impl compiled for each build; name: the one
// isa_level() picks. params and args in parentheses.
#if defined(VAE_FAST_ISA_BUILDS)
#define VAE_FAST_ISA_VERSIONS(name, impl, params, args)                  \
  VAE_FAST_AVX512 void name##_avx512 params { impl args; }               \
  VAE_FAST_AVX2 void name##_avx2 params { impl args; }                   \
  void name##_default params { impl args; }                              \
  void name params {                                                     \
    if (isa_level() == 2) return name##_avx512 args;                     \
    if (isa_level() == 1) return name##_avx2 args;                       \
    name##_default args;                                                 \
  }
#else
#define VAE_FAST_ISA_VERSIONS(name, impl, params, args) \
  void name params { impl args; }
#endif


#define VAE_FAST_INLINE inline __attribute__((always_inline))

// Rows [b0, b1): lnb (their (b1 - b0, K) block) = ck_k - 0.5 sum_j (z_bj - m_kj)^2 p_kj, from
// the prior transposed and zero-padded to Kp columns (pmT, precT: (Z, Kp), Kp a multiple of
// kChunk). Vectorised over components: kRows rows times kChunk components of accumulators
// stay in registers over the whole loop over j (no horizontal sums), and each prior vector
// loaded serves four rows.
template <class T>
constexpr int64_t kChunk = 64 / sizeof(T);  // two 256-bit vectors (16 floats, 8 doubles)

template <class T>
VAE_FAST_INLINE void log_joint_rows(const T* z, const T* pmT, const T* precT, const T* ck,
                                    int64_t b0, int64_t b1, int64_t K, int64_t Kp, int64_t Z,
                                    T* lnb) {
  constexpr int64_t C = kChunk<T>;
  for (int64_t b = b0; b < b1; b += kRows) {
    const int64_t n = std::min<int64_t>(kRows, b1 - b);
    // a short last block repeats its last row (computed, not written)
    const T* zr[kRows];
    for (int i = 0; i < kRows; ++i) zr[i] = z + (b + std::min<int64_t>(i, n - 1)) * Z;
    for (int64_t k0 = 0; k0 < Kp; k0 += C) {
      T a0[C] = {}, a1[C] = {}, a2[C] = {}, a3[C] = {};
      for (int64_t j = 0; j < Z; ++j) {
        const T* m = pmT + j * Kp + k0;
        const T* p = precT + j * Kp + k0;
        const T z0 = zr[0][j], z1 = zr[1][j], z2 = zr[2][j], z3 = zr[3][j];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T mc = m[c], pc = p[c];
          const T u0 = z0 - mc, u1 = z1 - mc, u2 = z2 - mc, u3 = z3 - mc;
          a0[c] += u0 * u0 * pc;
          a1[c] += u1 * u1 * pc;
          a2[c] += u2 * u2 * pc;
          a3[c] += u3 * u3 * pc;
        }
      }
      const T* acc[kRows] = {a0, a1, a2, a3};
      const int64_t kn = std::min<int64_t>(C, K - k0);
      for (int64_t i = 0; i < n; ++i) {
        T* out = lnb + (b - b0 + i) * K + k0;
        for (int64_t c = 0; c < kn; ++c) out[c] = ck[k0 + c] - T(0.5) * acc[i][c];
      }
    }
  }
}
VAE_FAST_ISA_VERSIONS(log_joint_rows_f, log_joint_rows, (const float* z, const float* pmT, const float* precT, const float* ck, int64_t b0, int64_t b1, int64_t K, int64_t Kp, int64_t Z, float* lnb),
                      (z, pmT, precT, ck, b0, b1, K, Kp, Z, lnb))
VAE_FAST_ISA_VERSIONS(log_joint_rows_d, log_joint_rows, (const double* z, const double* pmT, const double* precT, const double* ck, int64_t b0, int64_t b1, int64_t K, int64_t Kp, int64_t Z, double* lnb),
                      (z, pmT, precT, ck, b0, b1, K, Kp, Z, lnb))
void log_joint_rows_any(const float* z, const float* pmT, const float* precT, const float* ck,
                        int64_t b0, int64_t b1, int64_t K, int64_t Kp, int64_t Z, float* lnb) {
  log_joint_rows_f(z, pmT, precT, ck, b0, b1, K, Kp, Z, lnb);
}
void log_joint_rows_any(const double* z, const double* pmT, const double* precT, const double* ck,
                        int64_t b0, int64_t b1, int64_t K, int64_t Kp, int64_t Z, double* lnb) {
  log_joint_rows_d(z, pmT, precT, ck, b0, b1, K, Kp, Z, lnb);
}

// acc_r[j] += sum_k r_rk (z_rj - m_kj) p_kj for kRows rows (a block of all-zero
// responsibilities, common far from every component, adds exactly 0 and is skipped)
template <class T>
VAE_FAST_INLINE void resp_pull_rows(const T* z, const T* r, const T* pm, const T* prec, int64_t n,
                                    int64_t K, int64_t Z, T* acc) {
  for (int64_t k = 0; k < K; ++k) {
    const T* m = pm + k * Z;
    const T* p = prec + k * Z;
    if (n == kRows) {
      const T r0 = r[k], r1 = r[K + k], r2 = r[2 * K + k], r3 = r[3 * K + k];
      if (r0 == 0 && r1 == 0 && r2 == 0 && r3 == 0) continue;
      T *a0 = acc, *a1 = acc + Z, *a2 = acc + 2 * Z, *a3 = acc + 3 * Z;
      const T *z0 = z, *z1 = z + Z, *z2 = z + 2 * Z, *z3 = z + 3 * Z;
#pragma omp simd
      for (int64_t j = 0; j < Z; ++j) {
        const T mj = m[j], pj = p[j];
        a0[j] += r0 * pj * (z0[j] - mj);
        a1[j] += r1 * pj * (z1[j] - mj);
        a2[j] += r2 * pj * (z2[j] - mj);
        a3[j] += r3 * pj * (z3[j] - mj);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const T ri = r[i * K + k];
        if (ri == 0) continue;
        T* a = acc + i * Z;
        const T* zi = z + i * Z;
#pragma omp simd
        for (int64_t j = 0; j < Z; ++j) a[j] += ri * p[j] * (zi[j] - m[j]);
      }
    }
  }
}
VAE_FAST_ISA_VERSIONS(resp_pull_rows_f, resp_pull_rows, (const float* z, const float* r, const float* pm, const float* prec, int64_t n, int64_t K, int64_t Z, float* acc),
                      (z, r, pm, prec, n, K, Z, acc))
VAE_FAST_ISA_VERSIONS(resp_pull_rows_d, resp_pull_rows, (const double* z, const double* r, const double* pm, const double* prec, int64_t n, int64_t K, int64_t Z, double* acc),
                      (z, r, pm, prec, n, K, Z, acc))
void resp_pull_rows_any(const float* z, const float* r, const float* pm, const float* prec,
                        int64_t n, int64_t K, int64_t Z, float* acc) {
  resp_pull_rows_f(z, r, pm, prec, n, K, Z, acc);
}
void resp_pull_rows_any(const double* z, const double* r, const double* pm, const double* prec,
                        int64_t n, int64_t K, int64_t Z, double* acc) {
  resp_pull_rows_d(z, r, pm, prec, n, K, Z, acc);
}

// Components [k0, k0 + n), n <= kCols: their sums over b, in b order (the same bits whatever
// the threads): su_cj = sum_b R_bc u_bcj, sq_cj = sum_b R_bc u_bcj^2, tot_c = sum_b R_bc,
// with R_bc = g_b r_bc and u_bcj = z_bj - m_cj (row stride Z). Each z row and r's n
// contiguous entries are read once for n components; zero responsibilities add exactly 0
// and are skipped.
constexpr int kCols = 8;
template <class T>
VAE_FAST_INLINE void component_sums(const T* z, const T* r, const T* gb, const T* pm, int64_t B,
                                    int64_t K, int64_t Z, int64_t k0, int64_t n, T* su, T* sq,
                                    T* tot) {
  for (int64_t b = 0; b < B; ++b) {
    const T* zb = z + b * Z;
    for (int64_t c = 0; c < n; ++c) {
      const T R = gb[b] * r[b * K + k0 + c];
      if (R == 0) continue;
      tot[c] += R;
      const T* m = pm + (k0 + c) * Z;
      T *u1 = su + c * Z, *u2 = sq + c * Z;
#pragma omp simd
      for (int64_t j = 0; j < Z; ++j) {
        const T u = zb[j] - m[j];
        const T t = R * u;
        u1[j] += t;
        u2[j] += t * u;
      }
    }
  }
}
VAE_FAST_ISA_VERSIONS(component_sums_f, component_sums, (const float* z, const float* r, const float* gb, const float* pm, int64_t B, int64_t K, int64_t Z, int64_t k0, int64_t n, float* su, float* sq, float* tot),
                      (z, r, gb, pm, B, K, Z, k0, n, su, sq, tot))
VAE_FAST_ISA_VERSIONS(component_sums_d, component_sums, (const double* z, const double* r, const double* gb, const double* pm, int64_t B, int64_t K, int64_t Z, int64_t k0, int64_t n, double* su, double* sq, double* tot),
                      (z, r, gb, pm, B, K, Z, k0, n, su, sq, tot))
void component_sums_any(const float* z, const float* r, const float* gb, const float* pm,
                        int64_t B, int64_t K, int64_t Z, int64_t k0, int64_t n, float* su,
                        float* sq, float* tot) {
  component_sums_f(z, r, gb, pm, B, K, Z, k0, n, su, sq, tot);
}
void component_sums_any(const double* z, const double* r, const double* gb, const double* pm,
                        int64_t B, int64_t K, int64_t Z, int64_t k0, int64_t n, double* su,
                        double* sq, double* tot) {
  component_sums_d(z, r, gb, pm, B, K, Z, k0, n, su, sq, tot);
}

// Enough rows per task that a task's work (rows * K * Z) is worth a thread.
int64_t row_grain(int64_t K, int64_t Z) {
  const int64_t per_row = std::max<int64_t>(1, K * Z);
  return std::max<int64_t>(kRows, (int64_t{1} << 16) / per_row / kRows * kRows);
}

// The inputs as the kernels read them: contiguous, in the accumulation dtype, the
// log-variances expanded to full shape (they broadcast), the prior's precisions and the
// per-component constants ck_k = log w_k - 0.5 sum_j plv_kj (K * Z work, done once).
struct Prepared {
  Tensor z, mu, lv, pm, prec, ck;
  int64_t B = 0, K = 0, Z = 0;
};

at::ScalarType acc_of(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && t->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

Tensor as_acc(const Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

Prepared prepare(const Tensor& z, const Tensor& mu, const Tensor& lv, const Tensor& pmu,
                 const Tensor& plv, const OptTensor& logits, bool need_ck) {
  const Tensor lg = logits.has_value() ? *logits : Tensor();
  const at::ScalarType acc = acc_of({&z, &mu, &lv, &pmu, &plv, &lg});
  Prepared P;
  P.B = z.size(0), P.Z = z.size(1), P.K = pmu.size(0);
  P.z = as_acc(z, acc);
  P.mu = as_acc(mu, acc);
  P.lv = as_acc(lv.expand({P.B, P.Z}), acc);
  P.pm = as_acc(pmu, acc);
  const Tensor plv_full = as_acc(plv.expand({P.K, P.Z}), acc);
  P.prec = at::exp(-plv_full);
  if (need_ck) {
    const Tensor logw = lg.defined() ? at::log_softmax(lg.to(acc), 0)
                                     : at::full({P.K}, -std::log(double(P.K)), P.z.options());
    P.ck = (logw - 0.5 * plv_full.sum(1)).contiguous();
  }
  return P;
}

template <class T>
void cpu_forward(const Prepared& P, Tensor& kl, Tensor& r) {
  const int64_t B = P.B, K = P.K, Z = P.Z;
  const T *z = P.z.const_data_ptr<T>(), *mu = P.mu.const_data_ptr<T>(),
          *lv = P.lv.const_data_ptr<T>(), *ck = P.ck.const_data_ptr<T>();
  T* out = kl.data_ptr<T>();
  const int64_t Kp = (K + kChunk<T> - 1) / kChunk<T> * kChunk<T>;
  // the prior transposed, (Z, Kp); padding columns m = p = 0 add 0 and are never written
  Tensor pmT = at::zeros({Z, Kp}, P.z.options()), precT = at::zeros({Z, Kp}, P.z.options());
  pmT.narrow(1, 0, K).copy_(P.pm.t());
  precT.narrow(1, 0, K).copy_(P.prec.t());
  const T *pt = pmT.const_data_ptr<T>(), *qt = precT.const_data_ptr<T>();
  // log w_k + log N_bk, in r itself when r is kept
  Tensor lj = r.defined() ? r : at::empty({B, K}, P.z.options());
  T* lnb = lj.data_ptr<T>();
  at::parallel_for(0, B, row_grain(K, Z), [&](int64_t b0, int64_t b1) {
    log_joint_rows_any(z, pt, qt, ck, b0, b1, K, Kp, Z, lnb + b0 * K);
    for (int64_t b = b0; b < b1; ++b) {
      T sq = 0;
      for (int64_t j = 0; j < Z; ++j) {
        const T d = z[b * Z + j] - mu[b * Z + j], l = lv[b * Z + j];
        sq += l + d * d * std::exp(-l);
      }
      out[b] = T(-0.5) * sq;  // log q_b
    }
  });
  // The logsumexp over k with torch's vectorised exp ((B, K) work; the scalar libm exp was
  // most of the forward). Terms under e^-75 (float) / e^-700 (double) of the largest are
  // 0: below the sum's last bit, and never subnormals, whose arithmetic is slow (in the
  // backward too). A row with every component at -inf gets log p = -inf (KL = +inf).
  const Tensor mx = std::get<0>(lj.max(1, /*keepdim=*/true));
  const Tensor shift = at::where(at::isfinite(mx), mx, at::zeros({}, mx.options()));
  Tensor e = lj - shift;
  e.masked_fill_(e < (sizeof(T) == 4 ? -75.0 : -700.0), -std::numeric_limits<double>::infinity());
  e.exp_();
  const Tensor total = e.sum(1, /*keepdim=*/true);
  kl.sub_((shift + total.log()).squeeze(1));
  if (r.defined()) at::div_out(r, e, total);  // r_bk = e_bk / sum_k e_bk
}

template <class T>
void cpu_backward(const Prepared& P, const Tensor& r_t, const Tensor& gb_t, int64_t needs,
                  Tensor& gz_t, Tensor& gmu_t, Tensor& glv_t, Tensor& gpm_t, Tensor& gplv_t,
                  Tensor& gr_t) {
  const int64_t B = P.B, K = P.K, Z = P.Z;
  const T *z = P.z.const_data_ptr<T>(), *mu = P.mu.const_data_ptr<T>(),
          *lv = P.lv.const_data_ptr<T>(), *pm = P.pm.const_data_ptr<T>(),
          *prec = P.prec.const_data_ptr<T>(), *r = r_t.const_data_ptr<T>(),
          *gb = gb_t.const_data_ptr<T>();
  const bool nz = needs >> kMz & 1, nmu = needs >> kMmu & 1, nlv = needs >> kMlv & 1;
  if (nz || nmu || nlv) {
    T* gz = nz ? gz_t.data_ptr<T>() : nullptr;
    T* gmu = nmu ? gmu_t.data_ptr<T>() : nullptr;
    T* glv = nlv ? glv_t.data_ptr<T>() : nullptr;
    at::parallel_for(0, B, nz ? row_grain(K, Z) : 256, [&](int64_t b0, int64_t b1) {
      std::vector<T> acc;
      for (int64_t b = b0; b < b1; b += kRows) {
        const int64_t n = std::min<int64_t>(kRows, b1 - b);
        if (nz) {
          acc.assign(n * Z, T(0));
          resp_pull_rows_any(z + b * Z, r + b * K, pm, prec, n, K, Z, acc.data());
        }
        for (int64_t i = 0; i < n; ++i) {
          const T g = gb[b + i];
          for (int64_t j = 0; j < Z; ++j) {
            const int64_t o = (b + i) * Z + j;
            const T d = z[o] - mu[o], de = d * std::exp(-lv[o]);
            if (gz) gz[o] = g * (acc[i * Z + j] - de);
            if (gmu) gmu[o] = g * de;
            if (glv) glv[o] = T(0.5) * g * (d * de - T(1));
          }
        }
      }
    });
  }
  const bool npm = needs >> kMpmu & 1, nplv = needs >> kMplv & 1, nlg = needs >> kMlogits & 1;
  if (npm || nplv || nlg) {
    T* gpm = npm ? gpm_t.data_ptr<T>() : nullptr;
    T* gplv = nplv ? gplv_t.data_ptr<T>() : nullptr;
    T* gr = nlg ? gr_t.data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(
        kCols, (int64_t{1} << 16) / std::max<int64_t>(1, B * Z) / kCols * kCols);
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      std::vector<T> su(kCols * Z), sq(kCols * Z);
      T tot[kCols];
      for (int64_t kb = k0; kb < k1; kb += kCols) {
        const int64_t n = std::min<int64_t>(kCols, k1 - kb);
        std::fill(su.begin(), su.end(), T(0));
        std::fill(sq.begin(), sq.end(), T(0));
        std::fill(tot, tot + kCols, T(0));
        component_sums_any(z, r, gb, pm, B, K, Z, kb, n, su.data(), sq.data(), tot);
        for (int64_t c = 0; c < n; ++c) {
          const int64_t k = kb + c;
          const T* p = prec + k * Z;
          for (int64_t j = 0; j < Z; ++j) {
            if (gpm) gpm[k * Z + j] = -p[j] * su[c * Z + j];
            if (gplv) gplv[k * Z + j] = T(0.5) * (tot[c] - p[j] * sq[c * Z + j]);
          }
          if (gr) gr[k] = tot[c];
        }
      }
    });
  }
}

// ---- the Triton kernels, through the ops Python registers -----------------------------------

c10::OperatorHandle handle_of(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void check_backend(int64_t backend, const Tensor& z, const c10::OperatorHandle& triton_op) {
  if (backend == kCpuBackend) {
    TORCH_CHECK_NOT_IMPLEMENTED(z.is_cpu(), "vae_fast: the cpu backend cannot run on ", z.device());
    return;
  }
  TORCH_CHECK(backend == kTritonBackend, "vae_fast: unknown backend code ", backend);
  const auto key = z.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
  if (triton_op.hasKernelForDispatchKey(key)) return;
  TORCH_CHECK_NOT_IMPLEMENTED(!z.is_cpu(), "vae_fast: the triton backend cannot run on cpu (set "
                                           "TRITON_INTERPRET=1 before importing vae_fast)");
  TORCH_CHECK_NOT_IMPLEMENTED(false, "vae_fast: the triton backend cannot run on ", z.device(),
                              ": Triton is not installed or did not import");
}

OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// ---- vae_fast::mixture_kl_fwd / mixture_kl_bwd: device and Meta kernels ----------------------

// The raw op's own checks (vae_fast.mixture_prior_kl checks first, with the argument names):
// the kernels index by these shapes.
void check_inputs(const Tensor& z, const Tensor& mu, const Tensor& lv, const Tensor& pmu,
                  const Tensor& plv, const Tensor& logits) {
  TORCH_CHECK(z.dim() == 2 && mu.sizes() == z.sizes(), "vae_fast::mixture_kl: z and mu must be ",
              "(B, Z) of one shape, got ", z.sizes(), " and ", mu.sizes());
  TORCH_CHECK(pmu.dim() == 2 && pmu.size(0) >= 1 && pmu.size(1) == z.size(1),
              "vae_fast::mixture_kl: pmu must be (K, Z) with K >= 1 and Z = ", z.size(1), ", got ",
              pmu.sizes());
  TORCH_CHECK(at::is_expandable_to(lv.sizes(), z.sizes()) &&
                  at::is_expandable_to(plv.sizes(), pmu.sizes()),
              "vae_fast::mixture_kl: lv and plv must broadcast to ", z.sizes(), " and ", pmu.sizes(),
              ", got ", lv.sizes(), " and ", plv.sizes());
  TORCH_CHECK(!logits.defined() || (logits.dim() == 1 && logits.size(0) == pmu.size(0)),
              "vae_fast::mixture_kl: logits must be (K,) = (", pmu.size(0), ",)");
  for (const Tensor* t : {&z, &mu, &lv, &pmu, &plv, &logits}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->is_floating_point(), "vae_fast::mixture_kl: floating point tensors only, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == z.device(), "vae_fast::mixture_kl: all tensors must be on ",
                z.device(), ", got one on ", t->device());
  }
}

std::tuple<Tensor, Tensor> fwd_kernel(const Tensor& z, const Tensor& mu, const Tensor& lv,
                                      const Tensor& pmu, const Tensor& plv,
                                      const OptTensor& logits, int64_t backend, bool need_r) {
  static const c10::OperatorHandle triton = handle_of("vae_fast::triton_mixture_fwd");
  check_inputs(z, mu, lv, pmu, plv, logits.has_value() ? *logits : Tensor());
  check_backend(backend, z, triton);
  c10::OptionalDeviceGuard guard(z.device());
  const Prepared P = prepare(z, mu, lv, pmu, plv, logits, true);
  Tensor kl = at::empty({P.B}, P.z.options());
  Tensor r = need_r ? at::empty({P.B, P.K}, P.z.options()) : Tensor();
  if (backend == kTritonBackend) {
    triton.typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const OptTensor&)>()
        .call(P.z, P.mu, P.lv, P.pm, P.prec, P.ck, kl, opt(r));
  } else if (P.z.scalar_type() == at::kDouble) {
    cpu_forward<double>(P, kl, r);
  } else {
    cpu_forward<float>(P, kl, r);
  }
  return {kl, need_r ? r : at::empty({0}, P.z.options())};
}

std::tuple<Tensor, Tensor> fwd_meta(const Tensor& z, const Tensor& mu, const Tensor& lv,
                                    const Tensor& pmu, const Tensor& plv, const OptTensor& logits,
                                    int64_t, bool need_r) {
  const Tensor lg = logits.has_value() ? *logits : Tensor();
  TORCH_CHECK(z.dim() == 2 && pmu.dim() == 2, "vae_fast::mixture_kl: z and pmu must be 2-D");
  for (const Tensor* t : {&mu, &lv, &pmu, &plv, &lg}) {
    TORCH_CHECK(!t->defined() || t->device() == z.device(),
                "vae_fast::mixture_kl: all tensors must be on ", z.device(), ", got one on ",
                t->device());
  }
  const auto opts = z.options().dtype(acc_of({&z, &mu, &lv, &pmu, &plv, &lg}));
  const c10::SymInt B = z.sym_size(0);
  return {at::empty_symint({B}, opts),
          need_r ? at::empty_symint({B, pmu.sym_size(0)}, opts) : at::empty({0}, opts)};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// gb: dLoss/dKL_b (B,); needs: a bit per MixSlot. Gradients come back in the accumulation
// dtype and at full shape ((B, Z) for lv, (K, Z) for plv, (K,) sum_b g_b r_bk for the
// logits); the ones not asked for are empty.
Grads bwd_kernel(const Tensor& gb, const Tensor& z, const Tensor& mu, const Tensor& lv,
                 const Tensor& pmu, const Tensor& plv, const Tensor& r, int64_t needs,
                 int64_t backend) {
  static const c10::OperatorHandle triton = handle_of("vae_fast::triton_mixture_bwd");
  check_inputs(z, mu, lv, pmu, plv, Tensor());
  TORCH_CHECK(r.sizes() == at::IntArrayRef({z.size(0), pmu.size(0)}) && gb.dim() == 1 &&
                  gb.size(0) == z.size(0),
              "vae_fast::mixture_kl_bwd: r must be (B, K) and gb (B,), got ", r.sizes(), " and ",
              gb.sizes());
  check_backend(backend, z, triton);
  c10::OptionalDeviceGuard guard(z.device());
  const Prepared P = prepare(z, mu, lv, pmu, plv, std::nullopt, false);
  const auto o = P.z.options();
  auto make = [&](int s, std::initializer_list<int64_t> shape) {
    return needs >> s & 1 ? at::empty(shape, o) : Tensor();
  };
  Tensor gz = make(kMz, {P.B, P.Z}), gmu = make(kMmu, {P.B, P.Z}), glv = make(kMlv, {P.B, P.Z});
  Tensor gpm = make(kMpmu, {P.K, P.Z}), gplv = make(kMplv, {P.K, P.Z}), gr = make(kMlogits, {P.K});
  const Tensor rr = as_acc(r, P.z.scalar_type()), g = as_acc(gb, P.z.scalar_type());
  if (backend == kTritonBackend) {
    triton.typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&)>()
        .call(P.z, P.mu, P.lv, P.pm, P.prec, rr, g, opt(gz), opt(gmu), opt(glv), opt(gpm),
              opt(gplv), opt(gr));
  } else if (P.z.scalar_type() == at::kDouble) {
    cpu_backward<double>(P, rr, g, needs, gz, gmu, glv, gpm, gplv, gr);
  } else {
    cpu_backward<float>(P, rr, g, needs, gz, gmu, glv, gpm, gplv, gr);
  }
  auto out = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, o); };
  return {out(gz), out(gmu), out(glv), out(gpm), out(gplv), out(gr)};
}

Grads bwd_meta(const Tensor& gb, const Tensor& z, const Tensor& mu, const Tensor& lv,
               const Tensor& pmu, const Tensor& plv, const Tensor& r, int64_t needs, int64_t) {
  const auto o = z.options().dtype(acc_of({&z, &mu, &lv, &pmu, &plv}));
  const c10::SymInt B = z.sym_size(0), Z = z.sym_size(1), K = pmu.sym_size(0);
  auto make = [&](int s, std::vector<c10::SymInt> shape) {
    return needs >> s & 1 ? at::empty_symint(shape, o) : at::empty({0}, o);
  };
  return {make(kMz, {B, Z}),   make(kMmu, {B, Z}),   make(kMlv, {B, Z}),
          make(kMpmu, {K, Z}), make(kMplv, {K, Z}), make(kMlogits, {K})};
}

// ---- vae_fast::mixture_kl: reduction and autograd ---------------------------------------------

const std::string kTwiceMix =
    twice_message("mixture_prior_kl's", "vae_fast.reference.mixture_prior_kl");

Tensor reduce(const Tensor& kl, int64_t reduction) {
  if (reduction == kPerSample) return kl;
  TORCH_CHECK(reduction == kSum || reduction == kBatchmean,
              "vae_fast::mixture_kl: reduction must be sum, batchmean or per-sample, got ", reduction);
  const Tensor total = kl.sum();
  return reduction == kSum ? total : at::div(total, c10::Scalar(kl.sym_size(0)));
}

std::tuple<Tensor, Tensor> call_fwd(const Tensor& z, const Tensor& mu, const Tensor& lv,
                                    const Tensor& pmu, const Tensor& plv, const OptTensor& logits,
                                    int64_t backend, bool need_r) {
  static const auto op =
      handle_of("vae_fast::mixture_kl_fwd")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const OptTensor&,
                                            int64_t, bool)>();
  return op.call(z, mu, lv, pmu, plv, logits, backend, need_r);
}

Grads call_bwd(const Tensor& gb, const Tensor& z, const Tensor& mu, const Tensor& lv,
               const Tensor& pmu, const Tensor& plv, const Tensor& r, int64_t needs,
               int64_t backend) {
  static const auto op =
      handle_of("vae_fast::mixture_kl_bwd")
          .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, int64_t, int64_t)>();
  return op.call(gb, z, mu, lv, pmu, plv, r, needs, backend);
}

struct MixtureKlBackward : public torch::autograd::Node {
  std::array<SavedVariable, kMixSlots> in;  // the inputs (logits possibly undefined)
  SavedVariable r;                          // the responsibilities (B, K)
  std::array<bool, kMixSlots> need{};
  std::array<std::vector<c10::SymInt>, kMixSlots> shape;
  std::array<at::ScalarType, kMixSlots> dtype{};
  int64_t reduction = kBatchmean, backend = kCpuBackend;

  std::string name() const override {
    return "vae_fast::MixtureKlBackward";
  }

  void release_variables() override {
    for (SavedVariable& v : in) v.reset_data();
    r.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(kMixSlots);
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    int64_t needs = 0;
    for (int s = 0; s < kMixSlots; ++s)
      if (need[s] && task_should_compute_output(s)) needs |= int64_t{1} << s;
    if (!needs) return out;
    Tensor t[kMixSlots];
    for (int s = 0; s < kMixSlots; ++s) t[s] = in[s].unpack();
    const Tensor rr = r.unpack();
    const c10::SymInt B = t[kMz].sym_size(0);
    // dLoss/dKL_b: the output's gradient, spread over the examples by the reduction
    Tensor gb = reduction == kPerSample ? g : g.expand_symint({B});
    if (reduction == kBatchmean) gb = at::div(gb, c10::Scalar(B));
    const Grads gr = call_bwd(gb, t[kMz], t[kMmu], t[kMlv], t[kMpmu], t[kMplv], rr, needs, backend);
    const Tensor full[kMixSlots] = {std::get<0>(gr), std::get<1>(gr), std::get<2>(gr),
                                    std::get<3>(gr), std::get<4>(gr), std::get<5>(gr)};
    for (int s = 0; s < kMixSlots; ++s) {
      if (!(needs >> s & 1)) continue;
      Tensor v = full[s];
      if (s == kMlogits) {
        // -sum_b g_b r_bk + w_k sum_b g_b
        v = at::softmax(t[kMlogits].to(v.scalar_type()), 0) * gb.sum().to(v.scalar_type()) - v;
      } else if (s == kMlv || s == kMplv) {
        v = at::sum_to(v, shape[s]);  // a broadcast log-variance: the sum over its copies
      }
      out[s] = v.to(dtype[s]);
    }
    if (at::GradMode::is_enabled()) {
      // create_graph=True (torch.func.grad asks for it): the gradients are right, but a
      // second backward through them must raise, not see constants
      raise_on_backward(out, kTwiceMix, torch::autograd::edge_list(next_edges()));
    }
    return out;
  }
};

Tensor mixture_kl_autograd(const Tensor& z, const Tensor& mu, const Tensor& lv, const Tensor& pmu,
                           const Tensor& plv, const OptTensor& logits, int64_t reduction,
                           int64_t backend) {
  const Tensor lg = logits.has_value() ? *logits : Tensor();
  const Tensor* ins[kMixSlots] = {&z, &mu, &lv, &pmu, &plv, &lg};
  refuse_forward_ad({&z, &mu, &lv, &pmu, &plv, &lg}, "mixture_prior_kl has",
                    "vae_fast.reference.mixture_prior_kl");
  bool any = false;
  std::array<bool, kMixSlots> need{};
  for (int s = 0; s < kMixSlots && at::GradMode::is_enabled(); ++s) {
    need[s] = ins[s]->defined() && ins[s]->requires_grad();
    any = any || need[s];
  }
  Tensor out, r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor kl;
    std::tie(kl, r) = call_fwd(z, mu, lv, pmu, plv, logits, backend, any);
    out = reduce(kl, reduction);
  }
  if (any) {
    auto node = make_node<MixtureKlBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(z, mu, lv, pmu, plv, lg));
    for (int s = 0; s < kMixSlots; ++s) {
      if (!ins[s]->defined()) continue;
      node->in[s] = SavedVariable(*ins[s], /*is_output=*/false);
      node->need[s] = need[s];
      node->shape[s] = std::vector<c10::SymInt>(ins[s]->sym_sizes().begin(), ins[s]->sym_sizes().end());
      node->dtype[s] = ins[s]->scalar_type();
    }
    node->r = SavedVariable(r, /*is_output=*/false);
    node->reduction = reduction;
    node->backend = backend;
    torch::autograd::set_history(out, node);
  }
  return out;
}

// Without autograd (inference mode, torch.compile's traced forward below it): no r.
Tensor mixture_kl_plain(const Tensor& z, const Tensor& mu, const Tensor& lv, const Tensor& pmu,
                        const Tensor& plv, const OptTensor& logits, int64_t reduction,
                        int64_t backend) {
  return reduce(std::get<0>(call_fwd(z, mu, lv, pmu, plv, logits, backend, false)), reduction);
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY_FRAGMENT(vae_fast, m) {
  m.def(
      "mixture_kl(Tensor z, Tensor mu, Tensor lv, Tensor pmu, Tensor plv, Tensor? logits, "
      "int reduction, int backend) -> Tensor");
  m.def(
      "mixture_kl_fwd(Tensor z, Tensor mu, Tensor lv, Tensor pmu, Tensor plv, Tensor? logits, "
      "int backend, bool need_r) -> (Tensor kl, Tensor r)");
  m.def(
      "mixture_kl_bwd(Tensor gb, Tensor z, Tensor mu, Tensor lv, Tensor pmu, Tensor plv, "
      "Tensor r, int needs, int backend) -> (Tensor g_z, Tensor g_mu, Tensor g_lv, "
      "Tensor g_pmu, Tensor g_plv, Tensor g_r)");
  m.def(
      "triton_mixture_fwd(Tensor z, Tensor mu, Tensor lv, Tensor pmu, Tensor prec, Tensor ck, "
      "Tensor(a!) kl, Tensor(b!)? r) -> ()");
  m.def(
      "triton_mixture_bwd(Tensor z, Tensor mu, Tensor lv, Tensor pmu, Tensor prec, Tensor r, "
      "Tensor gb, Tensor(a!)? g_z, Tensor(b!)? g_mu, Tensor(c!)? g_lv, Tensor(d!)? g_pmu, "
      "Tensor(e!)? g_plv, Tensor(f!)? g_r) -> ()");
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("mixture_kl", &vae_fast::mixture_kl_autograd);
}

TORCH_LIBRARY_IMPL(vae_fast, CompositeExplicitAutograd, m) {
  m.impl("mixture_kl", &vae_fast::mixture_kl_plain);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("mixture_kl_fwd", &vae_fast::fwd_kernel);
  m.impl("mixture_kl_bwd", &vae_fast::bwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("mixture_kl_fwd", &vae_fast::fwd_kernel);
  m.impl("mixture_kl_bwd", &vae_fast::bwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, Meta, m) {
  m.impl("mixture_kl_fwd", &vae_fast::fwd_meta);
  m.impl("mixture_kl_bwd", &vae_fast::bwd_meta);
}
