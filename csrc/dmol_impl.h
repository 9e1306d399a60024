// The discretized logistic mixture (kDmol: PixelCNN++'s discretized_mix_logistic_loss with
// num_bins bins K): -log p per pixel and its gradient with respect to the parameters, in one
// pass.  Included by kernels_impl.h inside namespace vae_fast::CPU_CAPABILITY::{anonymous},
// after its dtype helpers (read_scalar, convert_in, convert_out, ld, st, dtype_of), so it is
// compiled once per instruction set like the other kernels.
//
// Layout of the work (fixed, independent of the thread count):
//   - each example's pixels are cut into chunks of kDmolChunk pixels; one double partial per
//     (example, chunk), the partials of an example added in chunk order;
//   - a chunk is walked in blocks of one vector of pixels (Vec<T>::size() lanes).  With
//     pixel stride 1 (NCHW) the lanes of one parameter channel are contiguous and are loaded
//     in place when already in T; otherwise (16-bit data, channels_last) the block is first
//     staged into a [channel][lane] buffer (transposed), and its gradient scattered back.
//
// Per pixel, component k and colour c (u = x_c - m_ck, s = max(raw, -7), inv = e^-s,
// plus / minus = inv (u +- h), h = 1/(K-1), d = plus - minus = 2 h inv):
//   ep = exp(-|plus|), em = exp(-|minus|) give both sigmoids of each argument and, at the
//   edges, the softplus; the bin probability is written without cancellation as
//     delta = -expm1(-d) * N / ((1 + ep)(1 + em)),  N = em (minus > 0), ep (plus <= 0), else 1
//   (the difference of the sigmoids, or of their complements, factored), so float32 keeps
//   its precision down to the 1e-5 switch to the density fallback, which is evaluated only
//   for blocks where some lane needs it.
#pragma once

constexpr int64_t kDmolChunk = 256;  // pixels per partial sum
constexpr int64_t kDmolAhead = 2;    // blocks of software prefetch ahead (NCHW)

// ---- lane-mask helpers -------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX512)
inline bool any_lane(__mmask16 m) {
  return m != 0;
}
inline bool any_lane(__mmask8 m) {
  return m != 0;
}
inline __mmask16 mask_or(__mmask16 a, __mmask16 b) {
  return static_cast<__mmask16>(a | b);
}
inline __mmask8 mask_or(__mmask8 a, __mmask8 b) {
  return static_cast<__mmask8>(a | b);
}
// a && !b
inline __mmask16 mask_andnot(__mmask16 a, __mmask16 b) {
  return static_cast<__mmask16>(a & ~b);
}
inline __mmask8 mask_andnot(__mmask8 a, __mmask8 b) {
  return static_cast<__mmask8>(a & ~b);
}
#else
template <typename T>
inline bool any_lane(Vec<T> m) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_movemask_ps(m) != 0;
  } else {
    return _mm256_movemask_pd(m) != 0;
  }
#else
  using U = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  __at_align__ T buf[Vec<T>::size()];
  m.store(buf);
  U acc = 0;
  for (int i = 0; i < Vec<T>::size(); ++i) {
    U bits;
    std::memcpy(&bits, &buf[i], sizeof(U));
    acc |= bits;
  }
  return acc != 0;
#endif
}
template <typename T>
inline Vec<T> mask_or(Vec<T> a, Vec<T> b) {
  return a | b;
}
template <typename T>
inline Vec<T> mask_andnot(Vec<T> a, Vec<T> b) {
  return select(b, Vec<T>(T(0)), a);
}
#endif

// tanh(a) = sign(a) * -expm1(-2|a|) / (2 + expm1(-2|a|)), accurate near 0.
template <typename T>
C10_ALWAYS_INLINE Vec<T> dmol_tanh(Vec<T> a) {
  using V = Vec<T>;
  V em1, tail;
  Math<T>::expm1_pair(V(T(-2)) * a.abs(), em1, tail);
  const V t = (V(T(0)) - em1) * Math<T>::rcp(V(T(2)) + em1);
  return t | (a & V(T(-0.0)));
}

// exp(d) for d = a term minus the largest term (d <= 0), as a softmax weight: 0 where d is
// below kDmolCut (the term is then under 1e-26 of the largest, below T's rounding of their
// sum), so no subnormal weight or gradient is ever formed.
template <typename T>
constexpr double kDmolCut = std::is_same_v<T, float> ? -60.0 : -700.0;
template <typename T>
C10_ALWAYS_INLINE Vec<T> dmol_exp_rel(Vec<T> d) {
  using V = Vec<T>;
  const V cut(T(kDmolCut<T>));
  return select(lt(d, cut), V(T(0)), Math<T>::exp(max_keep_nan(d, cut)));
}

template <typename T>
struct DmolCtx {
  int64_t M = 0;
  int C = 3;
  T h = T(0);         // 1/(K-1)
  T two_h = T(0);     // 2/(K-1)
  T log_half = T(0);  // log((K-1)/2)
  T scale = T(1);
};

// One block of pixels: parameter channel p at x + p * xs (Vec<T>::size() lanes), target
// channel c at y + c * ys, gradient channel p at g + p * gs (g == nullptr: not wanted).
// Scratch, each [count][lanes]: A (M), E (M), Du, Ds (C*M), tc (3*M).
template <typename T>
struct DmolBlock {
  const T* x = nullptr;
  int64_t xs = 0;
  const T* y = nullptr;
  int64_t ys = 0;
  T* g = nullptr;
  int64_t gs = 0;
  T *A = nullptr, *E = nullptr, *Du = nullptr, *Ds = nullptr, *tc = nullptr;
};

// -log p of one vector of pixels (lanes past cnt are garbage for TAIL; the caller masks
// them); writes the gradient times scale when GRAD.
template <typename T, bool TAIL, bool GRAD>
C10_ALWAYS_INLINE Vec<T> dmol_vec(const DmolCtx<T>& ctx, const DmolBlock<T>& b, int64_t cnt) {
  using V = Vec<T>;
  using MT = Math<T>;
  constexpr int64_t L = V::size();
  const int64_t M = ctx.M;
  const int C = ctx.C;
  const V zero(T(0));
  const V one(T(1));
  auto X = [&](int64_t p) { return ld<TAIL>(b.x + p * b.xs, 0, cnt); };
  auto Y = [&](int64_t c) { return ld<TAIL>(b.y + c * b.ys, 0, cnt); };
  auto G = [&](int64_t p, V v) { st<TAIL>(v, b.g + p * b.gs, 0, cnt); };
  auto ldb = [&](T* buf, int64_t i) { return V::loadu(buf + i * L); };
  auto put = [&](T* buf, int64_t i, V v) { v.store(buf + i * L); };

  // log-softmax normaliser of the logits; A_k starts as the logit
  V lmax = X(0);
  for (int64_t k = 1; k < M; ++k) lmax = at::vec::maximum(lmax, X(k));
  V lsum = zero;
  for (int64_t k = 0; k < M; ++k) {
    const V l = X(k);
    const V e = dmol_exp_rel<T>(l - lmax);
    put(b.E, k, e);
    put(b.A, k, l);
    lsum = lsum + e;
  }
  V x0 = zero, x1 = zero;
  if (C == 3) {
    x0 = Y(0);
    x1 = Y(1);
    for (int c = 0; c < 3; ++c) {
      const int64_t base = M + 3 * M * c + 2 * M;
      for (int64_t k = 0; k < M; ++k) put(b.tc, c * M + k, dmol_tanh<T>(X(base + k)));
    }
  }
  const V h(ctx.h);
  const V two_h(ctx.two_h);
  const V floor_s(T(-7));
  const V thr(T(1e-5));
  const V dmin(T(1e-6));
  for (int c = 0; c < C; ++c) {
    const V xc = Y(c);
    const auto lo = lt(xc, V(T(-0.999)));
    const auto hi = lt(V(T(0.999)), xc);
    const auto edge = mask_or(lo, hi);
    const bool any_edge = any_lane(edge);
    const int64_t base = C == 3 ? M + 3 * M * c : M;
    for (int64_t k = 0; k < M; ++k) {
      V mean = X(base + k);
      if (c == 1) mean = at::vec::fmadd(ldb(b.tc, k), x0, mean);
      if (c == 2) {
        mean = at::vec::fmadd(ldb(b.tc, M + k), x0, mean);
        mean = at::vec::fmadd(ldb(b.tc, 2 * M + k), x1, mean);
      }
      const V raw = X(base + M + k);
      const V s = max_keep_nan(raw, floor_s);
      const V inv = MT::exp(zero - s);
      const V u = xc - mean;
      const V plus = inv * (u + h);
      const V minus = inv * (u - h);
      const V ep = MT::exp_neg_abs(plus);
      const V em = MT::exp_neg_abs(minus);
      const V rp = MT::rcp(one + ep);
      const V rm = MT::rcp(one + em);
      V em1d, tail;
      MT::expm1_pair(zero - two_h * inv, em1d, tail);
      // N >= 1e-20 changes no branch (delta <= 1e-5 whenever N is that small) and keeps the
      // product normal in the far tail, where subnormals would cost a microcode assist each
      const V nfac = max_keep_nan(select(lt(zero, minus), em, select(lt(zero, plus), one, ep)),
                                  V(T(1e-20)));
      const V delta = ((zero - em1d) * nfac) * (rp * rm);
      const auto bad = ge(thr, delta);
      const V dc = max_keep_nan(delta, dmin);
      V logp = MT::log_pos(dc);
      const V idelta = MT::rcp(dc);
      const V epr = ep * rp;  // sigmoid(-|plus|)
      const V emr = em * rm;
      V dplus = (epr * rp) * idelta;              // sigmoid(plus) sigmoid(-plus) / delta
      V dminus = zero - (emr * rm) * idelta;
      if (any_edge) {
        // x < -0.999: log sigmoid(plus) = -softplus(-plus); x > 0.999: -softplus(minus)
        const V z = select(lo, zero - plus, minus);
        const V e = select(lo, ep, em);
        const V le = zero - (at::vec::clamp_min(z, zero) + MT::log1p_unit(e));
        logp = select(edge, le, logp);
        const auto pp = ge(plus, zero);
        const auto pm = ge(minus, zero);
        const V sig_neg_plus = select(pp, epr, rp);  // sigmoid(-plus)
        const V sig_minus = select(pm, rm, emr);     // sigmoid(minus)
        dplus = select(lo, sig_neg_plus, select(hi, zero, dplus));
        dminus = select(hi, zero - sig_minus, select(lo, zero, dminus));
      }
      V du = inv * (dplus + dminus);
      V dsc = zero - at::vec::fmadd(plus, dplus, minus * dminus);
      const auto fb = mask_andnot(bad, edge);
      if (any_lane(fb)) {
        // log pdf at the bin centre - log((K-1)/2)
        const V mid = inv * u;
        const V e = MT::exp_neg_abs(mid);
        const V sp = at::vec::clamp_min(mid, zero) + MT::log1p_unit(e);
        const V lf = mid - s - (sp + sp) - V(ctx.log_half);
        // dmid = 1 - 2 sigmoid(mid) = -tanh(mid / 2) = -sign(mid) (1 - e)/(1 + e)
        const V th = ((one - e) * MT::rcp(one + e)) | (mid & V(T(-0.0)));
        const V dmid = zero - th;
        logp = select(fb, lf, logp);
        du = select(fb, inv * dmid, du);
        dsc = select(fb, zero - at::vec::fmadd(mid, dmid, one), dsc);
      }
      put(b.A, k, ldb(b.A, k) + logp);
      if constexpr (GRAD) {
        put(b.Du, c * M + k, du);
        put(b.Ds, c * M + k, select(ge(raw, floor_s), dsc, zero));
      }
    }
  }
  V amax = ldb(b.A, 0);
  for (int64_t k = 1; k < M; ++k) amax = at::vec::maximum(amax, ldb(b.A, k));
  V asum = zero;
  for (int64_t k = 0; k < M; ++k) {
    const V e = dmol_exp_rel<T>(ldb(b.A, k) - amax);
    put(b.A, k, e);
    asum = asum + e;
  }
  const V loss = (lmax + MT::log_pos(lsum)) - (amax + MT::log_pos(asum));
  if constexpr (GRAD) {
    const V scale(ctx.scale);
    const V ia = MT::rcp(asum);
    const V il = MT::rcp(lsum);
    for (int64_t k = 0; k < M; ++k) {
      const V r = ldb(b.A, k) * ia;
      const V pi = ldb(b.E, k) * il;
      G(k, (pi - r) * scale);
      const V rs = r * scale;
      V gm[3];
      for (int c = 0; c < C; ++c) {
        const int64_t base = C == 3 ? M + 3 * M * c : M;
        gm[c] = rs * ldb(b.Du, c * M + k);
        G(base + k, gm[c]);
        G(base + M + k, zero - rs * ldb(b.Ds, c * M + k));
      }
      if (C == 3) {
        const V t0 = ldb(b.tc, k), t1 = ldb(b.tc, M + k), t2 = ldb(b.tc, 2 * M + k);
        G(M + 2 * M + k, (gm[1] * x0) * at::vec::fnmadd(t0, t0, one));
        G(M + 3 * M + 2 * M + k, (gm[2] * x0) * at::vec::fnmadd(t1, t1, one));
        G(M + 6 * M + 2 * M + k, (gm[2] * x1) * at::vec::fnmadd(t2, t2, one));
      }
    }
  }
  return loss;
}

// ---- staging for strided / non-T data ------------------------------------------------------
template <typename T, typename S>
C10_ALWAYS_INLINE T dmol_to(S v) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    return static_cast<T>(v);
  } else {
    return static_cast<T>(static_cast<float>(v));
  }
}

// dst[p * L + j] = src[base + p * sp + j * ss] for p < P, j < cnt (lanes past cnt zeroed)
template <typename T, typename S>
void dmol_gather_t(const S* src, int64_t base, int64_t sp, int64_t ss, int64_t P, int64_t cnt,
                   T* dst) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t j = 0; j < cnt; ++j) {
    const S* q = src + base + j * ss;
    for (int64_t p = 0; p < P; ++p) dst[p * L + j] = dmol_to<T>(q[p * sp]);
  }
  if (cnt < L) {
    for (int64_t p = 0; p < P; ++p) std::fill(dst + p * L + cnt, dst + p * L + L, T(0));
  }
}

template <typename T>
void dmol_gather(const void* src, DType dt, int64_t base, int64_t sp, int64_t ss, int64_t P,
                 int64_t cnt, T* dst) {
  constexpr int64_t L = Vec<T>::size();
  if (ss == 1) {
    for (int64_t p = 0; p < P; ++p) {
      convert_in(src, dt, base + p * sp, cnt, dst + p * L);
      if (cnt < L) std::fill(dst + p * L + cnt, dst + p * L + L, T(0));
    }
    return;
  }
  switch (dt) {
    case DType::Half:
      return dmol_gather_t(static_cast<const c10::Half*>(src), base, sp, ss, P, cnt, dst);
    case DType::BFloat16:
      return dmol_gather_t(static_cast<const c10::BFloat16*>(src), base, sp, ss, P, cnt, dst);
    case DType::Float:
      return dmol_gather_t(static_cast<const float*>(src), base, sp, ss, P, cnt, dst);
    case DType::Double:
      return dmol_gather_t(static_cast<const double*>(src), base, sp, ss, P, cnt, dst);
    case DType::Bool:
      return dmol_gather_t(static_cast<const bool*>(src), base, sp, ss, P, cnt, dst);
  }
}

template <typename T, typename D>
void dmol_scatter_t(const T* src, D* dst, int64_t base, int64_t sp, int64_t ss, int64_t P,
                    int64_t cnt) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t j = 0; j < cnt; ++j) {
    D* q = dst + base + j * ss;
    for (int64_t p = 0; p < P; ++p) {
      if constexpr (std::is_same_v<D, float> || std::is_same_v<D, double>) {
        q[p * sp] = static_cast<D>(src[p * L + j]);
      } else {
        q[p * sp] = static_cast<D>(static_cast<float>(src[p * L + j]));
      }
    }
  }
}

template <typename T>
void dmol_scatter(const T* src, void* dst, DType dt, int64_t base, int64_t sp, int64_t ss,
                  int64_t P, int64_t cnt) {
  constexpr int64_t L = Vec<T>::size();
  if (ss == 1) {
    for (int64_t p = 0; p < P; ++p) convert_out(src + p * L, dt, dst, base + p * sp, cnt);
    return;
  }
  switch (dt) {
    case DType::Half:
      return dmol_scatter_t(src, static_cast<c10::Half*>(dst), base, sp, ss, P, cnt);
    case DType::BFloat16:
      return dmol_scatter_t(src, static_cast<c10::BFloat16*>(dst), base, sp, ss, P, cnt);
    case DType::Float:
      return dmol_scatter_t(src, static_cast<float*>(dst), base, sp, ss, P, cnt);
    case DType::Double:
      return dmol_scatter_t(src, static_cast<double*>(dst), base, sp, ss, P, cnt);
    case DType::Bool:
      TORCH_CHECK(false, "vae_fast: bool output");
  }
}

// ---- chunks and the driver -----------------------------------------------------------------
template <typename T, bool GRAD>
double dmol_chunk(const DmolStream& ds, const DmolCtx<T>& ctx, int64_t P, int64_t bi,
                  int64_t s0, int64_t n, T* scratch) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t M = ctx.M;
  const int C = ctx.C;
  DmolBlock<T> blk;
  T* p = scratch;
  blk.A = p, p += M * L;
  blk.E = p, p += M * L;
  blk.Du = p, p += C * M * L;
  blk.Ds = p, p += C * M * L;
  blk.tc = p, p += 3 * M * L;
  T* xb = p;
  p += P * L;
  T* yb = p;
  p += C * L;
  T* gb = p;
  const bool x_direct = ds.x_dtype == dtype_of<T>() && ds.x_ss == 1;
  const bool y_direct = ds.y_dtype == dtype_of<T>() && ds.y_ss == 1;
  const bool g_direct = ds.gx.dtype == dtype_of<T>() && ds.x_ss == 1;
  const int64_t xoff = bi * ds.x_sb, yoff = bi * ds.y_sb;
  SumAcc<T> acc;
  for (int64_t s = s0; s < s0 + n; s += L) {
    const int64_t cnt = std::min<int64_t>(L, s0 + n - s);
    if (x_direct) {
      blk.x = static_cast<const T*>(ds.x) + xoff + s;
      blk.xs = ds.x_sp;
    } else {
      dmol_gather(ds.x, ds.x_dtype, xoff + s * ds.x_ss, ds.x_sp, ds.x_ss, P, cnt, xb);
      blk.x = xb;
      blk.xs = L;
    }
    if (y_direct) {
      blk.y = static_cast<const T*>(ds.y) + yoff + s;
      blk.ys = ds.y_sc;
    } else {
      dmol_gather(ds.y, ds.y_dtype, yoff + s * ds.y_ss, ds.y_sc, ds.y_ss, C, cnt, yb);
      blk.y = yb;
      blk.ys = L;
    }
    if constexpr (GRAD) {
      if (g_direct) {
        blk.g = static_cast<T*>(ds.gx.data) + xoff + s;
        blk.gs = ds.x_sp;
      } else {
        blk.g = gb;
        blk.gs = L;
      }
    }
    // The NCHW planes are P separate streams (P pages per block at S = 1024), too many for
    // the hardware prefetchers: fetch each channel's line kDmolAhead blocks ahead.
    if (x_direct && s + kDmolAhead * L < s0 + n) {
      const T* q = blk.x + kDmolAhead * L;
      for (int64_t c = 0; c < P; ++c) __builtin_prefetch(q + c * blk.xs, 0, 3);
    }
    if constexpr (GRAD) {
      if (g_direct && s + kDmolAhead * L < s0 + n) {
        T* q = blk.g + kDmolAhead * L;
        for (int64_t c = 0; c < P; ++c) __builtin_prefetch(q + c * blk.gs, 1, 3);
      }
    }
    if (cnt == L) {
      acc.add(dmol_vec<T, false, GRAD>(ctx, blk, L));
    } else {
      acc.add(V::set(V(T(0)), dmol_vec<T, true, GRAD>(ctx, blk, cnt), cnt));
    }
    if constexpr (GRAD) {
      if (!g_direct) {
        dmol_scatter(gb, ds.gx.data, ds.gx.dtype, xoff + s * ds.x_ss, ds.x_sp, ds.x_ss, P, cnt);
      }
    }
  }
  return acc.total();
}

template <typename T>
void run_dmol_forward(const DmolStream& ds, std::vector<double>& sums) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t B = ds.batch, S = ds.pixels;
  sums.assign(static_cast<size_t>(std::max<int64_t>(B, 0)), 0.0);
  if (B <= 0 || S <= 0) return;
  TORCH_CHECK(ds.channels == 1 || ds.channels == 3, "vae_fast: dmol channels must be 1 or 3");
  DmolCtx<T> ctx;
  ctx.M = ds.mix;
  ctx.C = ds.channels;
  ctx.h = static_cast<T>(1.0 / (ds.num_bins - 1.0));
  ctx.two_h = static_cast<T>(2.0 / (ds.num_bins - 1.0));
  ctx.log_half = static_cast<T>(std::log((ds.num_bins - 1.0) / 2.0));
  ctx.scale = static_cast<T>(ds.scale);
  const int64_t M = ds.mix, C = ds.channels;
  const int64_t P = (C == 3 ? 10 : 3) * M;
  const int64_t per = (S + kDmolChunk - 1) / kDmolChunk;
  const int64_t total = B * per;
  std::vector<double> partials(static_cast<size_t>(total), 0.0);
  double* part = partials.data();
  const bool grad = ds.gx.data != nullptr;
  // about 64K parameter elements per task at least
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kDmolChunk * P));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    const int64_t nscratch = (M + M + 2 * C * M + 3 * M + P + C + P) * L;
    std::unique_ptr<T[]> scratch(new T[nscratch]);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / per, j = t - bi * per;
      const int64_t s0 = j * kDmolChunk;
      const int64_t n = std::min(kDmolChunk, S - s0);
      part[t] = grad ? dmol_chunk<T, true>(ds, ctx, P, bi, s0, n, scratch.get())
                     : dmol_chunk<T, false>(ds, ctx, P, bi, s0, n, scratch.get());
    }
  });
  for (int64_t bi = 0; bi < B; ++bi) {
    double s = 0.0;
    for (int64_t j = 0; j < per; ++j) s += part[bi * per + j];
    sums[bi] = s;
  }
}
