// Vector math for the fused VAE loss kernels.
//
// Built on ATen's at::vec::Vectorized<T>.  The float versions are our own
// polynomial kernels (Sleef's u10 functions are accurate but handle every
// corner case in software, which costs more than the whole loss); the double
// versions call Sleef through Vectorized<double>, where speed matters less
// than the last bit.
//
// Accuracy of the float kernels (max error over dense sweeps in float64, measured by
// tests/test_cpu_raw.py; the design bound in brackets):
//   exp_f32:          0.96 ulp over [-30, 30]  [polynomial 1e-8 relative + final rounding]
//   softplus / BCE-with-logits loss built from exp_neg_abs_f32 + log1p_unit_f32:
//                     1.7 ulp over logits in [-84, 84]  [polynomials 2e-8 each]
//   expm1_pair_f32:   expm1(d) 1.4 ulp; expm1(d) - d 1.9 ulp for |d| <= ln2/2 (the
//                     polynomial tail itself, no cancellation) and 6.1 ulp above, where the
//                     subtraction loses up to ~3 bits (torch's float32 expm1(d) - d loses
//                     all of them as d -> 0)
//   rcp_f32:          rcp14 + one Newton step, <= 1 ulp; sigmoid(z) - y ends within 2.5 ulp,
//                     as torch's own float32 sigmoid does.
//   exp_neg_f32, log_abs_f32: the continuous Bernoulli's, to absolute accuracy only (2.3e-7
//                     relative, 6.5e-8 absolute; see each); its loss and gradient end within
//                     2.1 and 1.1 ulp of their size (tests/test_objectives.py's measure).
// NaN propagates through every kernel (clamps are written max(bound, x) so
// that x86's "return the second operand" rule keeps a NaN x); +-Inf gives the
// IEEE limit.
#pragma once

// Pick the widest at::vec implementation that this translation unit is
// compiled for (its -m flags decide: setup.py builds kernels_impl.h once per
// instruction set).  ATen's inline namespace, and ours below, get the build's
// own name, so no function compiled for one instruction set can stand in for
// another's (or for libtorch's own AVX2/AVX512 copies) at link time.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && !defined(VAE_FAST_NO_AVX512)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY vae_fast_avx512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(VAE_FAST_NO_AVX2)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY vae_fast_avx2
#else
#define CPU_CAPABILITY vae_fast_default
#endif

#include <ATen/cpu/vec/functional.h>
#include <c10/macros/Macros.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace vae_fast {
namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;
using Vf = Vec<float>;
using Vd = Vec<double>;

// ---------------------------------------------------------------------------
// Lane masks.  On AVX-512 a comparison yields a k-register and selects are a
// single masked blend; elsewhere ATen's all-ones-lane vectors and blendv.
// All comparisons are ordered: false when either side is NaN.
// ---------------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
struct MaskOf;
template <>
struct MaskOf<float> {
  using type = __mmask16;
};
template <>
struct MaskOf<double> {
  using type = __mmask8;
};
template <typename T>
using Mask = typename MaskOf<T>::type;

inline __mmask16 lt(Vf a, Vf b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ);
}
inline __mmask16 ge(Vf a, Vf b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ);
}
inline __mmask8 lt(Vd a, Vd b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ);
}
inline __mmask8 ge(Vd a, Vd b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ);
}
// m ? a : b
inline Vf select(__mmask16 m, Vf a, Vf b) {
  return _mm512_mask_blend_ps(m, b, a);
}
inline Vd select(__mmask8 m, Vd a, Vd b) {
  return _mm512_mask_blend_pd(m, b, a);
}
// m ? a + b : a
inline Vf add_where(__mmask16 m, Vf a, Vf b) {
  return _mm512_mask_add_ps(a, m, a, b);
}
inline Vd add_where(__mmask8 m, Vd a, Vd b) {
  return _mm512_mask_add_pd(a, m, a, b);
}
#else
template <typename T>
using Mask = Vec<T>;
template <typename T>
inline Vec<T> lt(Vec<T> a, Vec<T> b) {
  return a < b;
}
template <typename T>
inline Vec<T> ge(Vec<T> a, Vec<T> b) {
  return a >= b;
}
template <typename T>
inline Vec<T> select(Vec<T> m, Vec<T> a, Vec<T> b) {
  return Vec<T>::blendv(b, a, m);
}
template <typename T>
inline Vec<T> add_where(Vec<T> m, Vec<T> a, Vec<T> b) {
  return a + (b & m);
}
#endif

// max(lo, x) that keeps a NaN x (x86 max returns its second operand on NaN;
// ATen's clamp_min is written that way on every backend).
template <typename T>
inline Vec<T> max_keep_nan(Vec<T> x, Vec<T> lo) {
  return at::vec::clamp_min(x, lo);
}
template <typename T>
inline Vec<T> min_keep_nan(Vec<T> x, Vec<T> hi) {
  return at::vec::clamp_max(x, hi);
}

// ---------------------------------------------------------------------------
// float kernels
// ---------------------------------------------------------------------------

// p * 2^n for integral n.
C10_ALWAYS_INLINE Vf ldexp_f32(Vf p, Vf n) {
#if defined(CPU_CAPABILITY_AVX512)
  // scalef handles overflow (inf), gradual underflow and NaN exactly.
  return _mm512_scalef_ps(p, n);
#else
  // Build 2^(n-1) from exponent bits and multiply by 2p, so n = 128 (x just
  // below ln(FLT_MAX)) still works; n <= -126 flushes to zero.
  Vf nm1 = at::vec::clamp(n - Vf(1.f), Vf(-127.f), Vf(127.f));
  auto bits = at::vec::convert_to_int_of_same_size(nm1) + Vec<int32_t>(127);
  Vf scale = at::vec::cast<float>(bits << Vec<int32_t>(23));
  return (p + p) * scale;
#endif
}

// Coefficients of E(r) = (expm1(r) - r) / r^2 = 1/2 + r*(c1 + r*(c2 + ...)) on
// |r| <= ln2/2 (Chebyshev fits with c0 = 1/2 pinned, rounded to float).
//   degree 5: E itself, and so the tail expm1(r) - r that the KL needs, within 1e-8 relative;
//   degree 4: exp(r) = 1 + r + r^2 E(r) within 2e-8 relative (the tail only to 3e-7), enough
//             where only exp itself is used (softplus / sigmoid of logits).
template <int DEG>
struct ExpPoly;
template <>
struct ExpPoly<5> {
  static constexpr float c[5] = {1.666666716e-01f, 4.166655615e-02f, 8.333320729e-03f,
                                 1.392617589e-03f, 1.988269069e-04f};
};
template <>
struct ExpPoly<4> {
  static constexpr float c[4] = {1.666663140e-01f, 4.166662320e-02f, 8.357199840e-03f,
                                 1.391871367e-03f};
};

// x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite: n*ln2_hi is exact), and the
// polynomial tail h = expm1(r) - r.
struct ExpParts {
  Vf n, r, h;
};
template <int DEG = 5>
C10_ALWAYS_INLINE ExpParts exp_parts_f32(Vf x) {
  const Vf log2e(1.44269504088896341f);
  const Vf ln2_hi(0.693359375f);
  const Vf ln2_lo(-2.12194440e-4f);
  Vf n = (x * log2e).round();
  Vf r = at::vec::fnmadd(n, ln2_hi, x);
  r = at::vec::fnmadd(n, ln2_lo, r);
  constexpr const float* c = ExpPoly<DEG>::c;
  Vf e(c[DEG - 1]);
  for (int k = DEG - 2; k >= 0; --k) e = at::vec::fmadd(e, r, Vf(c[k]));
  e = at::vec::fmadd(e, r, Vf(0.5f));
  return {n, r, (r * r) * e};
}

// exp over the whole float range (denormal results on AVX-512; flushed to
// zero below ~1e-38 on the generic path).
C10_ALWAYS_INLINE Vf exp_f32(Vf x) {
#if defined(CPU_CAPABILITY_AVX512)
  x = max_keep_nan(x, Vf(-104.f));
#else
  x = max_keep_nan(x, Vf(-87.3f));
#endif
  x = min_keep_nan(x, Vf(89.f));  // exp(89) overflows to inf, as it should
  ExpParts p = exp_parts_f32(x);
  return ldexp_f32(Vf(1.f) + (p.r + p.h), p.n);
}

// expm1(d) and expm1(d) - d.  The second one is what the Gaussian KL needs:
// for |d| <= ln2/2 it is the polynomial tail itself, with no cancellation.
C10_ALWAYS_INLINE void expm1_pair_f32(Vf d, Vf& em1, Vf& em1_minus_d) {
  // the clamp only keeps the range reduction finite; the subtraction uses the real d, so
  // d = -inf gives expm1(d) - d = +inf like the unfused formula
  const Vf dc = min_keep_nan(max_keep_nan(d, Vf(-104.f)), Vf(89.f));
  ExpParts p = exp_parts_f32(dc);
  const Vf s = ldexp_f32(Vf(1.f), min_keep_nan(p.n, Vf(64.f)));  // 2^n, exact
  const Vf em1_small = at::vec::fmadd(s, p.r + p.h, s - Vf(1.f));  // 2^n*expm1(r) + (2^n - 1)
  // From n = 64 on the -1 is far below an ulp, and 2^n itself overflows at n = 128 (d in
  // [88.38, 88.72], where expm1(d) is still finite): there exp(d) is formed as exp_f32 does.
  em1 = select(lt(p.n, Vf(64.f)), em1_small, ldexp_f32(Vf(1.f) + (p.r + p.h), p.n));
  auto small = lt(d.abs(), Vf(0.34657359f));               // n == 0
  em1_minus_d = select(small, p.h, em1 - d);
}

// log1p(f) = f + f^2 (-1/2 + f R(f)) on [sqrt(1/2) - 1, sqrt(2) - 1], with
// R(f) = c0 + f*(c1 + ...) a Chebyshev fit of degree 7 (the whole expression
// is within 2e-8 relative of log1p with these float coefficients).
struct Log1pPoly {
  static constexpr float c7 = -7.902743667e-02f;
  static constexpr float c6 = 1.262231916e-01f;
  static constexpr float c5 = -1.299818307e-01f;
  static constexpr float c4 = 1.421449631e-01f;
  static constexpr float c3 = -1.664128155e-01f;
  static constexpr float c2 = 2.000104487e-01f;
  static constexpr float c1 = -2.500030696e-01f;
  static constexpr float c0 = 3.333333135e-01f;
};

// log1p(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: f + f^2 Q(f), one rounding.
C10_ALWAYS_INLINE Vf log1p_reduced_f32(Vf f) {
  Vf q = at::vec::fmadd(Vf(Log1pPoly::c7), f, Vf(Log1pPoly::c6));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c5));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c4));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c3));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c2));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c1));
  q = at::vec::fmadd(q, f, Vf(Log1pPoly::c0));
  q = at::vec::fmadd(q, f, Vf(-0.5f));
  return at::vec::fmadd(f * q, f, f);
}

// log1p(e) for e in [0, 1] (e = exp(-|z|) in softplus).  1 + e is split as
// 2^k (1 + f) with f = e (k = 0) or f = (e - 1)/2 (k = 1), so f is formed from
// e directly and never loses the low bits of a small e.  Written so that no
// intermediate is subnormal for e >= 1e-37 (a product f*f would be for
// e < 1e-19 and would hit the microcode assist on every such lane).
C10_ALWAYS_INLINE Vf log1p_unit_f32(Vf e) {
  auto k = ge(e, Vf(0.41421356f));
  Vf f = select(k, at::vec::fmadd(e, Vf(0.5f), Vf(-0.5f)), e);
  Vf res = log1p_reduced_f32(f);
  return add_where(k, res, Vf(0.693147180559945309f));
}

// log(x) for positive, normal, finite x (the continuous Bernoulli's log((1 - e)/|z|), which
// is in [1e-38, 1]): x = 2^k m with m in [sqrt(1/2), sqrt(2)) from the bits, f = m - 1 exact,
// log x = k ln2 + log1p(f) with the polynomial above (within 2e-8 relative on that range).
// Sleef's log, which handles every corner case in software, cost about a third of the step.
C10_ALWAYS_INLINE Vf log_pos_f32(Vf x) {
  using Vi = Vec<int32_t>;
  const Vi bits = at::vec::cast<int32_t>(x);
  const Vi k = (bits - Vi(0x3f3504f3)) >> Vi(23);  // floor(log2(x / sqrt(1/2)))
  const Vf f = at::vec::cast<float>(bits - (k << Vi(23))) - Vf(1.f);
  const Vf kf = at::vec::convert_to_fp_of_same_size<float>(k);
  const Vf lo = at::vec::fmadd(kf, Vf(-2.12194440e-4f), log1p_reduced_f32(f));
  return at::vec::fmadd(kf, Vf(0.693359375f), lo);  // k ln2_hi is exact
}

// log(x) to absolute accuracy, for positive finite x (the continuous Bernoulli's
// log((1 - e)/|z|), which goes into a loss at least |z| >= 1 in size, so relative accuracy
// near log x = 0 buys nothing): x = 2^k (1 + t), t in [0, 1), log x = k ln2 + log1p(t) with
// log1p(t) = t + t^2 R(t), R a minimax fit of degree 6 for the absolute error (within 6.5e-8
// with these float coefficients; the degree-7 fit, 1.3e-8, cost 3% more of the continuous
// Bernoulli's compute).  R(0) is not pinned to -1/2 and ln2 is in one part (k ln2 off by under
// 2e-9 |k|, where |z| >= 2^(|k| - 1)): both cost accuracy only where nothing needs it.  With
// getexp/getmant on AVX-512 the whole log is 12 instructions, against 17 for log_pos_f32.
struct LogAbsPoly {
  static constexpr float c[7] = {-4.999498427e-01f, 3.323769867e-01f, -2.429001629e-01f,
                                 1.720913053e-01f,  -1.003960967e-01f, 3.911709413e-02f,
                                 -7.192167919e-03f};
};
C10_ALWAYS_INLINE Vf log_abs_f32(Vf x) {
#if defined(CPU_CAPABILITY_AVX512)
  // exact for subnormal x too
  const Vf kf = _mm512_getexp_ps(x);
  const Vf t = Vf(_mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src)) - Vf(1.f);
#else
  using Vi = Vec<int32_t>;
  const Vi bits = at::vec::cast<int32_t>(x);
  const Vi k = (bits >> Vi(23)) - Vi(127);  // x is positive: no sign bit; normal x only
  const Vf t = at::vec::cast<float>((bits & Vi(0x007fffff)) | Vi(0x3f800000)) - Vf(1.f);
  const Vf kf = at::vec::convert_to_fp_of_same_size<float>(k);
#endif
  constexpr const float* c = LogAbsPoly::c;
  Vf r(c[6]);
  for (int i = 5; i >= 0; --i) r = at::vec::fmadd(r, t, Vf(c[i]));
  // t^2 off the polynomial's critical path
  return at::vec::fmadd(kf, Vf(0.693147180559945309f), at::vec::fmadd(t * t, r, t));
}

// exp(-|z|), with -|z| clamped at -84.5: below that (e < 2e-37) the result stays at
// exp(-84.5) = 2.0e-37 instead of going subnormal.  Subnormal lanes would each cost a
// microcode assist here and in every later product; the clamp is off by < 2.1e-37
// absolutely in both the loss and the sigmoid.
C10_ALWAYS_INLINE Vf exp_neg_abs_f32(Vf z) {
  Vf a = max_keep_nan(z | Vf(-0.f), Vf(-84.5f));  // -|z|, clamped
  ExpParts p = exp_parts_f32<4>(a);
  return ldexp_f32(Vf(1.f) + (p.r + p.h), p.n);
}

// exp(-a) for a >= 0 (or NaN), as exp_neg_abs_f32 (same clamp, same polynomial) but for
// callers that only need it to absolute accuracy where it is small: the rounding to an
// integer is a magic-number add (two FMA-port instructions instead of vrndscaleps' two uops
// plus a multiply) and the reduction uses ln2 in one part, which leaves exp(-a) off by up to
// 2e-9 n relative (n = round(a log2 e) <= 122), i.e. 6e-9 on a <= 2 and nowhere above 2.3e-7.
C10_ALWAYS_INLINE Vf exp_neg_f32(Vf a) {
  const Vf magic(12582912.f);  // 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer
  const Vf ac = min_keep_nan(a, Vf(84.5f));
  const Vf n = at::vec::fmadd(ac, Vf(-1.44269504088896341f), magic) - magic;
  const Vf r = at::vec::fnmsub(n, Vf(0.693147180559945309f), ac);  // -ac - n ln2
  constexpr const float* c = ExpPoly<4>::c;
  Vf e(c[3]);
  for (int k = 2; k >= 0; --k) e = at::vec::fmadd(e, r, Vf(c[k]));
  e = at::vec::fmadd(e, r, Vf(0.5f));
  return ldexp_f32(Vf(1.f) + at::vec::fmadd(r * r, e, r), n);
}

// 1/a for a in [1, 2] (and anywhere away from 0 and inf).
C10_ALWAYS_INLINE Vf rcp_f32(Vf a) {
#if defined(CPU_CAPABILITY_AVX512)
  Vf x0 = _mm512_rcp14_ps(a);                                // 2^-14
  Vf t = at::vec::fnmadd(a, x0, Vf(1.f));                    // 1 - a x0
  return at::vec::fmadd(x0, t, x0);                          // ~2^-28 + rounding
#elif defined(CPU_CAPABILITY_AVX2)
  // rcp_ps (1.5 * 2^-12) and two Newton steps: a division's accuracy (<= 1 ulp over [1, 2])
  // at a fraction of its cost, which on AVX2 dominates the Bernoulli gradient
  Vf x = _mm256_rcp_ps(a);
  x = at::vec::fmadd(x, at::vec::fnmadd(a, x, Vf(1.f)), x);
  return at::vec::fmadd(x, at::vec::fnmadd(a, x, Vf(1.f)), x);
#else
  return Vf(1.f) / a;
#endif
}

// ---------------------------------------------------------------------------
// Per-type entry points used by the kernels.
// ---------------------------------------------------------------------------
template <typename T>
struct Math;

template <>
struct Math<float> {
  C10_ALWAYS_INLINE static Vf exp(Vf x) {
    return exp_f32(x);
  }
  C10_ALWAYS_INLINE static Vf exp_neg_abs(Vf z) {
    return exp_neg_abs_f32(z);
  }
  C10_ALWAYS_INLINE static Vf exp_neg(Vf a) {
    return exp_neg_f32(a);
  }
  C10_ALWAYS_INLINE static Vf log1p_unit(Vf e) {
    return log1p_unit_f32(e);
  }
  C10_ALWAYS_INLINE static void expm1_pair(Vf d, Vf& em1, Vf& em1_minus_d) {
    expm1_pair_f32(d, em1, em1_minus_d);
  }
  C10_ALWAYS_INLINE static Vf rcp(Vf a) {
    return rcp_f32(a);
  }
  C10_ALWAYS_INLINE static Vf log_pos(Vf x) {
    return log_pos_f32(x);
  }
  C10_ALWAYS_INLINE static Vf log_abs(Vf x) {
    return log_abs_f32(x);
  }
};

template <>
struct Math<double> {
  C10_ALWAYS_INLINE static Vd exp(Vd x) {
    return x.exp();
  }
  C10_ALWAYS_INLINE static Vd exp_neg_abs(Vd z) {
    return (z | Vd(-0.0)).exp();
  }
  C10_ALWAYS_INLINE static Vd exp_neg(Vd a) {
    return (Vd(0.0) - a).exp();
  }
  C10_ALWAYS_INLINE static Vd log1p_unit(Vd e) {
    return e.log1p();
  }
  C10_ALWAYS_INLINE static void expm1_pair(Vd d, Vd& em1, Vd& em1_minus_d) {
    em1 = d.expm1();
    em1_minus_d = em1 - d;
  }
  C10_ALWAYS_INLINE static Vd rcp(Vd a) {
    return Vd(1.0) / a;
  }
  C10_ALWAYS_INLINE static Vd log_pos(Vd x) {
    return x.log();
  }
  C10_ALWAYS_INLINE static Vd log_abs(Vd x) {
    return x.log();
  }
};

// ---------------------------------------------------------------------------
// Summation of a vector of losses into a chunk partial.  float losses are
// widened to double lane by lane on AVX-512 (two converts and two adds per 16
// elements), so a chunk's partial carries no float rounding of its own.
// ---------------------------------------------------------------------------
template <typename T>
struct SumAcc;

template <>
struct SumAcc<double> {
  Vd acc{0.0};
  void add(Vd v) {
    acc = acc + v;
  }
  double total() const {
    __at_align__ double buf[Vd::size()];
    acc.store(buf);
    double s = 0.0;
    for (int i = 0; i < Vd::size(); ++i) s += buf[i];
    return s;
  }
};

template <>
struct SumAcc<float> {
#if defined(CPU_CAPABILITY_AVX512)
  __m512d lo = _mm512_setzero_pd();
  __m512d hi = _mm512_setzero_pd();
  void add(Vf v) {
    __m512 x = v;
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)));
  }
  double total() const {
    __at_align__ double buf[8];
    _mm512_store_pd(buf, _mm512_add_pd(lo, hi));
    double s = 0.0;
    for (int i = 0; i < 8; ++i) s += buf[i];
    return s;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // widened lane by lane, as on AVX-512 (a store and eight scalar converts per vector cost
  // more than the whole loss)
  __m256d lo = _mm256_setzero_pd();
  __m256d hi = _mm256_setzero_pd();
  void add(Vf v) {
    __m256 x = v;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  double total() const {
    __at_align__ double buf[4];
    _mm256_store_pd(buf, _mm256_add_pd(lo, hi));
    double s = 0.0;
    for (int i = 0; i < 4; ++i) s += buf[i];
    return s;
  }
#else
  Vd acc{0.0};
  void add(Vf v) {
    __at_align__ float f[Vf::size()];
    __at_align__ double d[Vf::size()];
    v.store(f);
    for (int i = 0; i < Vf::size(); ++i) d[i] = f[i];
    for (int i = 0; i < Vf::size(); i += Vd::size()) acc = acc + Vd::loadu(d + i);
  }
  double total() const {
    __at_align__ double buf[Vd::size()];
    acc.store(buf);
    double s = 0.0;
    for (int i = 0; i < Vd::size(); ++i) s += buf[i];
    return s;
  }
#endif
};

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast
