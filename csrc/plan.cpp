// The plan of one fused call (plan.h): checks, broadcast geometry, dtype policy, layouts,
// output and stored-gradient shapes, reduction scales.
#include "plan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <sstream>

namespace vae_fast {
namespace {

using c10::SymInt;
using c10::SymIntArrayRef;

// The caller's name of each slot, per public function (vae_fast/functional.py); unused slots
// keep the slot's own name, which only the raw op can reach.
constexpr const char* kNames[kNumApis][kNumSlots] = {
    {"x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv"},
    {"recon", "target", "recon_logvar", "w", "pw", "mu", "logvar", "prior_mu", "prior_logvar"},
    {"logits", "target", "rlv", "w", "pw", "mu", "lv", "pmu", "plv"},
    {"mean", "target", "logvar", "w", "pw", "mu", "lv", "pmu", "plv"},
    {"x", "y", "rlv", "w", "pw", "mu", "logvar", "prior_mu", "prior_logvar"},
    {"input", "target", "rlv", "weight", "pos_weight", "mu", "lv", "pmu", "plv"},
    {"input", "target", "rlv", "weight", "pw", "mu", "lv", "pmu", "plv"},
    {"recon", "target", "recon_logvar", "w", "pw", "mu", "lv", "pmu", "plv"},
    {"params", "target", "rlv", "w", "pw", "mu", "lv", "pmu", "plv"},
};

// Checked in this order, as vae_fast/_common.py's parse functions do.
constexpr int kParamOrder[] = {kLv, kPmu, kPlv, kRlv, kW, kPw};

bool supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

class Checker {
 public:
  explicit Checker(const Call& c) : c_(c), names_(kNames[c.api]) {}

  const char* name(int s) const {
    return names_[s];
  }

  // A tensor that defines the shape of its term: floating (or bool), with a batch dimension.
  void main(int s, bool allow_bool, bool allow_scalar) const {
    const Tensor& t = c_[s];
    TORCH_CHECK_TYPE(t.defined(), name(s), " must be a torch.Tensor, got NoneType");
    const auto dt = t.scalar_type();
    if (!(at::isFloatingType(dt) || (allow_bool && dt == at::kBool))) {
      TORCH_CHECK_TYPE(false, name(s), " must be ",
                       allow_bool ? "a floating point or bool" : "a floating point",
                       " tensor, got dtype ", py_dtype(dt));
    }
    supported(s);
    TORCH_CHECK_VALUE(t.dim() != 0 || allow_scalar, name(s),
                      " must have a batch dimension, got a 0-d tensor (shape ())");
  }

  void same_shape(int s, int partner, bool allow_bool) const {
    main(s, allow_bool, /*allow_scalar=*/c_[partner].dim() == 0);
    const Tensor &t = c_[s], &p = c_[partner];
    TORCH_CHECK_VALUE(t.sym_sizes() == p.sym_sizes(), name(s), " must have the shape of ",
                      name(partner), ": got ", name(s), " ", py_shape(t.sym_sizes()), " and ",
                      name(partner), " ", py_shape(p.sym_sizes()));
  }

  // The target of K samples (kSampledNll): partner's shape but for dim 0, which it divides;
  // partner row r reads row r % size(0). It takes no gradient: the kernels read it once for
  // all samples, and a gradient would have to sum K of them.
  void tiled(int s, int partner, bool allow_bool) const {
    main(s, allow_bool, /*allow_scalar=*/false);
    const Tensor &t = c_[s], &p = c_[partner];
    const SymIntArrayRef ts = t.sym_sizes(), ps = p.sym_sizes();
    bool ok = ts.size() == ps.size() && ts.size() >= 1 && ts[0] != 0;
    for (size_t i = 1; ok && i < ts.size(); ++i) ok = ts[i] == ps[i];
    ok = ok && ps[0] % ts[0] == 0;
    TORCH_CHECK_VALUE(ok, name(s), " must have the shape of each sample of ", name(partner),
                      ": got ", name(s), " ", py_shape(ts), " and ", name(partner),
                      " (samples * batch, ...) ", py_shape(ps));
    TORCH_CHECK_NOT_IMPLEMENTED(!c_.need(s), name(s), " shared by several samples of ",
                                name(partner), " takes no gradient in the fused kernels; "
                                "detach it or use vae_fast.use_backend('reference')");
  }

  // The discretized logistic mixture (kDmol): s = the target (B, C, *spatial) against
  // partner = the params (B, P, *spatial), C = 3 with P = 10 M or C = 1 with P = 3 M; as
  // vae_fast/_common.py's dmol_mixtures words it. The target takes no gradient.
  void dmol(int s, int partner) const {
    main(partner, /*allow_bool=*/false, /*allow_scalar=*/false);
    main(s, /*allow_bool=*/false, /*allow_scalar=*/false);
    const Tensor &t = c_[s], &p = c_[partner];
    TORCH_CHECK_VALUE(p.dim() >= 2, name(partner), " must have shape (B, P, *spatial), got ",
                      py_shape(p.sym_sizes()));
    const SymIntArrayRef ts = t.sym_sizes(), ps = p.sym_sizes();
    bool ok = ts.size() == ps.size() && ts[0] == ps[0];
    for (size_t i = 2; ok && i < ts.size(); ++i) ok = ts[i] == ps[i];
    TORCH_CHECK_VALUE(ok, name(s), " must have the shape of ", name(partner),
                      " but for the channel dimension (dim 1): got ", name(s), " ",
                      py_shape(ts), " and ", name(partner), " ", py_shape(ps));
    const SymInt& ch = ts[1];
    TORCH_CHECK_VALUE(ch == 1 || ch == 3, name(s), " must have 1 or 3 channels (dim 1), got ", ch);
    const int64_t per = ch == 3 ? 10 : 3;
    TORCH_CHECK_VALUE(ps[1] != 0 && ps[1] % per == 0, name(partner), " must have ", per,
                      " * M channels (dim 1) for a ", ch, "-channel ", name(s), " (",
                      per == 10 ? "M logits, then per colour channel M means, M log-scales, M "
                                  "coefficients"
                                : "M logits, M means, M log-scales",
                      "), got ", ps[1]);
    TORCH_CHECK_VALUE(!c_.need(s), name(s), " takes no gradient in the discretized logistic "
                      "mixture (the data are discrete): detach it");
  }

  // A parameter tensor: floating, and broadcastable to its partner without enlarging it.
  void param(int s) const {
    const Tensor& t = c_[s];
    if (!t.defined()) return;
    const int partner = partner_of(s);
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name(s),
                     " must be a floating point tensor, got dtype ", py_dtype(t.scalar_type()));
    supported(s);
    const SymIntArrayRef ps = t.sym_sizes(), shape = c_[partner].sym_sizes();
    bool ok = ps.size() <= shape.size();
    for (size_t i = 1; ok && i <= ps.size(); ++i) {
      const SymInt& n = ps[ps.size() - i];
      ok = n == 1 || n == shape[shape.size() - i];
    }
    TORCH_CHECK_VALUE(ok, name(s), " of shape ", py_shape(ps),
                      " does not broadcast to the shape of ", name(partner), " ",
                      py_shape(shape));
  }

  void batch(int a, int b) const {
    const Tensor &ta = c_[a], &tb = c_[b];
    TORCH_CHECK_VALUE(ta.sym_size(0) == tb.sym_size(0), "batch size of ", name(a), " ",
                      py_shape(ta.sym_sizes()), " differs from that of ", name(b), " ",
                      py_shape(tb.sym_sizes()));
  }

  void devices() const {
    const Tensor* first = nullptr;
    bool one = true;
    auto visit = [&](const Tensor& t) {
      if (!t.defined()) return;
      if (first == nullptr) {
        first = &t;
      } else if (t.device() != first->device()) {
        one = false;
      }
    };
    for (const Tensor& t : c_.t) visit(t);
    visit(c_.beta_t);
    if (one) return;
    std::ostringstream listing;
    const char* sep = "";
    auto add = [&](const char* n, const Tensor& t) {
      if (!t.defined()) return;
      listing << sep << n << " on " << t.device();
      sep = ", ";
    };
    for (int s = 0; s < kNumSlots; ++s) add(name(s), c_[s]);
    add("beta", c_.beta_t);
    TORCH_CHECK_VALUE(false, "all tensors must be on one device, got ", listing.str());
  }

 private:
  // float8 and other floating dtypes are the reference's alone: the kernels read 16-, 32- and
  // 64-bit floats
  void supported(int s) const {
    const auto dt = c_[s].scalar_type();
    TORCH_CHECK_NOT_IMPLEMENTED(dt == at::kBool || supported_float(dt), "vae_fast: ", name(s),
                                " has dtype ", py_dtype(dt),
                                "; the fused kernels read float16, bfloat16, float32 and "
                                "float64 (vae_fast.use_backend('reference') takes it)");
  }

  const Call& c_;
  const char* const* names_;
};

// What only a direct caller of the op can get wrong (the public functions never do).
void check_structure(const Call& c) {
  TORCH_CHECK_VALUE(c.api >= 0 && c.api < kNumApis, "vae_fast: unknown api code ", c.api);
  TORCH_CHECK_VALUE(c.kind >= 0 && c.kind < kNumLikelihoods, "vae_fast: unknown kind code ",
                    c.kind);
  TORCH_CHECK_VALUE(c.reduction >= 0 && c.reduction < kNumReductions,
                    "vae_fast: unknown reduction code ", c.reduction);
  TORCH_CHECK_VALUE(c.backend >= 0 && c.backend < kNumBackends,
                    "vae_fast: unknown backend code ", c.backend);
  const bool recon = c.kind != kNone;
  TORCH_CHECK_VALUE(recon || (!c.has(kX) && !c.has(kY) && !c.has(kRlv) && !c.has(kW) &&
                              !c.has(kPw)),
                    "vae_fast: kind 0 (no reconstruction term) takes no x, y, rlv, w or pw");
  TORCH_CHECK_VALUE(c.has(kRlv) == false || c.kind == kGaussian,
                    "vae_fast: rlv is only read by the Gaussian likelihood");
  TORCH_CHECK_VALUE(!c.has(kW) || c.kind == kBernoulli || c.kind == kBernoulliProbs,
                    "vae_fast: w is only read by the Bernoulli likelihoods");
  TORCH_CHECK_VALUE(!c.has(kPw) || c.kind == kBernoulli,
                    "vae_fast: pw is only read by the Bernoulli likelihood from logits");
  TORCH_CHECK_VALUE(c.has(kMu) || (!c.has(kLv) && !c.has(kPmu) && !c.has(kPlv)),
                    "vae_fast: lv, pmu and plv belong to the KL term, which needs mu");
  TORCH_CHECK_VALUE(recon || c.has(kMu), "vae_fast: neither a reconstruction nor a KL term");
  TORCH_CHECK_VALUE(c.reduction != kElementwise || (recon && !c.has(kMu)),
                    "vae_fast: the elementwise reduction has a reconstruction term and no KL");
  TORCH_CHECK_VALUE(c.api != kSampledNll || (recon && !c.has(kMu)),
                    "vae_fast: api 7 (sampled NLL) has a reconstruction term and no KL");
  TORCH_CHECK_VALUE((c.api == kDmolNll) <= (c.kind == kDmol && !c.has(kMu)),
                    "vae_fast: api 8 (discretized_logistic_mixture_nll) is kind 5 and no KL");
  if (c.kind == kDmol) {
    TORCH_CHECK_VALUE(c.api == kRawApi || c.api == kElboLoss || c.api == kDmolNll,
                      "vae_fast: kind 5 (the discretized logistic mixture) is called by "
                      "elbo_loss or discretized_logistic_mixture_nll (api 0, 1 or 8)");
    TORCH_CHECK_VALUE(c.reduction != kElementwise,
                      "vae_fast: the discretized logistic mixture has no elementwise reduction");
    const double bins = c.consts[kRlv];
    TORCH_CHECK_VALUE(bins >= 2 && bins <= 1e15 && bins == static_cast<double>(static_cast<int64_t>(bins)),
                      "num_bins must be an integer of at least 2, got ", bins);
  }
  for (int s = 0; s < kNumSlots; ++s) {
    TORCH_CHECK_VALUE(!c.need(s) || c.has(s), "vae_fast: a gradient of ", kNames[0][s],
                      " is asked for, but ", kNames[0][s], " is not a tensor");
    TORCH_CHECK_VALUE(!c.need(s) || c[s].is_floating_point(), "vae_fast: a gradient of ",
                      kNames[0][s], " is asked for, but ", kNames[0][s], " is not floating");
  }
  TORCH_CHECK_VALUE(c.needs >= 0 && c.needs < (1 << kNumSlots), "vae_fast: needs must be a "
                    "bit mask of the nine slots, got ", c.needs);
  if (c.beta_t.defined()) {
    TORCH_CHECK_TYPE(c.beta_t.is_floating_point() && c.beta_t.dim() == 0,
                     "beta must be a number or a 0-d floating tensor, got a tensor of dtype ",
                     py_dtype(c.beta_t.scalar_type()), " and shape ",
                     py_shape(c.beta_t.sym_sizes()));
  }
}

// How a parameter is read against its partner's shape: the same shape (kFull), a broadcast
// whose non-1 dimensions are one run of the partner's (kPeriodic: a scalar, a per-feature
// (Z,), a per-channel (C,1,1), a per-sample (B,1,1,1)), or any other broadcast (kExpand).
ParamRead read_of(const Tensor& p, const Tensor& partner) {
  ParamRead r;
  if (!p.defined()) return r;
  const SymIntArrayRef shape = partner.sym_sizes(), ps = p.sym_sizes();
  if (ps == shape) {
    r.mode = kFull;
    return r;
  }
  if (partner.sym_numel() == 0) {  // nothing to read: expand (a view) and walk it in full
    r.mode = kExpand;
    return r;
  }
  // make_plan checked that p broadcasts to the partner: p.dim() <= partner.dim()
  const int64_t rank = static_cast<int64_t>(shape.size());
  const int64_t pad = rank - static_cast<int64_t>(ps.size());
  int64_t first = -1, last = -1;  // the run of non-1 dimensions, in the partner's numbering
  for (int64_t i = pad; i < rank; ++i) {
    if (ps[i - pad] == 1) continue;
    first = first < 0 ? i : first;
    last = i;
  }
  r.mode = kPeriodic;
  if (first < 0) return r;  // a single number: inner = count = 1
  for (int64_t i = first; i <= last; ++i) {
    if (ps[i - pad] != shape[i]) {  // a 1 inside the run
      r.mode = kExpand;
      r.count = 1;
      return r;
    }
    r.count = r.count * shape[i];
  }
  for (int64_t i = last + 1; i < rank; ++i) r.inner = r.inner * shape[i];
  return r;
}

// Non-overlapping and dense: its elements fill one block of memory in some dimension order.
bool dense(const Tensor& t) {
  return t.is_non_overlapping_and_dense();
}

// Can a stream be walked in memory order instead of being copied to contiguous? When its
// main tensor is dense and batch-major but permuted (channels_last), every other full-shape
// tensor of the stream has the same strides, and every parameter is either full-shape or a
// single number (a periodic or expanded one needs the logical index).
bool memory_order(const Call& c, const Plan& p, int main, std::initializer_list<int> others) {
  const Tensor& m = c[main];
  if (!m.defined() || m.dim() < 2 || m.is_contiguous() || !dense(m)) return false;
  if (m.sym_size(0) > 1 && m.sym_stride(0) * m.sym_size(0) != m.sym_numel()) {
    return false;  // the batch must be outermost: rows are memory blocks
  }
  for (int s : others) {
    const Tensor& t = c[s];
    if (!t.defined()) continue;
    if (t.sym_sizes() == m.sym_sizes()) {
      if (t.sym_strides() != m.sym_strides()) return false;
    } else if (!(p.read[s].mode == kPeriodic && p.read[s].count == 1)) {
      return false;
    }
  }
  return true;
}

}  // namespace

// The layout of a channels_last tensor, for any rank >= 2: dim 1 innermost, then the others
// in order (the discretized logistic mixture's params and target are read so, or contiguous).
bool channels_last_dense(const Tensor& t) {
  if (t.dim() < 2) return false;
  SymInt expect = t.sym_size(1);
  if (t.sym_size(1) != 1 && t.sym_stride(1) != 1) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.sym_size(d) != 1 && t.sym_stride(d) != expect) return false;
    expect = expect * t.sym_size(d);
  }
  return t.sym_size(0) == 1 || t.sym_stride(0) == expect;
}

namespace {

// float16 gradients stay float32 until grad_output is applied: GradScaler's 2^16 would
// otherwise multiply values that already underflowed (or overflow them)
at::ScalarType buffer_dtype(at::ScalarType s) {
  return s == at::kHalf ? at::kFloat : s;
}

std::vector<SymInt> vec(SymIntArrayRef a) {
  return std::vector<SymInt>(a.begin(), a.end());
}

}  // namespace

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kComplexHalf: return "torch.complex32";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    default: {
      std::string s = c10::toString(t);
      for (char& ch : s) ch = static_cast<char>(std::tolower(ch));
      return "torch." + s;
    }
  }
}

std::string py_shape(SymIntArrayRef shape) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
  o << (shape.size() == 1 ? ",)" : ")");
  return o.str();
}

Plan make_plan(const Call& c) {
  check_structure(c);
  const Checker ck(c);
  Plan p;
  p.recon = c.kind != kNone;
  p.kl = c.has(kMu);
  const bool bce = c.api == kBceWithLogits || c.api == kBce;
  if (c.kind == kDmol) {
    ck.dmol(kY, kX);
  } else if (p.recon) {
    ck.main(kX, /*allow_bool=*/false, /*allow_scalar=*/bce);
    if (c.api == kSampledNll) {
      ck.tiled(kY, kX, /*allow_bool=*/c.kind != kGaussian);
    } else {
      ck.same_shape(kY, kX, /*allow_bool=*/c.kind != kGaussian);
    }
  }
  if (p.kl) ck.main(kMu, false, false);
  if (p.recon && p.kl) ck.batch(kX, kMu);
  for (int s : kParamOrder) ck.param(s);
  ck.devices();

  p.acc = at::kFloat;
  for (const Tensor& t : c.t) {
    if (t.defined() && t.scalar_type() == at::kDouble) p.acc = at::kDouble;
  }
  p.red_mode = red_mode_of(c.reduction);
  const Tensor& main = p.recon ? c[kX] : c[kMu];
  p.rows = p.red_mode == kRows ? main.sym_size(0) : SymInt(1);
  for (int s = 0; s < kNumSlots; ++s) {
    if (is_param_slot(s)) {
      p.read[s] = read_of(c[s], c[partner_of(s)]);
    } else if (c.has(s)) {
      p.read[s].mode = kFull;
    }
  }
  if (p.recon && c.kind != kDmol && c[kY].sym_sizes() != c[kX].sym_sizes()) {
    // a tiled target: y[off % numel]
    p.read[kY].mode = kPeriodic;
    p.read[kY].count = c[kY].sym_numel();
  }
  p.memory_order[0] = c.kind == kDmol ? !c[kX].is_contiguous() && channels_last_dense(c[kX])
                                      : p.recon && memory_order(c, p, kX, {kY, kRlv, kW, kPw});
  p.memory_order[1] = p.kl && memory_order(c, p, kMu, {kLv, kPmu, kPlv});

  for (int s = 0; s < kNumSlots; ++s) {
    if (!c.need(s)) continue;
    const Tensor& t = c[s];
    const Tensor& partner = c[partner_of(s)];
    GradSpec& g = p.grad[s];
    g.full = t.sym_sizes() == partner.sym_sizes();
    if (g.full) {
      g.shape = vec(t.sym_sizes());
      g.dtype = buffer_dtype(t.scalar_type());
      g.keep_layout = p.memory_order[is_recon_slot(s) ? 0 : 1];
      continue;
    }
    // a broadcast parameter: summed right away to what the backward still needs: the
    // parameter's shape (one scalar coefficient), one slice per row ("none"), or the full
    // shape (elementwise coefficients)
    g.dtype = p.acc;
    if (p.red_mode == kTotal) {
      g.shape = vec(t.sym_sizes());
    } else if (p.red_mode == kRows) {
      g.shape.assign(partner.dim(), SymInt(1));
      const int64_t pad = partner.dim() - t.dim();
      for (int64_t i = 0; i < t.dim(); ++i) g.shape[i + pad] = t.sym_size(i);
      g.shape[0] = p.rows;
    } else {
      g.shape = vec(partner.sym_sizes());  // elementwise: written by the kernel in full
      g.full = true;
      g.keep_layout = p.memory_order[is_recon_slot(s) ? 0 : 1];
    }
  }
  return p;
}

std::vector<Tensor> allocate(const Plan& p, const Call& c) {
  const Tensor& main = p.recon ? c[kX] : c[kMu];
  const auto opts = main.options().dtype(p.acc);
  std::vector<Tensor> out;
  out.reserve(3 + kNumSlots);
  if (p.red_mode == kPerElement) {
    out.push_back(p.memory_order[0] ? at::empty_like(c[kX], opts)
                                    : at::empty_symint(c[kX].sym_sizes(), opts));
    out.push_back(at::empty({0}, opts));  // nll and kl: never aliased placeholders
    out.push_back(at::empty({0}, opts));
  } else {
    std::vector<SymInt> shape;
    if (p.red_mode == kRows) shape.push_back(p.rows);
    for (int i = 0; i < 3; ++i) out.push_back(at::empty_symint(shape, opts));
  }
  for (int s = 0; s < kNumSlots; ++s) {
    if (!c.need(s)) {  // an empty placeholder (one each: outputs of an op must not alias)
      out.push_back(at::empty({0}, opts));
      continue;
    }
    const GradSpec& g = p.grad[s];
    // a stream walked in memory order writes its buffers in its partner's layout
    const Tensor& partner = c[partner_of(s)];
    out.push_back(g.keep_layout ? at::empty_like(partner, opts.dtype(g.dtype))
                                : at::empty_symint(g.shape, opts.dtype(g.dtype)));
  }
  return out;
}

Geometry geometry(const Plan& p, const Call& c) {
  Geometry g;
  const Tensor& main = p.recon ? c[kX] : c[kMu];
  const int64_t n = p.recon ? c[kX].numel() : 0;
  const int64_t m = p.kl ? c[kMu].numel() : 0;
  const int64_t batch = main.dim() ? main.size(0) : 1;
  g.rows = p.rows.expect_int();
  g.row_len_r = p.red_mode == kRows ? (g.rows ? n / g.rows : 0) : n;
  g.row_len_k = p.red_mode == kRows ? (g.rows ? m / g.rows : 0) : m;
  // 1/0 = inf: an empty batch's mean is 0 * inf = nan, as torch's
  auto inv = [](int64_t k) { return k ? 1.0 / static_cast<double>(k) : INFINITY; };
  if (c.reduction == kBatchmean) {
    g.scale_r = g.scale_k = inv(batch);
  } else if (c.reduction == kMean) {
    // the discretized logistic mixture's mean is per dimension of the data (the target)
    g.scale_r = inv(c.kind == kDmol ? c[kY].numel() : n);
    g.scale_k = inv(m);
  }
  // an absent term sums to 0 and must stay 0 (not 0 * inf) in loss = nll + beta * kl
  if (!p.recon) g.scale_r = 1.0;
  if (!p.kl) g.scale_k = 1.0;
  for (int s = 0; s < kNumSlots; ++s) {
    g.inner[s] = p.read[s].inner.expect_int();
    g.count[s] = p.read[s].count.expect_int();
  }
  return g;
}

}  // namespace vae_fast
