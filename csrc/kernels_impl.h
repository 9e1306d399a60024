// Fused VAE loss kernels for CPU: one pass over memory computes the
// reconstruction NLL, the Gaussian KL, their per-chunk partial sums and (when
// asked) every gradient, already multiplied by the reduction's scale.
//
// Work layout (fixed, independent of the thread count, so results are
// bitwise reproducible):
//   - a stream is cut into segments: the whole stream (TOTAL, ELEMENTWISE)
//     or one segment per row (ROWS);
//   - each segment into chunks of kChunk elements (the last one shorter);
//     every chunk produces one double partial, and partials are added in
//     chunk order afterwards;
//   - a chunk is processed in tiles of kTile elements.  Inputs already in the
//     accumulation type T and read element by element are used in place;
//     anything else (bool/16-bit data, broadcast parameters, constants) is
//     staged into small L1-resident buffers first, so one vector kernel per
//     loss serves every dtype and broadcast pattern.
// The instruction set is the translation unit's (its compiler flags): simd_math.h names the
// namespace after it, so each build's symbols stay apart.
#include "simd_math.h"

#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <cstring>
#include <memory>

namespace vae_fast {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int64_t kTile = 512;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kMinElemsPerTask = 32768;

// 0.5 * log(2*pi)
constexpr double kHalfLog2Pi = 0.91893853320467274178;

// ---------------------------------------------------------------------------
// dtype conversion between tensors and T tiles
// ---------------------------------------------------------------------------
template <typename T>
inline T read_scalar(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::Bool:
      return static_cast<const uint8_t*>(p)[i] != 0 ? T(1) : T(0);
    case DType::Half:
      return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case DType::BFloat16:
      return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case DType::Float:
      return static_cast<T>(static_cast<const float*>(p)[i]);
    case DType::Double:
      return static_cast<T>(static_cast<const double*>(p)[i]);
  }
  return T(0);
}

template <typename S>
inline void convert_16_to_float(const S* src, float* dst, int64_t n) {
  int64_t i = 0;
  constexpr int64_t L = Vec<S>::size();
  for (; i + L <= n; i += L) {
    auto [a, b] = at::vec::convert_to_float<S>(Vec<S>::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + Vf::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[0:n] = src[off:off+n] converted to T
template <typename T>
void convert_in(const void* src, DType dt, int64_t off, int64_t n, T* dst) {
  switch (dt) {
    case DType::Bool: {
      const uint8_t* s = static_cast<const uint8_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] != 0 ? T(1) : T(0);
      return;
    }
    case DType::Half:
    case DType::BFloat16:
      if constexpr (std::is_same_v<T, float>) {
        if (dt == DType::Half)
          convert_16_to_float(static_cast<const c10::Half*>(src) + off, dst, n);
        else
          convert_16_to_float(static_cast<const c10::BFloat16*>(src) + off, dst, n);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = read_scalar<T>(src, dt, off + i);
      }
      return;
    case DType::Float: {
      const float* s = static_cast<const float*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      return;
    }
    case DType::Double: {
      const double* s = static_cast<const double*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      return;
    }
  }
}

// dst[off:off+n] = src[0:n] converted to dt (round to nearest even)
template <typename T>
void convert_out(const T* src, DType dt, void* dst, int64_t off, int64_t n) {
  switch (dt) {
    case DType::Half:
      at::vec::convert(src, static_cast<c10::Half*>(dst) + off, n);
      return;
    case DType::BFloat16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(dst) + off, n);
      return;
    case DType::Float: {
      float* d = static_cast<float*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
      return;
    }
    case DType::Double: {
      double* d = static_cast<double*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
      return;
    }
    case DType::Bool:
      TORCH_CHECK(false, "vae_fast: bool output");
  }
}

inline int64_t element_size(DType dt) {
  switch (dt) {
    case DType::Bool:
      return 1;
    case DType::Half:
    case DType::BFloat16:
      return 2;
    case DType::Float:
      return 4;
    case DType::Double:
      return 8;
  }
  return 1;
}

template <typename T>
constexpr DType dtype_of() {
  return std::is_same_v<T, float> ? DType::Float : DType::Double;
}

// One input of a stream, as T pointers per tile.
template <typename T>
class InStage {
 public:
  void init(const Operand& op, T* buf) {
    op_ = &op;
    buf_ = buf;
    direct_ = op.mode == ReadMode::Full && op.dtype == dtype_of<T>();
    constant_ = op.mode == ReadMode::Const ||
                (op.mode == ReadMode::Periodic && op.count == 1);
    // a run repeated element by element (the target of K samples, read for each): a tile
    // that does not wrap is read in place, as a full stream is
    repeat_ = !constant_ && op.mode == ReadMode::Periodic && op.inner == 1 &&
              op.dtype == dtype_of<T>();
    if (constant_) {
      T v = op.mode == ReadMode::Const ? static_cast<T>(op.value)
                                       : read_scalar<T>(op.data, op.dtype, 0);
      std::fill(buf_, buf_ + kTile, v);
    }
  }
  // Where to prefetch ahead of a tile that get() returned in place from a repeated run (the
  // next tiles follow it in memory until the run wraps), else nullptr.
  const char* repeat_source(const T* p) const {
    return repeat_ && p != buf_ ? reinterpret_cast<const char*>(p) : nullptr;
  }
  const T* get(int64_t off, int64_t n) const {
    if (constant_) return buf_;
    if (direct_) return static_cast<const T*>(op_->data) + off;
    if (repeat_) {
      const int64_t c = off % op_->count;
      if (c + n <= op_->count) return static_cast<const T*>(op_->data) + c;
    }
    if (op_->mode == ReadMode::Full) {
      convert_in(op_->data, op_->dtype, off, n, buf_);
    } else {
      fill_periodic(off, n);
    }
    return buf_;
  }

 private:
  // buf[j] = data[((off + j) / inner) % count]
  void fill_periodic(int64_t off, int64_t n) const {
    const int64_t inner = op_->inner, count = op_->count;
    int64_t q = off / inner;
    int64_t rem = off - q * inner;
    int64_t c = q % count;
    int64_t j = 0;
    if (inner == 1) {
      while (j < n) {
        int64_t len = std::min(n - j, count - c);
        convert_in(op_->data, op_->dtype, c, len, buf_ + j);
        j += len;
        c = 0;
      }
    } else {
      while (j < n) {
        int64_t len = std::min(n - j, inner - rem);
        std::fill(buf_ + j, buf_ + j + len, read_scalar<T>(op_->data, op_->dtype, c));
        j += len;
        rem = 0;
        c = (c + 1 == count) ? 0 : c + 1;
      }
    }
  }

  const Operand* op_ = nullptr;
  T* buf_ = nullptr;
  bool direct_ = false;
  bool constant_ = false;
  bool repeat_ = false;
};

// One full-size output of a stream.
template <typename T>
class OutStage {
 public:
  void init(const Output& out, T* buf) {
    out_ = &out;
    buf_ = buf;
    direct_ = out.dtype == dtype_of<T>();
  }
  T* get(int64_t off) const {
    if (out_->data == nullptr) return nullptr;
    return direct_ ? static_cast<T*>(out_->data) + off : buf_;
  }
  void commit(int64_t off, int64_t n) const {
    if (out_->data != nullptr && !direct_) convert_out(buf_, out_->dtype, out_->data, off, n);
  }

 private:
  const Output* out_ = nullptr;
  T* buf_ = nullptr;
  bool direct_ = false;
};

template <bool TAIL, typename T>
C10_ALWAYS_INLINE Vec<T> ld(const T* p, int64_t i, int64_t cnt) {
  if constexpr (TAIL) {
    return Vec<T>::loadu(p + i, cnt);
  } else {
    return Vec<T>::loadu(p + i);
  }
}
template <bool TAIL, typename T>
C10_ALWAYS_INLINE void st(Vec<T> v, T* p, int64_t i, int64_t cnt) {
  if constexpr (TAIL) {
    v.store(p + i, cnt);
  } else {
    v.store(p + i);
  }
}

// ---------------------------------------------------------------------------
// Reconstruction stream
// ---------------------------------------------------------------------------
template <typename T>
struct ReconTile {
  const T *x, *y, *s, *w, *pw;
  T *gx, *gy, *gs, *gw, *gpw, *le;
  T scale;
  T add_const;  // Gaussian full: 0.5*log(2*pi), else 0
  // x, y, s in the caller's memory at this tile (whatever their dtype) and their element
  // sizes, for software prefetching; nullptr where the stream is not read in full
  const char* pf[3];
  int64_t pf_size[3];
};

// Software prefetch, kPrefetchAhead elements ahead of the vector loop, of every input read
// in full.  The hardware prefetchers stop at 4 KiB pages and ramp up again on each, which
// leaves a compute-heavy loop waiting on memory when the inputs are not in cache (measured
// on a 2-core AVX-512 Xeon, inputs flushed from cache: 0.8M-element Bernoulli forward
// 485 -> 390 us, 6.3M 3.3 -> 2.9 ms; no change with warm caches).  Each step of the loop
// (two vectors: 128 bytes of a float stream) prefetches every cache line it will read: with
// one line per step, every other line (measured on a 2-core AMD EPYC, fp32 Bernoulli fwd+bwd
// at 6.3M, inputs flushed, median of 80 interleaved steps: 3.26 -> 2.88 ms; 0.8M 0.79 ->
// 0.76 ms).  Prefetches never fault, so running past the end of the tensor is harmless.
constexpr int64_t kPrefetchAhead = 1024;
constexpr int64_t kLine = 64;

template <typename T>
C10_ALWAYS_INLINE void prefetch_ahead(const ReconTile<T>& t, int64_t i) {
  constexpr int64_t step = 2 * Vec<T>::size();  // elements per step of recon_tile's loop
  for (int k = 0; k < 3; ++k) {
    if (t.pf[k] != nullptr) {
      const char* q = t.pf[k] + (i + kPrefetchAhead) * t.pf_size[k];
      __builtin_prefetch(q, 0, 3);
      if (step * t.pf_size[k] > kLine) __builtin_prefetch(q + kLine, 0, 3);
    }
  }
}

// Where the continuous Bernoulli switches from its closed forms to its series (recon_vec).
// The bound balances their errors: for float, at |z| = 1 the closed forms lose under one bit;
// for double, at 0.3 they and the series (first omitted term about 1e-15) are both about 1e-15.
template <typename T>
constexpr double cb_series_bound() {
  return std::is_same_v<T, double> ? 0.3 : 1.0;
}

// The continuous Bernoulli's series below cb_series_bound, in w = z^2, a = |z|:
//   P(w) = (log((1 - e)/a) + a/2) / w = log(sinh(a/2) / (a/2)) / w = 1/24 - w/2880 + ...
//   S(w) = (e/(1-e) - 1/a + 1/2) / a = (coth(a/2)/2 - 1/a) / a     = 1/12 - w/720 + ...
// float: minimax fits on |z| <= 1 with 3 terms each (w P within 1.7e-9, a S within 1.3e-8 once
// the coefficients are rounded to float; Taylor needs 5 terms for the same); double: Taylor,
// 5 terms, truncated below double's rounding at |z| <= 0.3.
template <typename T>
struct CbSeries;
template <>
struct CbSeries<float> {
  static constexpr float c[2][3] = {
      {4.166664928e-02f, -3.471114323e-04f, 5.318435797e-06f},
      {8.333324641e-02f, -1.388197299e-03f, 3.166888928e-05f}};
  template <int K>
  C10_ALWAYS_INLINE static Vf eval(Vf w) {
    return at::vec::fmadd(at::vec::fmadd(Vf(c[K][2]), w, Vf(c[K][1])), w, Vf(c[K][0]));
  }
};
template <>
struct CbSeries<double> {
  static constexpr double c[2][5] = {
      {1.0 / 24.0, -1.0 / 2880.0, 1.0 / 181440.0, -1.0 / 9676800.0, 1.0 / 479001600.0},
      {1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0, -1.0 / 1209600.0, 1.0 / 47900160.0}};
  template <int K>
  C10_ALWAYS_INLINE static Vd eval(Vd w) {
    Vd p(c[K][4]);
    for (int k = 3; k >= 0; --k) p = at::vec::fmadd(p, w, Vd(c[K][k]));
    return p;
  }
};

// Loss of one vector of elements (unscaled); writes the requested gradients,
// already multiplied by `scale`.
template <typename T, int KIND, bool HAS_W, bool HAS_PW, bool TAIL>
C10_ALWAYS_INLINE Vec<T> recon_vec(const ReconTile<T>& t, int64_t i, int64_t cnt) {
  using V = Vec<T>;
  using M = Math<T>;
  const V one(T(1));
  const V zero(T(0));
  const V scale(t.scale);
  const V x = ld<TAIL>(t.x, i, cnt);
  const V y = ld<TAIL>(t.y, i, cnt);
  V w = one;
  if constexpr (HAS_W) w = ld<TAIL>(t.w, i, cnt);

  if constexpr (KIND == kBernoulli) {
    // softplus(-|z|) = log1p(e), e = exp(-|z|), shared with the sigmoid.
    const V& z = x;
    const V e = M::exp_neg_abs(z);
    const V sp = M::log1p_unit(e);
    // (1-y) z + lw softplus(-z) with softplus(-z) = max(-z, 0) + log1p(e), summed as
    // [(1-y) z (z >= 0) or -pw y z (z < 0)] + lw log1p(e): the first part is exactly 0 for a
    // confident right prediction (y = 0, z < 0 or y = 1, z >= 0), so the small log1p(e) keeps
    // its precision, and an infinite logit gives inf where the loss is infinite (summing
    // (1-y) z + max(-z, 0) would give inf - inf).
    const V mz = at::vec::clamp_min(V(T(0)) - z, zero);
    const V spn = mz + sp;  // softplus(-z), for the target and pos_weight gradients
    const V omy = one - y;
    const auto pos = ge(z, zero);
    V lu;  // unweighted loss: [(1-y) z for z >= 0, -pw y z below] + lw log1p(e)
    V pwm1;
    // c = 1 - y (z >= 0) or -y (z < 0): without pos_weight the loss is c z + log1p(e) in one
    // FMA (the product c z is the one the select of two products gave, one rounding fewer)
    const V c = select(pos, omy, V(T(0)) - y);
    if constexpr (HAS_PW) {
      pwm1 = ld<TAIL>(t.pw, i, cnt) - one;
      const V lw = at::vec::fmadd(pwm1, y, one);  // 1 + (pw - 1) y
      const V pwy = (pwm1 + one) * y;
      lu = at::vec::fmadd(lw, sp, select(pos, omy * z, V(T(0)) - pwy * z));
    } else {
      lu = at::vec::fmadd(c, z, sp);
    }
    if (t.gx != nullptr) {
      // sigmoid(z) - y as (1 - y) - e r (z >= 0) or e r - y (z < 0), r = 1/(1 + e): for
      // confident logits with binary targets the result is the small e r itself, never a
      // difference of two numbers close to 1. Both are c -+ e r, one FMA with r's sign
      // flipped where z >= 0 (the same single rounding as fnmadd / fmsub of each branch).
      const V r = M::rcp(one + e);
      V g = at::vec::fmadd(e, select(pos, V(T(0)) - r, r), c);
      if constexpr (HAS_PW) {
        // (1-y) - lw (1 - sigmoid) = (sigmoid - y) - (pw - 1) y (1 - sigmoid)
        const V one_minus_sig = select(pos, e * r, r);
        g = at::vec::fnmadd(pwm1 * y, one_minus_sig, g);
      }
      if constexpr (HAS_W) g = g * w;
      st<TAIL>(g * scale, t.gx, i, cnt);
    }
    if (t.gy != nullptr) {
      V g;
      if constexpr (HAS_PW) {
        g = at::vec::fmadd(pwm1, spn, V(T(0)) - z);  // -z + (pw-1) softplus(-z)
      } else {
        g = V(T(0)) - z;
      }
      if constexpr (HAS_W) g = g * w;
      st<TAIL>(g * scale, t.gy, i, cnt);
    }
    if constexpr (HAS_PW) {
      if (t.gpw != nullptr) st<TAIL>(((w * y) * spn) * scale, t.gpw, i, cnt);
    }
    if (t.gw != nullptr) st<TAIL>(lu * scale, t.gw, i, cnt);
    if constexpr (HAS_W) {
      return w * lu;
    } else {
      return lu;
    }
  } else if constexpr (KIND == kBernoulliProbs) {
    // F.binary_cross_entropy: logs clamped at -100, gradient over
    // max(x(1-x), 1e-12).  Not the hot path: Sleef's log/log1p via ATen.
    const V lx = x.log();
    const V l1x = (V(T(0)) - x).log1p();
    const V lxc = at::vec::clamp_min(lx, V(T(-100)));
    const V l1xc = at::vec::clamp_min(l1x, V(T(-100)));
    const V lu = V(T(0)) - at::vec::fmadd(y, lxc, (one - y) * l1xc);
    if (t.gx != nullptr) {
      const V den = at::vec::clamp_min((one - x) * x, V(T(1e-12)));
      V g = (x - y) / den;
      if constexpr (HAS_W) g = g * w;
      st<TAIL>(g * scale, t.gx, i, cnt);
    }
    if (t.gy != nullptr) {
      V g = l1x - lx;
      if constexpr (HAS_W) g = g * w;
      st<TAIL>(g * scale, t.gy, i, cnt);
    }
    if (t.gw != nullptr) st<TAIL>(lu * scale, t.gw, i, cnt);
    if constexpr (HAS_W) {
      return w * lu;
    } else {
      return lu;
    }
  } else if constexpr (KIND == kContinuousBernoulli) {
    // BCE-with-logits(z, y) - log C(z), log C(z) = log(z / tanh(z/2)), with a = |z|,
    // e = exp(-a) and c = 1 - y (z >= 0) or -y (z < 0) (Loaiza-Ganem & Cunningham 2019):
    //   loss  = c z + q,  q = log((1 - e) / a)
    //   d/dz  = c + u (z >= 0) or c - u (z < 0),  u = e / (1 - e) - 1/a in (-1/2, 0)
    // Below cb_series_bound both closed forms cancel (1 - e, and e/(1-e) against 1/a), so there
    // the series in w = z^2 take over: q = a (a P(w) - 1/2), u = a S(w) - 1/2 (CbSeries).
    // Written so that the two branches share everything but their last steps: per lane both
    // are evaluated (random logits mix them inside every vector), so every instruction counts.
    const V& z = x;
    const V a = z.abs();
    // a capped at the largest float: e a and (1-e) a stay finite at |z| = inf (e is clamped
    // at 2e-37, so e a <= 68), giving r = about 0 and the finite limits 1 - y and -y of the
    // gradient (off by at most that clamp's 2e-37) instead of 0 * inf, one min for both products
    const V ac = min_keep_nan(a, V(std::numeric_limits<T>::max()));
    const V e = M::exp_neg(a);
    const V ome = one - e;
    const V half(T(0.5));
    const V w = z * z;
    const auto pos = ge(z, zero);
    const auto series = lt(a, V(cb_series_bound<T>()));
    const V c = select(pos, one, zero) - y;
    // one reciprocal for both quotients (rcp + Newton: a division's accuracy at a fraction of
    // its cost, which was about a tenth of the step)
    const V r = M::rcp(ome * ac);
    // the closed form's q is wanted to absolute accuracy only: there |z| >= 1, and the loss, a
    // sum of terms of about that size (c z and q), is accurate relative to them anyway
    const V q = select(series, a * at::vec::fmsub(a, CbSeries<T>::template eval<0>(w), half),
                       M::log_abs((ome * ome) * r));
    const V lu = at::vec::fmadd(c, z, q);
    if (t.gx != nullptr) {
      // e/(1-e) - 1/a = (e a - (1-e)) / ((1-e) a)
      const V u = select(series, at::vec::fmsub(a, CbSeries<T>::template eval<1>(w), half),
                         at::vec::fmsub(e, ac, ome) * r);
      st<TAIL>(select(pos, c + u, c - u) * scale, t.gx, i, cnt);
    }
    if (t.gy != nullptr) st<TAIL>((V(T(0)) - z) * scale, t.gy, i, cnt);
    return lu;
  } else {
    static_assert(KIND == kGaussian);
    const V s = ld<TAIL>(t.s, i, cnt);
    const V d = y - x;  // target - mean
    const V ei = M::exp(V(T(0)) - s);
    const V de = d * ei;
    const V q = d * de;
    const V half(T(0.5));
    const V l = at::vec::fmadd(half, s + q, V(t.add_const));
    if (t.gx != nullptr) st<TAIL>((V(T(0)) - de) * scale, t.gx, i, cnt);
    if (t.gy != nullptr) st<TAIL>(de * scale, t.gy, i, cnt);
    if (t.gs != nullptr) st<TAIL>((half * (one - q)) * scale, t.gs, i, cnt);
    return l;
  }
}

// Sum of the losses of a tile (unscaled).  Two vectors are added in T before going into
// the (double) accumulator, which halves the cost of widening; with ELEM the loss of each
// element is also written out (times the scale).
template <typename T, int KIND, bool HAS_W, bool HAS_PW, bool ELEM>
double recon_tile(const ReconTile<T>& t, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V scale(t.scale);
  SumAcc<T> acc;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    prefetch_ahead(t, i);
    V a = recon_vec<T, KIND, HAS_W, HAS_PW, false>(t, i, L);
    V b = recon_vec<T, KIND, HAS_W, HAS_PW, false>(t, i + L, L);
    if constexpr (ELEM) {
      st<false>(a * scale, t.le, i, L);
      st<false>(b * scale, t.le, i + L, L);
    }
    acc.add(a + b);
  }
  if (i + L <= n) {
    V a = recon_vec<T, KIND, HAS_W, HAS_PW, false>(t, i, L);
    if constexpr (ELEM) st<false>(a * scale, t.le, i, L);
    acc.add(a);
    i += L;
  }
  if (i < n) {
    const int64_t cnt = n - i;
    V l = recon_vec<T, KIND, HAS_W, HAS_PW, true>(t, i, cnt);
    if constexpr (ELEM) st<true>(l * scale, t.le, i, cnt);
    acc.add(V::set(V(T(0)), l, cnt));
  }
  return acc.total();
}

template <typename T>
using ReconTileFn = double (*)(const ReconTile<T>&, int64_t);

template <typename T, int KIND, bool HAS_W, bool HAS_PW>
ReconTileFn<T> pick_elem(bool elementwise) {
  return elementwise ? &recon_tile<T, KIND, HAS_W, HAS_PW, true>
                     : &recon_tile<T, KIND, HAS_W, HAS_PW, false>;
}

template <typename T>
ReconTileFn<T> pick_recon_kernel(int kind, bool has_w, bool has_pw, bool elementwise) {
  switch (kind) {
    case kBernoulli:
      if (has_w) {
        return has_pw ? pick_elem<T, kBernoulli, true, true>(elementwise)
                      : pick_elem<T, kBernoulli, true, false>(elementwise);
      }
      return has_pw ? pick_elem<T, kBernoulli, false, true>(elementwise)
                    : pick_elem<T, kBernoulli, false, false>(elementwise);
    case kBernoulliProbs:
      return has_w ? pick_elem<T, kBernoulliProbs, true, false>(elementwise)
                   : pick_elem<T, kBernoulliProbs, false, false>(elementwise);
    case kGaussian:
      return pick_elem<T, kGaussian, false, false>(elementwise);
    case kContinuousBernoulli:
      return pick_elem<T, kContinuousBernoulli, false, false>(elementwise);
    default:
      TORCH_CHECK(false, "vae_fast: unknown reconstruction kind ", kind);
  }
}

template <typename T>
class ReconChunkRunner {
 public:
  ReconChunkRunner(const ReconStream& rs, ReconTileFn<T> fn, T* storage) : rs_(rs), fn_(fn) {
    x_.init(rs.x, storage + 0 * kTile);
    y_.init(rs.y, storage + 1 * kTile);
    s_.init(rs.s, storage + 2 * kTile);
    w_.init(rs.w, storage + 3 * kTile);
    pw_.init(rs.pw, storage + 4 * kTile);
    gx_.init(rs.gx, storage + 5 * kTile);
    gy_.init(rs.gy, storage + 6 * kTile);
    gs_.init(rs.gs, storage + 7 * kTile);
    gw_.init(rs.gw, storage + 8 * kTile);
    gpw_.init(rs.gpw, storage + 9 * kTile);
    le_.init(rs.elem_loss, storage + 10 * kTile);
    const Operand* streams[3] = {&rs.x, &rs.y, &rs.s};
    for (int k = 0; k < 3; ++k) {
      const bool full = streams[k]->mode == ReadMode::Full && (k < 2 || rs.kind == kGaussian);
      pf_base_[k] = full ? static_cast<const char*>(streams[k]->data) : nullptr;
      pf_size_[k] = element_size(streams[k]->dtype);
    }
  }
  static constexpr int64_t kBuffers = 11;

  double run(int64_t begin, int64_t len) const {
    double sum = 0.0;
    ReconTile<T> t;
    t.scale = static_cast<T>(rs_.scale);
    t.add_const = (rs_.kind == kGaussian && rs_.full) ? static_cast<T>(kHalfLog2Pi) : T(0);
    for (int k = 0; k < 3; ++k) t.pf_size[k] = pf_size_[k];
    for (int64_t off = begin; off < begin + len; off += kTile) {
      const int64_t n = std::min(kTile, begin + len - off);
      t.x = x_.get(off, n);
      t.y = y_.get(off, n);
      t.s = rs_.kind == kGaussian ? s_.get(off, n) : nullptr;
      t.w = rs_.w.mode != ReadMode::Const ? w_.get(off, n) : nullptr;
      t.pw = rs_.pw.mode != ReadMode::Const ? pw_.get(off, n) : nullptr;
      t.gx = gx_.get(off);
      t.gy = gy_.get(off);
      t.gs = gs_.get(off);
      t.gw = gw_.get(off);
      t.gpw = gpw_.get(off);
      t.le = le_.get(off);
      for (int k = 0; k < 3; ++k) {
        t.pf[k] = pf_base_[k] != nullptr ? pf_base_[k] + off * pf_size_[k] : nullptr;
      }
      if (t.pf[1] == nullptr) t.pf[1] = y_.repeat_source(t.y);
      sum += fn_(t, n);
      gx_.commit(off, n);
      gy_.commit(off, n);
      gs_.commit(off, n);
      gw_.commit(off, n);
      gpw_.commit(off, n);
      le_.commit(off, n);
    }
    return sum;
  }

 private:
  const ReconStream& rs_;
  ReconTileFn<T> fn_;
  InStage<T> x_, y_, s_, w_, pw_;
  OutStage<T> gx_, gy_, gs_, gw_, gpw_, le_;
  const char* pf_base_[3];
  int64_t pf_size_[3];
};

// ---------------------------------------------------------------------------
// KL stream: KL(N(mu, e^lv) || N(pmu, e^plv)) per element
// ---------------------------------------------------------------------------
template <typename T>
struct KLTile {
  const T *mu, *lv, *pmu, *plv;
  T *gmu, *glv, *gpmu, *gplv;
  T scale;
};

template <typename T, bool TAIL>
C10_ALWAYS_INLINE Vec<T> kl_vec(const KLTile<T>& t, int64_t i, int64_t cnt) {
  using V = Vec<T>;
  using M = Math<T>;
  const V half(T(0.5));
  const V scale(t.scale);
  const V mu = ld<TAIL>(t.mu, i, cnt);
  const V lv = ld<TAIL>(t.lv, i, cnt);
  const V pmu = ld<TAIL>(t.pmu, i, cnt);
  const V plv = ld<TAIL>(t.plv, i, cnt);
  const V d = lv - plv;
  const V ep = M::exp(V(T(0)) - plv);
  const V dm = mu - pmu;
  const V dme = dm * ep;
  const V q = dm * dme;
  V em1, em1_minus_d;
  M::expm1_pair(d, em1, em1_minus_d);
  if (t.gmu != nullptr) st<TAIL>(dme * scale, t.gmu, i, cnt);
  if (t.glv != nullptr) st<TAIL>((half * em1) * scale, t.glv, i, cnt);
  if (t.gpmu != nullptr) st<TAIL>((V(T(0)) - dme) * scale, t.gpmu, i, cnt);
  if (t.gplv != nullptr) st<TAIL>((V(T(0)) - half * (em1 + q)) * scale, t.gplv, i, cnt);
  return half * (em1_minus_d + q);
}

template <typename T>
double kl_tile(const KLTile<T>& t, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  SumAcc<T> acc;
  int64_t i = 0;
  for (; i + L <= n; i += L) acc.add(kl_vec<T, false>(t, i, L));
  if (i < n) {
    const int64_t cnt = n - i;
    acc.add(V::set(V(T(0)), kl_vec<T, true>(t, i, cnt), cnt));
  }
  return acc.total();
}

template <typename T>
class KLChunkRunner {
 public:
  KLChunkRunner(const KLStream& ks, T* storage) : ks_(ks) {
    mu_.init(ks.mu, storage + 0 * kTile);
    lv_.init(ks.lv, storage + 1 * kTile);
    pmu_.init(ks.pmu, storage + 2 * kTile);
    plv_.init(ks.plv, storage + 3 * kTile);
    gmu_.init(ks.gmu, storage + 4 * kTile);
    glv_.init(ks.glv, storage + 5 * kTile);
    gpmu_.init(ks.gpmu, storage + 6 * kTile);
    gplv_.init(ks.gplv, storage + 7 * kTile);
  }
  static constexpr int64_t kBuffers = 8;

  double run(int64_t begin, int64_t len) const {
    double sum = 0.0;
    KLTile<T> t;
    t.scale = static_cast<T>(ks_.scale);
    for (int64_t off = begin; off < begin + len; off += kTile) {
      const int64_t n = std::min(kTile, begin + len - off);
      t.mu = mu_.get(off, n);
      t.lv = lv_.get(off, n);
      t.pmu = pmu_.get(off, n);
      t.plv = plv_.get(off, n);
      t.gmu = gmu_.get(off);
      t.glv = glv_.get(off);
      t.gpmu = gpmu_.get(off);
      t.gplv = gplv_.get(off);
      sum += kl_tile(t, n);
      gmu_.commit(off, n);
      glv_.commit(off, n);
      gpmu_.commit(off, n);
      gplv_.commit(off, n);
    }
    return sum;
  }

 private:
  const KLStream& ks_;
  InStage<T> mu_, lv_, pmu_, plv_;
  OutStage<T> gmu_, glv_, gpmu_, gplv_;
};

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------
struct ChunkGrid {
  int64_t nseg = 0;     // segments (1 or rows)
  int64_t seg_len = 0;  // elements per segment
  int64_t per_seg = 0;  // chunks per segment
  int64_t total() const {
    return nseg * per_seg;
  }
  // element range [begin, begin + len) of chunk c
  void chunk(int64_t c, int64_t& begin, int64_t& len) const {
    const int64_t seg = c / per_seg;
    const int64_t j = c - seg * per_seg;
    begin = seg * seg_len + j * kChunk;
    len = std::min(kChunk, seg_len - j * kChunk);
  }
};

ChunkGrid make_grid(bool present, int64_t n, int64_t rows, int64_t row_len, int red_mode) {
  ChunkGrid g;
  if (!present) return g;
  if (red_mode == kRows) {
    g.nseg = rows;
    g.seg_len = row_len;
  } else {
    g.nseg = 1;
    g.seg_len = n;
  }
  g.per_seg = (g.seg_len + kChunk - 1) / kChunk;
  return g;
}

void combine(const ChunkGrid& g, const double* partials, std::vector<double>& sums) {
  for (int64_t seg = 0; seg < g.nseg; ++seg) {
    double s = 0.0;
    for (int64_t j = 0; j < g.per_seg; ++j) s += partials[seg * g.per_seg + j];
    sums[seg] = s;
  }
}

template <typename T>
void run_forward(const ReconStream& rs, const KLStream& ks, int red_mode, int64_t rows,
                 std::vector<double>& sums_r, std::vector<double>& sums_k) {
  const ChunkGrid gr = make_grid(rs.kind != kNone, rs.n, rows, rs.row_len, red_mode);
  const ChunkGrid gk = make_grid(ks.present, ks.n, rows, ks.row_len, red_mode);
  const int64_t nr = gr.total();
  const int64_t total = nr + gk.total();
  std::vector<double> partials(static_cast<size_t>(total), 0.0);
  if (total > 0) {
    ReconTileFn<T> fn = nullptr;
    if (rs.kind != kNone) {
      fn = pick_recon_kernel<T>(rs.kind, rs.w.mode != ReadMode::Const,
                                rs.pw.mode != ReadMode::Const, rs.elem_loss.data != nullptr);
    }
    const int64_t elems = (rs.kind != kNone ? rs.n : 0) + (ks.present ? ks.n : 0);
    const int64_t avg = std::max<int64_t>(1, elems / total);
    const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / avg);
    double* part = partials.data();
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      constexpr int64_t nbuf = ReconChunkRunner<T>::kBuffers + KLChunkRunner<T>::kBuffers;
      std::unique_ptr<T[]> storage(new T[nbuf * kTile]);
      std::unique_ptr<ReconChunkRunner<T>> rr;
      std::unique_ptr<KLChunkRunner<T>> kr;
      for (int64_t c = begin; c < end; ++c) {
        int64_t b, len;
        if (c < nr) {
          if (!rr) rr = std::make_unique<ReconChunkRunner<T>>(rs, fn, storage.get());
          gr.chunk(c, b, len);
          part[c] = rr->run(b, len);
        } else {
          if (!kr) {
            kr = std::make_unique<KLChunkRunner<T>>(
                ks, storage.get() + ReconChunkRunner<T>::kBuffers * kTile);
          }
          gk.chunk(c - nr, b, len);
          part[c] = kr->run(b, len);
        }
      }
    });
  }
  const int64_t nseg = red_mode == kRows ? rows : 1;
  sums_r.assign(static_cast<size_t>(nseg), 0.0);
  sums_k.assign(static_cast<size_t>(nseg), 0.0);
  if (nr > 0) combine(gr, partials.data(), sums_r);
  if (gk.total() > 0) combine(gk, partials.data() + nr, sums_k);
}

// ---------------------------------------------------------------------------
// scale_
// ---------------------------------------------------------------------------
template <typename S>
void mul_range(S* p, int64_t n, double c) {
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t i = 0; i < n; ++i) p[i] *= c;
  } else if constexpr (std::is_same_v<S, float>) {
    const float cf = static_cast<float>(c);
    for (int64_t i = 0; i < n; ++i) p[i] *= cf;
  } else {
    // 16-bit: widen to float, multiply, round back
    const Vf cf(static_cast<float>(c));
    constexpr int64_t L = Vec<S>::size();
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      auto [a, b] = at::vec::convert_to_float<S>(Vec<S>::loadu(p + i));
      at::vec::convert_from_float<S>(a * cf, b * cf).store(p + i);
    }
    for (; i < n; ++i) p[i] = static_cast<S>(static_cast<float>(p[i]) * static_cast<float>(c));
  }
}

void mul_range_dt(void* buf, DType dt, int64_t off, int64_t n, double c) {
  switch (dt) {
    case DType::Float:
      mul_range(static_cast<float*>(buf) + off, n, c);
      return;
    case DType::Double:
      mul_range(static_cast<double*>(buf) + off, n, c);
      return;
    case DType::Half:
      mul_range(static_cast<c10::Half*>(buf) + off, n, c);
      return;
    case DType::BFloat16:
      mul_range(static_cast<c10::BFloat16*>(buf) + off, n, c);
      return;
    case DType::Bool:
      TORCH_CHECK(false, "vae_fast: cannot scale a bool buffer");
  }
}

// buf[off + j] *= a[off + j] + b[off + j]
template <typename C>
void mul_elementwise(void* buf, DType dt, int64_t off, int64_t n, const C* a, const C* b) {
  if (dt == DType::Float && std::is_same_v<C, float>) {
    float* p = static_cast<float*>(buf) + off;
    for (int64_t j = 0; j < n; ++j) {
      const float c = (a ? static_cast<float>(a[off + j]) : 0.f) +
                      (b ? static_cast<float>(b[off + j]) : 0.f);
      p[j] *= c;
    }
    return;
  }
  double tile[kTile];
  double coef[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    for (int64_t j = 0; j < m; ++j) {
      // the coefficient is rounded to its own dtype, as a tensor sum would be
      const C c = static_cast<C>((a ? a[off + t + j] : C(0)) + (b ? b[off + t + j] : C(0)));
      coef[j] = static_cast<double>(c);
    }
    convert_in(buf, dt, off + t, m, tile);
    for (int64_t j = 0; j < m; ++j) tile[j] *= coef[j];
    convert_out(tile, dt, buf, off + t, m);
  }
}

// ---------------------------------------------------------------------------
// The importance-weighted bound (cpu_kernels.h: IwaeStream)
// ---------------------------------------------------------------------------
template <typename T>
void run_iwae(const IwaeStream& is) {
  const ReconStream& rs = *is.rs;
  const int64_t K = is.samples, B = is.batch, len = rs.row_len;
  const ReconTileFn<T> fn = pick_recon_kernel<T>(rs.kind, false, false, false);
  const Output* grads[2] = {&rs.gx, &rs.gs};
  // whole examples per task: an example's K rows and their gradients stay in this core's cache
  // (K * row_len elements: 5 x 12288 = 240 KB of float gradients for 64 x 64 RGB images)
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(K * len, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::unique_ptr<T[]> storage(new T[ReconChunkRunner<T>::kBuffers * kTile]);
    const ReconChunkRunner<T> rr(rs, fn, storage.get());
    std::vector<double> nll(static_cast<size_t>(K)), coef(static_cast<size_t>(K));
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = (k * B + b) * len;
        double s = 0.0;  // chunk partials added in order, as combine() adds run_forward's
        for (int64_t j = 0; j < len; j += kChunk) s += rr.run(row + j, std::min(kChunk, len - j));
        nll[k] = s;
      }
      is.finish(b, nll.data(), coef.data(), is.ctx);
      for (int64_t k = 0; k < K; ++k) {
        if (coef[k] == 1.0) continue;
        for (const Output* o : grads) {
          if (o->data != nullptr) mul_range_dt(o->data, o->dtype, (k * B + b) * len, len, coef[k]);
        }
      }
    }
  });
}

// The discretized logistic mixture (kDmol).
#include "dmol_impl.h"

}  // namespace

void fused_forward_kernel(const ReconStream& rs, const KLStream& ks, int red_mode, int64_t rows,
                          bool acc_double, std::vector<double>& sums_r,
                          std::vector<double>& sums_k) {
  if (acc_double) {
    run_forward<double>(rs, ks, red_mode, rows, sums_r, sums_k);
  } else {
    run_forward<float>(rs, ks, red_mode, rows, sums_r, sums_k);
  }
}

void dmol_forward_kernel(const DmolStream& ds, bool acc_double, std::vector<double>& sums) {
  if (acc_double) {
    run_dmol_forward<double>(ds, sums);
  } else {
    run_dmol_forward<float>(ds, sums);
  }
}

void iwae_forward_kernel(const IwaeStream& is, bool acc_double) {
  if (acc_double) {
    run_iwae<double>(is);
  } else {
    run_iwae<float>(is);
  }
}

void scale_kernel(void* buf, DType dt, int64_t n, const ScaleSpec& spec) {
  if (n == 0) return;
  if (spec.elementwise) {
    at::parallel_for(0, n, kMinElemsPerTask, [&](int64_t begin, int64_t end) {
      if (spec.elem_dtype == DType::Double) {
        mul_elementwise(buf, dt, begin, end - begin, static_cast<const double*>(spec.elem_a),
                        static_cast<const double*>(spec.elem_b));
      } else {
        mul_elementwise(buf, dt, begin, end - begin, static_cast<const float*>(spec.elem_a),
                        static_cast<const float*>(spec.elem_b));
      }
    });
    return;
  }
  bool all_one = true;
  for (int64_t k = 0; k < spec.n_coef; ++k) all_one = all_one && spec.coef[k] == 1.0;
  if (all_one) return;  // no memory traffic at all
  const int64_t seg_len = spec.n_coef == 1 ? n : spec.row_len;
  at::parallel_for(0, n, kMinElemsPerTask, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / seg_len;
      const int64_t stop = std::min(end, (row + 1) * seg_len);
      const double c = spec.coef[row];
      if (c != 1.0) mul_range_dt(buf, dt, i, stop - i, c);
      i = stop;
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast
