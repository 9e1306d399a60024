// Device runners (run.h): lower a planned call and launch the CPU or the Triton kernels.
#include "run.h"

#include "cpu_kernels.h"
#include "dtypes.h"

#include <ATen/ExpandUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/neg.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace vae_fast {

namespace {

std::atomic<int64_t> g_kernel_calls{0};

// The order in which the Triton launcher takes the read modes, inners and counts of the six
// parameters and the target (full, or tiled over samples: kSampledNll).
constexpr int kParamSlots[7] = {kRlv, kW, kPw, kLv, kPmu, kPlv, kY};

// A dense tensor's elements in memory order, as a 1-D view (no copy).
Tensor flat(const Tensor& t) {
  return t.is_contiguous() ? t.view({-1}) : t.as_strided({t.numel()}, {1});
}

// What the kernels read and write, lowered from the plan.
struct Lowered {
  std::array<Tensor, kNumSlots> in;   // contiguous, or dense in the stream's memory order
  std::array<ParamMode, kNumSlots> mode{};  // kConst, kFull or kPeriodic (kExpand is lowered)
  std::array<Tensor, kNumSlots> grad;  // full-size buffers the kernels write
  std::array<Tensor, kNumSlots> temp;  // ... of which these are summed into out[3 + s]
};

Lowered lower(const Plan& p, const Call& c, std::vector<Tensor>& out) {
  Lowered L;
  for (int s = 0; s < kNumSlots; ++s) {
    if (!c.has(s)) continue;
    const Tensor& t = c[s];
    const Tensor& partner = c[partner_of(s)];
    const bool mem = p.memory_order[is_recon_slot(s) ? 0 : 1];
    switch (p.read[s].mode) {
      case kConst:
        break;
      case kPeriodic:
        L.in[s] = t.contiguous();
        L.mode[s] = kPeriodic;
        break;
      case kExpand:
        L.in[s] = t.expand(partner.sizes()).contiguous();
        L.mode[s] = kFull;
        break;
      case kFull:
        L.in[s] = mem ? t : t.contiguous();
        L.mode[s] = kFull;
        break;
    }
    if (!c.need(s)) continue;
    if (p.grad[s].full) {
      L.grad[s] = out[3 + s];
    } else {  // a broadcast parameter: a full-size temporary in the stream's layout
      const auto opts = partner.options().dtype(p.acc);
      L.temp[s] = mem ? at::empty_like(partner, opts) : at::empty(partner.sizes(), opts);
      L.grad[s] = L.temp[s];
    }
  }
  return L;
}

// out[o] = the sum of temp's elements that broadcast onto o, in a fixed order whatever the
// thread count (torch's CPU sum splits a reduction by threads: a scalar parameter's gradient
// would differ in its last bit between 1 and 2 threads). temp is float or double, contiguous
// or (memory-order streams, whose parameters are single numbers) a dense permutation with
// out = one value per row; out is contiguous in the same dtype. Sums in double.
template <typename T>
void deterministic_sum_to(const Tensor& temp, Tensor& out) {
  const int64_t n = temp.numel(), m = out.numel();
  const T* src = temp.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  if (m == 0) return;
  // where element i lands: its multi-index with out's broadcast dimensions dropped
  const int64_t rank = temp.dim(), pad = rank - out.dim();
  std::vector<int64_t> size(rank), ostride(rank, 0);
  for (int64_t d = rank - 1, st = 1; d >= 0; --d) {
    size[d] = temp.size(d);
    const int64_t od = d - pad;
    if (od >= 0 && out.size(od) != 1) ostride[d] = st;
    if (od >= 0) st *= out.size(od);
  }
  const bool by_row = !temp.is_contiguous();  // memory order: out holds one value per row
  auto target = [&](int64_t i, std::vector<int64_t>& idx) {
    if (by_row) return i / (n / m);
    int64_t o = 0;
    for (int64_t d = 0; d < rank; ++d) o += idx[d] * ostride[d];
    return o;
  };
  auto advance = [&](std::vector<int64_t>& idx) {
    for (int64_t d = rank - 1; d >= 0 && ++idx[d] == size[d]; --d) idx[d] = 0;
  };
  auto start = [&](int64_t i) {
    std::vector<int64_t> idx(rank);
    for (int64_t d = rank - 1; d >= 0; --d) {
      idx[d] = i % size[d];
      i /= size[d];
    }
    return idx;
  };
  // Runs: the trailing dimensions that out broadcasts over (H*W of a per-channel (C, 1, 1)
  // log-variance) put `run` consecutive elements onto one out element. A run is summed
  // straight through, in 8 interleaved double sums added in a fixed order, instead of one
  // multi-index step per element (which cost 5x the whole fused step at 6.3M elements).
  int64_t run = 1, d0 = rank;  // the run's dimensions are d0 .. rank - 1
  if (!by_row && n > 0) {
    for (; d0 > 0 && ostride[d0 - 1] == 0; --d0) run *= size[d0 - 1];
  }
  auto run_sum = [&](int64_t i) {
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= run; j += 8) {
      for (int k = 0; k < 8; ++k) a[k] += static_cast<double>(src[i + j + k]);
    }
    for (; j < run; ++j) a[j & 7] += static_cast<double>(src[i + j]);
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  };
  // a fixed split of the elements (it depends on the shapes only; whole runs per piece), one
  // partial sum per piece and out element, added in piece order
  const int64_t pieces = std::min<int64_t>(std::max<int64_t>(n / 65536, 1), 64);
  const int64_t per = run > 1 ? ((n / run + pieces - 1) / pieces) * run : (n + pieces - 1) / pieces;
  std::vector<double> partial(static_cast<size_t>(pieces * m), 0.0);
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p * per, e = std::min(n, b + per);
      if (b >= e) continue;
      double* acc = partial.data() + p * m;
      std::vector<int64_t> idx = start(b);
      if (run > 1) {  // b and e are multiples of run: idx is 0 on the run's dimensions
        for (int64_t i = b; i < e; i += run) {
          acc[target(i, idx)] += run_sum(i);
          for (int64_t d = d0 - 1; d >= 0 && ++idx[d] == size[d]; --d) idx[d] = 0;
        }
      } else {
        for (int64_t i = b; i < e; ++i) {
          acc[target(i, idx)] += static_cast<double>(src[i]);
          advance(idx);
        }
      }
    }
  });
  for (int64_t o = 0; o < m; ++o) {
    double v = 0.0;
    for (int64_t p = 0; p < pieces; ++p) v += partial[p * m + o];
    dst[o] = static_cast<T>(v);
  }
}

void sum_temporaries(const Lowered& L, std::vector<Tensor>& out) {
  for (int s = 0; s < kNumSlots; ++s) {
    const Tensor& t = L.temp[s];
    if (!t.defined()) continue;
    // CPU tensors are summed in a fixed order when the result is small enough for partial
    // sums per piece (every parameter that is not itself nearly full-size); the rest, and
    // CUDA tensors (whose sums do not depend on a thread count), by torch
    if (t.is_cpu() && out[3 + s].numel() <= 4096 && out[3 + s].is_contiguous()) {
      if (t.scalar_type() == at::kDouble) {
        deterministic_sum_to<double>(t, out[3 + s]);
      } else {
        deterministic_sum_to<float>(t, out[3 + s]);
      }
    } else {
      out[3 + s].copy_(at::sum_to(t, out[3 + s].sizes()));
    }
  }
}

double beta_of(const Call& c) {
  return c.beta_t.defined() ? scalar_value(c.beta_t) : c.beta;
}

// ---- the C++ vector kernels ----------------------------------------------------------------

Operand operand(const Tensor& t, ParamMode mode, int64_t inner, int64_t count, double value) {
  Operand op;
  op.value = value;
  if (mode == kConst || !t.defined()) return op;
  op.data = t.data_ptr();
  op.dtype = to_dtype(t.scalar_type());
  op.mode = mode == kPeriodic ? ReadMode::Periodic : ReadMode::Full;
  op.inner = inner;
  op.count = count;
  return op;
}

Output output(const Tensor& t) {
  Output o;
  if (t.defined()) {
    o.data = t.data_ptr();
    o.dtype = to_dtype(t.scalar_type());
  }
  return o;
}

void write_value(const Tensor& t, int64_t i, double v) {
  if (t.scalar_type() == at::kDouble) {
    t.data_ptr<double>()[i] = v;
  } else {
    t.data_ptr<float>()[i] = static_cast<float>(v);
  }
}

ReconStream recon_stream(const Plan& p, const Call& c, const Geometry& g, const Lowered& L,
                         std::vector<Tensor>& out) {
  auto op = [&](int s, double value) {
    return operand(L.in[s], L.mode[s], g.inner[s], g.count[s], value);
  };
  ReconStream rs;
  rs.kind = c.kind;
  rs.full = c.full;
  rs.scale = g.scale_r;
  if (p.recon) {
    rs.n = c[kX].numel();
    rs.row_len = g.row_len_r;
    rs.x = op(kX, 0.0);
    rs.y = op(kY, 0.0);
    rs.s = op(kRlv, c.consts[kRlv]);
    rs.w = op(kW, 1.0);
    rs.pw = op(kPw, 1.0);
    rs.gx = output(L.grad[kX]);
    rs.gy = output(L.grad[kY]);
    rs.gs = output(L.grad[kRlv]);
    rs.gw = output(L.grad[kW]);
    rs.gpw = output(L.grad[kPw]);
    if (p.red_mode == kPerElement) rs.elem_loss = output(out[0]);
  }
  return rs;
}

void run_cpu(const Plan& p, const Call& c, std::vector<Tensor>& out) {
  const Geometry g = geometry(p, c);
  Lowered L = lower(p, c, out);
  auto op = [&](int s, double value) {
    return operand(L.in[s], L.mode[s], g.inner[s], g.count[s], value);
  };
  const ReconStream rs = recon_stream(p, c, g, L, out);
  KLStream ks;
  ks.present = p.kl;
  ks.scale = g.scale_k;
  if (p.kl) {
    ks.n = c[kMu].numel();
    ks.row_len = g.row_len_k;
    ks.mu = op(kMu, 0.0);
    ks.lv = op(kLv, c.consts[kLv]);
    ks.pmu = op(kPmu, c.consts[kPmu]);
    ks.plv = op(kPlv, c.consts[kPlv]);
    ks.gmu = output(L.grad[kMu]);
    ks.glv = output(L.grad[kLv]);
    ks.gpmu = output(L.grad[kPmu]);
    ks.gplv = output(L.grad[kPlv]);
  }
  std::vector<double> sums_r, sums_k;
  fused_forward_kernel(rs, ks, p.red_mode, g.rows, p.acc == at::kDouble, sums_r, sums_k);
  sum_temporaries(L, out);
  if (p.red_mode == kPerElement) return;
  const double beta = beta_of(c);
  for (int64_t i = 0; i < static_cast<int64_t>(sums_r.size()); ++i) {
    const double nll = g.scale_r * sums_r[i];
    const double kl = g.scale_k * sums_k[i];
    write_value(out[1], i, nll);
    write_value(out[2], i, kl);
    write_value(out[0], i, nll + beta * kl);
  }
}

// ---- the Triton kernels, through the ops Python registers ----------------------------------

c10::DispatchKey key_of(const Tensor& t) {
  return t.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
}

void check_triton(const c10::OperatorHandle& op, const Tensor& main) {
  if (op.hasKernelForDispatchKey(key_of(main))) return;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !main.is_cpu(), "vae_fast: the triton backend cannot run on cpu (set TRITON_INTERPRET=1 "
                      "before importing vae_fast)");
  TORCH_CHECK_NOT_IMPLEMENTED(false, "vae_fast: the triton backend cannot run on ",
                              main.device(), ": Triton is not installed or did not import");
}

using TritonFwd = void(const std::optional<Tensor>&, const std::optional<Tensor>&,
                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                       const Tensor&, const Tensor&, const Tensor&,
                       const c10::List<std::optional<Tensor>>&, c10::IntArrayRef,
                       c10::ArrayRef<double>);

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

void run_triton(const Plan& p, const Call& c, std::vector<Tensor>& out) {
  static const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("vae_fast::triton_fwd", "");
  const Tensor& main = p.recon ? c[kX] : c[kMu];
  check_triton(handle, main);
  c10::OptionalDeviceGuard guard(main.device());
  const Geometry g = geometry(p, c);
  Lowered L = lower(p, c, out);
  if (p.kl && !c.has(kLv)) {
    // the Triton kernels take no constant posterior log-variance: a number becomes a 0-d
    // tensor read as a broadcast scalar
    L.in[kLv] = at::full({}, c.consts[kLv], main.options().dtype(p.acc));
    L.mode[kLv] = kPeriodic;
  }
  std::array<std::optional<Tensor>, kNumSlots> in;
  for (int s = 0; s < kNumSlots; ++s) {
    if (L.in[s].defined()) in[s] = flat(L.in[s]);
  }
  c10::List<std::optional<Tensor>> grads;
  for (int s = 0; s < kNumSlots; ++s) {
    grads.push_back(L.grad[s].defined() ? std::optional<Tensor>(flat(L.grad[s])) : std::nullopt);
  }
  std::vector<int64_t> ints = {g.rows, g.row_len_r, g.row_len_k};
  for (int s : kParamSlots) ints.push_back(L.mode[s]);
  for (int s : kParamSlots) ints.push_back(g.inner[s]);
  for (int s : kParamSlots) ints.push_back(g.count[s]);
  ints.push_back(c.kind);
  ints.push_back(c.full);
  ints.push_back(p.red_mode);
  // a tensor beta is read on the device (no host sync); beta = 1 is then a placeholder
  const std::vector<double> floats = {c.consts[kRlv], c.consts[kPmu], c.consts[kPlv],
                                      g.scale_r,      g.scale_k,      c.beta_t.defined() ? 1.0 : c.beta};
  const Tensor loss = p.red_mode == kPerElement ? flat(out[0]) : out[0];
  handle.typed<TritonFwd>().call(in[kX], in[kY], in[kRlv], in[kW], in[kPw], in[kMu], in[kLv],
                                  in[kPmu], in[kPlv], opt(c.beta_t), loss, out[1], out[2], grads,
                                  ints, floats);
  sum_temporaries(L, out);
}

// ---- the discretized logistic mixture (kDmol) ---------------------------------------------------

// A DMOL tensor as its kernels read it: itself when contiguous or channels_last (dim 1
// innermost), else a contiguous copy; with its element strides (batch, channel, pixel).
struct DmolView {
  Tensor t;
  int64_t sb = 0, sc = 0, ss = 0;
};

DmolView dmol_view(const Tensor& t) {
  DmolView v;
  const int64_t ch = t.size(1), pixels = t.numel() / std::max<int64_t>(t.size(0) * ch, 1);
  const bool last = !t.is_contiguous() && channels_last_dense(t);
  v.t = last || t.is_contiguous() ? t : t.contiguous();
  v.sb = ch * pixels;
  v.sc = last ? 1 : pixels;
  v.ss = last ? ch : 1;
  return v;
}

using TritonDmol = void(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        c10::IntArrayRef, c10::ArrayRef<double>);

// The pixels' term in one pass (its gradient written with x's strides, which the plan gave
// the buffer), after the KL stream's, run as a call without a reconstruction term; then
// nll = scale * sums and loss = nll + beta * kl.
void run_dmol(const Plan& p, const Call& c, std::vector<Tensor>& out) {
  const bool triton = c.backend == kTritonBackend;
  const Tensor& main = c[kX];
  TORCH_CHECK_NOT_IMPLEMENTED(triton || main.is_cpu(), "vae_fast: the cpu backend cannot run on ",
                              main.device());
  if (p.kl) {
    Call ck = c;
    ck.kind = kNone;
    ck.api = kRawApi;
    ck.t[kX] = ck.t[kY] = Tensor();
    ck.needs &= ~((int64_t{1} << kX) | (int64_t{1} << kY));
    Plan pk = p;
    pk.recon = false;
    if (triton) {
      run_triton(pk, ck, out);
    } else {
      run_cpu(pk, ck, out);
    }
  }
  const Geometry g = geometry(p, c);
  const DmolView x = dmol_view(main), y = dmol_view(c[kY]);
  const int64_t batch = main.size(0), ch = c[kY].size(1);
  const int64_t pixels = batch ? x.sb / main.size(1) : 0;
  const int64_t mix = main.size(1) / (ch == 3 ? 10 : 3);
  const Tensor& gx = c.need(kX) ? out[3 + kX] : Tensor();
  if (triton) {
    static const c10::OperatorHandle handle =
        c10::Dispatcher::singleton().findSchemaOrThrow("vae_fast::triton_dmol", "");
    check_triton(handle, main);
    c10::OptionalDeviceGuard guard(main.device());
    Tensor sums = at::empty({batch}, main.options().dtype(p.acc));
    const std::vector<int64_t> ints = {batch, pixels, mix, ch, x.sb, x.sc, x.ss, y.sb, y.sc, y.ss};
    const std::vector<double> floats = {c.consts[kRlv], g.scale_r};
    handle.typed<TritonDmol>().call(x.t, y.t, sums, opt(gx), ints, floats);
    Tensor nll = (p.red_mode == kRows ? sums : sums.sum()).mul(g.scale_r);
    out[1].copy_(nll);
    if (p.kl) {
      out[0].add_(out[1]);
    } else {
      out[0].copy_(out[1]);
      out[2].zero_();
    }
    return;
  }
  DmolStream ds;
  ds.batch = batch;
  ds.pixels = pixels;
  ds.mix = mix;
  ds.channels = static_cast<int>(ch);
  ds.num_bins = c.consts[kRlv];
  ds.x = x.t.const_data_ptr();
  ds.x_dtype = to_dtype(x.t.scalar_type());
  ds.x_sb = x.sb, ds.x_sp = x.sc, ds.x_ss = x.ss;
  ds.y = y.t.const_data_ptr();
  ds.y_dtype = to_dtype(y.t.scalar_type());
  ds.y_sb = y.sb, ds.y_sc = y.sc, ds.y_ss = y.ss;
  ds.gx = output(gx);
  ds.scale = g.scale_r;
  std::vector<double> sums;
  dmol_forward_kernel(ds, p.acc == at::kDouble, sums);
  auto read = [&](const Tensor& t, int64_t i) {
    return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[i]
                                          : static_cast<double>(t.const_data_ptr<float>()[i]);
  };
  const int64_t n_out = p.red_mode == kRows ? batch : 1;
  double total = 0.0;
  for (double v : sums) total += v;  // in order: the same whatever the thread count
  for (int64_t i = 0; i < n_out; ++i) {
    const double nll = g.scale_r * (p.red_mode == kRows ? sums[i] : total);
    const double kl = p.kl ? read(out[2], i) : 0.0;
    const double weighted = p.kl ? read(out[0], i) - read(out[1], i) : 0.0;  // beta * kl
    write_value(out[1], i, nll);
    write_value(out[2], i, kl);
    write_value(out[0], i, nll + weighted);
  }
}

// ---- the importance-weighted bound -----------------------------------------------------------

struct IwaeCtx {
  const double* lat = nullptr;  // (K, B)
  int64_t samples = 0, batch = 0;
  double gscale = 1.0;
  double* per = nullptr;  // (B,)
  double* w = nullptr;    // (K, B)
};

// Example b from its K rows' NLLs: log w_kb = lat_kb - nll_kb, per_b = -(logsumexp_k log w_kb
// - log K), w_kb = exp(log w_kb - logsumexp) (torch.logsumexp's value and gradient: a max of
// +-inf shifts by 0, a NaN propagates), coef_k = gscale * w_kb. One function, in this
// translation unit, for both CPU drivers: the same bits whichever runs.
void iwae_finish(int64_t b, const double* nll, double* coef, void* ctx) {
  const IwaeCtx& x = *static_cast<const IwaeCtx*>(ctx);
  const int64_t K = x.samples, B = x.batch;
  double m = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    coef[k] = x.lat[k * B + b] - nll[k];
    if (coef[k] > m || coef[k] != coef[k]) m = m != m ? m : coef[k];
  }
  const double shift = std::isinf(m) ? 0.0 : m;
  double s = 0.0;
  for (int64_t k = 0; k < K; ++k) s += std::exp(coef[k] - shift);
  const double lse = std::log(s) + shift;
  x.per[b] = -(lse - std::log(static_cast<double>(K)));
  for (int64_t k = 0; k < K; ++k) {
    const double w = std::exp(coef[k] - lse);
    x.w[k * B + b] = w;
    coef[k] = x.gscale * w;
  }
}

Tensor to_double_cpu(const Tensor& t) {
  return t.scalar_type() == at::kDouble && t.is_contiguous() ? t : t.to(at::kDouble).contiguous();
}

// ---- backward: in-place scaling --------------------------------------------------------------

// grad_output value r (0 when undefined): a 0-d tensor, or a (rows,) one of any stride
double coef_at(const Tensor& g, int64_t r) {
  if (!g.defined()) return 0.0;
  const int64_t off = g.dim() == 0 ? 0 : r * g.stride(0);
  switch (g.scalar_type()) {
    case at::kDouble:
      return g.const_data_ptr<double>()[off];
    case at::kFloat:
      return g.const_data_ptr<float>()[off];
    default:
      return g.select(0, r).item<double>();
  }
}

// An elementwise grad_output laid out as the buffers are, in float32 or float64.
Tensor like_buffer(const Tensor& g, const Tensor& buf) {
  const auto dt = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (g.scalar_type() == dt && g.strides() == buf.strides()) return g;
  return at::empty_like(buf, buf.options().dtype(dt)).copy_(g);
}

void scale_cpu(const ScaleArgs& a, std::vector<Tensor>& bufs, const Tensor& g_loss,
               double weight, const Tensor& g_term) {
  if (bufs.empty()) return;
  ScaleSpec spec;
  std::vector<double> coef;
  Tensor elem;
  if (a.red == kPerElement) {
    elem = like_buffer(g_loss, bufs[0]);
    spec.elementwise = true;
    spec.elem_a = elem.const_data_ptr();
    spec.elem_dtype = elem.scalar_type() == at::kDouble ? DType::Double : DType::Float;
  } else {
    const int64_t n = a.red == kRows ? a.rows : 1;
    coef.resize(n);
    bool all_one = true;
    for (int64_t r = 0; r < n; ++r) {
      coef[r] = weight * coef_at(g_loss, r) + coef_at(g_term, r);
      all_one = all_one && coef[r] == 1.0;
    }
    if (all_one) return;  // no memory traffic at all
    spec.coef = coef.data();
    spec.n_coef = n;
  }
  for (Tensor& b : bufs) {
    spec.row_len = spec.n_coef ? b.numel() / spec.n_coef : 0;
    scale_kernel(b.data_ptr(), to_dtype(b.scalar_type()), b.numel(), spec);
  }
}

using TritonScale = void(const std::vector<Tensor>&, const std::vector<Tensor>&,
                         const std::optional<Tensor>&, const std::optional<Tensor>&,
                         const std::optional<Tensor>&, const std::optional<Tensor>&,
                         c10::IntArrayRef, double);

std::optional<Tensor> dense_flat(const Tensor& g) {
  if (!g.defined()) return std::nullopt;
  return flat(g.is_non_overlapping_and_dense() ? g : g.contiguous());
}

void scale_triton(const ScaleArgs& a, std::vector<Tensor>& bufs_r, std::vector<Tensor>& bufs_k,
                  Tensor g_loss, const Tensor& g_nll, const Tensor& g_kl) {
  static const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("vae_fast::triton_scale", "");
  const Tensor& any = bufs_r.empty() ? bufs_k[0] : bufs_r[0];
  check_triton(handle, any);
  c10::OptionalDeviceGuard guard(any.device());
  if (a.red == kPerElement && g_loss.defined() && g_loss.strides() != any.strides()) {
    g_loss = at::empty_like(any, g_loss.options()).copy_(g_loss);
  }
  std::vector<Tensor> fr, fk;
  for (const Tensor& b : bufs_r) fr.push_back(flat(b));
  for (const Tensor& b : bufs_k) fk.push_back(flat(b));
  const int64_t rows = a.red == kRows ? a.rows : 1;
  const int64_t len_r = bufs_r.empty() ? 0 : bufs_r[0].numel() / std::max<int64_t>(rows, 1);
  const int64_t len_k = bufs_k.empty() ? 0 : bufs_k[0].numel() / std::max<int64_t>(rows, 1);
  const std::vector<int64_t> ints = {a.red, rows, len_r, len_k};
  handle.typed<TritonScale>().call(fr, fk, dense_flat(g_loss), dense_flat(g_nll),
                                   dense_flat(g_kl), opt(a.beta_t), ints,
                                   a.beta_t.defined() ? 1.0 : a.beta);
}

}  // namespace

double scalar_value(const Tensor& t) {
  if (!t.is_cpu()) return t.item<double>();
  switch (t.scalar_type()) {
    case at::kDouble:
      return *t.const_data_ptr<double>();
    case at::kFloat:
      return *t.const_data_ptr<float>();
    default:
      return t.item<double>();
  }
}

int64_t kernel_calls() {
  return g_kernel_calls.load(std::memory_order_relaxed);
}

void run_forward(const Plan& p, const Call& c, std::vector<Tensor>& out) {
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  if (c.kind == kDmol) return run_dmol(p, c, out);
  const Tensor& main = p.recon ? c[kX] : c[kMu];
  if (c.backend == kTritonBackend) return run_triton(p, c, out);
  TORCH_CHECK_NOT_IMPLEMENTED(main.is_cpu(), "vae_fast: the cpu backend cannot run on ",
                              main.device());
  run_cpu(p, c, out);
}

void run_iwae(const Plan& p, const Call& c, const Tensor& lat, double gscale,
              std::vector<Tensor>& out, Tensor& per, Tensor& w) {
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t K = lat.size(0), B = lat.size(1), rows = K * B;
  const int grad_slots[2] = {kX, kRlv};
  if (c.backend == kTritonBackend) {
    // the pass (per-row NLLs, unweighted gradients), then the weights and one scaling pass
    run_triton(p, c, out);
    const Tensor lw = lat - out[1].view({K, B});
    const Tensor lse = at::logsumexp(lw, {0});
    per.copy_(at::neg(lse).add_(std::log(static_cast<double>(K))));
    w.copy_(at::exp(lw - lse));
    for (int s : grad_slots) {
      if (!c.need(s)) continue;
      Tensor& buf = out[3 + s];
      std::vector<int64_t> view(buf.dim(), 1);
      view[0] = rows;
      buf.mul_((w * gscale).view({rows}).view(view));
    }
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(c[kX].is_cpu(), "vae_fast: the cpu backend cannot run on ",
                              c[kX].device());
  const Geometry g = geometry(p, c);
  Lowered L = lower(p, c, out);
  const ReconStream rs = recon_stream(p, c, g, L, out);
  const Tensor lat_d = to_double_cpu(lat);
  std::vector<double> per_v(static_cast<size_t>(B)), w_v(static_cast<size_t>(rows));
  IwaeCtx ctx;
  ctx.lat = lat_d.const_data_ptr<double>();
  ctx.samples = K;
  ctx.batch = B;
  ctx.gscale = gscale;
  ctx.per = per_v.data();
  ctx.w = w_v.data();
  const bool grads = rs.gx.data != nullptr || rs.gs.data != nullptr;
  const bool acc_double = p.acc == at::kDouble;
  if (grads && B >= at::get_num_threads()) {
    // each example's rows scaled while in cache
    IwaeStream is;
    is.rs = &rs;
    is.samples = K;
    is.batch = B;
    is.finish = iwae_finish;
    is.ctx = &ctx;
    iwae_forward_kernel(is, acc_double);
  } else {
    // too few examples to share among the threads by example (or no gradient): the pass
    // over all rows, then the same weights and, with gradients, one scaling pass
    std::vector<double> sums_r, sums_k, nll(static_cast<size_t>(K)), ck(static_cast<size_t>(K));
    std::vector<double> coef(static_cast<size_t>(rows));
    fused_forward_kernel(rs, KLStream(), kRows, rows, acc_double, sums_r, sums_k);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) nll[k] = sums_r[k * B + b];
      iwae_finish(b, nll.data(), ck.data(), &ctx);
      for (int64_t k = 0; k < K; ++k) coef[k * B + b] = ck[k];
    }
    ScaleSpec spec;
    spec.coef = coef.data();
    spec.n_coef = rows;
    spec.row_len = g.row_len_r;
    for (int s : grad_slots) {
      const Tensor& buf = L.grad[s];
      if (buf.defined()) scale_kernel(buf.data_ptr(), to_dtype(buf.scalar_type()), buf.numel(), spec);
    }
  }
  sum_temporaries(L, out);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  per.copy_(at::from_blob(per_v.data(), {B}, opts));
  w.copy_(at::from_blob(w_v.data(), {K, B}, opts));
}

void scale_in_place(const ScaleArgs& a, std::vector<Tensor>& bufs_r, std::vector<Tensor>& bufs_k,
                    const Tensor& g_loss, const Tensor& g_nll, const Tensor& g_kl) {
  if (bufs_r.empty() && bufs_k.empty()) return;
  if (a.backend == kTritonBackend) return scale_triton(a, bufs_r, bufs_k, g_loss, g_nll, g_kl);
  const double beta = a.beta_t.defined() ? scalar_value(a.beta_t) : a.beta;
  scale_cpu(a, bufs_r, g_loss, 1.0, g_nll);
  scale_cpu(a, bufs_k, g_loss, beta, g_kl);
}

}  // namespace vae_fast
