// Operator layer of the fused CPU backend: schema, argument checks, and the
// translation of tensors into the plain streams of kernels.h.
//
//   torch.ops.vae_fast_cpu.fused_forward(...)  one pass: losses (+ gradients)
//   torch.ops.vae_fast_cpu.scale_(...)         backward: grads *= grad_output
// (eager.cpp adds a Python binding, eager_loss: the eager fast path with its own C++
// autograd node.)
//
// The Python side (vae_fast/_cpu.py) documents the arguments; the formulas are
// in DESIGN.md.  Everything here runs on the host: these are CPU tensors.
#include "dtypes.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace vae_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kInputNames[9] = {"x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv"};

void check_cpu_contig(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vae_fast_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "vae_fast_cpu: ", name, " must be contiguous");
}

// A stream's main input (x, y, mu): full size, floating (or bool for y).
Operand main_operand(const Tensor& t, const char* name, int64_t n, bool allow_bool) {
  check_cpu_contig(t, name);
  TORCH_CHECK(is_float(t.scalar_type()) || (allow_bool && t.scalar_type() == at::kBool),
              "vae_fast_cpu: ", name, " has unsupported dtype ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, "vae_fast_cpu: ", name, " has ", t.numel(),
              " elements, expected ", n);
  Operand op;
  op.data = t.data_ptr();
  op.dtype = to_dtype(t.scalar_type());
  op.mode = ReadMode::Full;
  return op;
}

// A parameter (rlv, w, pw, lv, pmu, plv) read in mode 0/1/2.
Operand param_operand(const OptTensor& t, const char* name, int64_t mode, int64_t inner,
                      int64_t count, double value, int64_t n) {
  Operand op;
  op.value = value;
  TORCH_CHECK(mode >= 0 && mode <= 2, "vae_fast_cpu: ", name, ": mode must be 0, 1 or 2, got ",
              mode);
  if (mode == 0) {
    TORCH_CHECK(!t.has_value() || !t->defined(), "vae_fast_cpu: ", name,
                " is a tensor but its mode is 0 (constant)");
    op.mode = ReadMode::Const;
    return op;
  }
  TORCH_CHECK(t.has_value() && t->defined(), "vae_fast_cpu: ", name, " has mode ", mode,
              " but is None");
  check_cpu_contig(*t, name);
  TORCH_CHECK(is_float(t->scalar_type()), "vae_fast_cpu: ", name, " has unsupported dtype ",
              t->scalar_type());
  op.data = t->data_ptr();
  op.dtype = to_dtype(t->scalar_type());
  if (mode == 1) {
    TORCH_CHECK(t->numel() == n, "vae_fast_cpu: ", name, " (mode 1) has ", t->numel(),
                " elements, expected ", n);
    op.mode = ReadMode::Full;
  } else {
    TORCH_CHECK(inner >= 1 && count >= 1, "vae_fast_cpu: ", name,
                " (mode 2) needs inner >= 1 and count >= 1, got ", inner, ", ", count);
    TORCH_CHECK(t->numel() == count, "vae_fast_cpu: ", name, " (mode 2) has ", t->numel(),
                " elements, expected count = ", count);
    op.mode = ReadMode::Periodic;
    op.inner = inner;
    op.count = count;
  }
  return op;
}

Output grad_output(const c10::List<OptTensor>& grads, int idx, int64_t n, bool has_input) {
  Output out;
  OptTensor g = grads.get(idx);
  if (!g.has_value() || !g->defined()) return out;
  const char* name = kInputNames[idx];
  TORCH_CHECK(has_input, "vae_fast_cpu: a gradient for ", name,
              " was requested but ", name, " is not a tensor");
  check_cpu_contig(*g, "grad");
  TORCH_CHECK(is_float(g->scalar_type()), "vae_fast_cpu: grad of ", name,
              " must be floating, got ", g->scalar_type());
  TORCH_CHECK(g->numel() == n, "vae_fast_cpu: grad of ", name, " has ", g->numel(),
              " elements, expected ", n);
  out.data = g->data_ptr();
  out.dtype = to_dtype(g->scalar_type());
  return out;
}

void write_value(const Tensor& t, int64_t i, double v) {
  switch (t.scalar_type()) {
    case at::kFloat:
      t.data_ptr<float>()[i] = static_cast<float>(v);
      break;
    case at::kDouble:
      t.data_ptr<double>()[i] = v;
      break;
    case at::kHalf:
      t.data_ptr<at::Half>()[i] = static_cast<at::Half>(static_cast<float>(v));
      break;
    case at::kBFloat16:
      t.data_ptr<at::BFloat16>()[i] = static_cast<at::BFloat16>(static_cast<float>(v));
      break;
    default:
      TORCH_CHECK(false, "vae_fast_cpu: unsupported output dtype ", t.scalar_type());
  }
}

void check_out(const OptTensor& t, const char* name, int64_t n) {
  if (!t.has_value() || !t->defined()) return;
  check_cpu_contig(*t, name);
  TORCH_CHECK(is_float(t->scalar_type()), "vae_fast_cpu: ", name, " must be floating, got ",
              t->scalar_type());
  TORCH_CHECK(t->numel() == n, "vae_fast_cpu: ", name, " has ", t->numel(),
              " elements, expected ", n);
}

bool defined(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// Inputs are never written: refuse a gradient buffer that shares memory with any of them.
void check_no_overlap(const c10::List<OptTensor>& grads,
                      std::initializer_list<const OptTensor*> inputs) {
  for (size_t i = 0; i < grads.size(); ++i) {
    OptTensor g = grads.get(i);
    if (!defined(g) || g->numel() == 0) continue;
    const char* g0 = static_cast<const char*>(g->data_ptr());
    const char* g1 = g0 + g->numel() * g->element_size();
    for (const OptTensor* t : inputs) {
      if (!defined(*t) || (*t)->numel() == 0) continue;
      const char* t0 = static_cast<const char*>((*t)->data_ptr());
      const char* t1 = t0 + (*t)->numel() * (*t)->element_size();
      TORCH_CHECK(g1 <= t0 || t1 <= g0, "vae_fast_cpu: the gradient buffer for ",
                  kInputNames[i], " overlaps an input; inputs are never written");
    }
  }
}

void fused_forward(const OptTensor& x, const OptTensor& y, const OptTensor& rlv,
                   const OptTensor& w, const OptTensor& pw, const OptTensor& mu,
                   const OptTensor& lv, const OptTensor& pmu, const OptTensor& plv, int64_t rows,
                   int64_t row_len_r, int64_t row_len_k, at::IntArrayRef modes,
                   at::IntArrayRef inners, at::IntArrayRef counts, at::ArrayRef<double> consts,
                   int64_t kind, bool full, int64_t red_mode, double scale_r, double scale_k,
                   double beta, const OptTensor& out_loss, const OptTensor& out_nll,
                   const OptTensor& out_kl, const c10::List<OptTensor>& grads) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "vae_fast_cpu: kind must be 0..3, got ", kind);
  TORCH_CHECK(red_mode >= 0 && red_mode <= 2, "vae_fast_cpu: red_mode must be 0..2, got ",
              red_mode);
  TORCH_CHECK(rows >= 0 && row_len_r >= 0 && row_len_k >= 0,
              "vae_fast_cpu: rows and row lengths must be >= 0");
  TORCH_CHECK(modes.size() == 6 && inners.size() == 6 && counts.size() == 6,
              "vae_fast_cpu: modes, inners and counts need 6 entries (rlv, w, pw, lv, pmu, plv)");
  TORCH_CHECK(consts.size() == 3, "vae_fast_cpu: consts needs 3 entries (rlv, pmu, plv)");
  TORCH_CHECK(grads.size() == 9, "vae_fast_cpu: grads needs 9 entries, got ", grads.size());
  const bool has_kl = defined(mu);
  TORCH_CHECK(red_mode != kElementwise || !has_kl,
              "vae_fast_cpu: the elementwise reduction has no KL stream");

  check_no_overlap(grads, {&x, &y, &rlv, &w, &pw, &mu, &lv, &pmu, &plv});

  bool acc_double = false;
  for (const OptTensor* t : {&x, &y, &rlv, &w, &pw, &mu, &lv, &pmu, &plv}) {
    if (defined(*t) && t->value().scalar_type() == at::kDouble) acc_double = true;
  }

  ReconStream rs;
  rs.kind = static_cast<int>(kind);
  rs.full = full;
  rs.scale = scale_r;
  if (kind != kNoRecon) {
    TORCH_CHECK(defined(x) && defined(y), "vae_fast_cpu: x and y are required when kind != 0");
    const int64_t n = rows * row_len_r;
    rs.n = n;
    rs.row_len = row_len_r;
    rs.x = main_operand(*x, "x", n, false);
    rs.y = main_operand(*y, "y", n, kind != kGaussian);
    rs.s = param_operand(rlv, "rlv", modes[0], inners[0], counts[0], consts[0], n);
    rs.w = param_operand(w, "w", modes[1], inners[1], counts[1], 1.0, n);
    rs.pw = param_operand(pw, "pw", modes[2], inners[2], counts[2], 1.0, n);
    TORCH_CHECK(kind == kGaussian || rs.s.mode == ReadMode::Const,
                "vae_fast_cpu: rlv is only used by the Gaussian likelihood");
    TORCH_CHECK(kind != kGaussian || rs.w.mode == ReadMode::Const,
                "vae_fast_cpu: the Gaussian likelihood takes no weight");
    TORCH_CHECK(kind == kBernoulliLogits || rs.pw.mode == ReadMode::Const,
                "vae_fast_cpu: pos_weight is only used with Bernoulli logits");
    rs.gx = grad_output(grads, 0, n, true);
    rs.gy = grad_output(grads, 1, n, true);
    rs.gs = grad_output(grads, 2, n, rs.s.mode != ReadMode::Const);
    rs.gw = grad_output(grads, 3, n, rs.w.mode != ReadMode::Const);
    rs.gpw = grad_output(grads, 4, n, rs.pw.mode != ReadMode::Const);
  } else {
    TORCH_CHECK(!defined(x) && !defined(y), "vae_fast_cpu: kind 0 takes no x/y");
    for (int i = 0; i < 5; ++i) {
      OptTensor g = grads.get(i);
      TORCH_CHECK(!g.has_value() || !g->defined(), "vae_fast_cpu: grad of ", kInputNames[i],
                  " requested without a reconstruction stream");
    }
  }

  KLStream ks;
  ks.present = has_kl;
  ks.scale = scale_k;
  if (has_kl) {
    const int64_t m = rows * row_len_k;
    ks.n = m;
    ks.row_len = row_len_k;
    ks.mu = main_operand(*mu, "mu", m, false);
    ks.lv = param_operand(lv, "lv", modes[3], inners[3], counts[3], 0.0, m);
    ks.pmu = param_operand(pmu, "pmu", modes[4], inners[4], counts[4], consts[1], m);
    ks.plv = param_operand(plv, "plv", modes[5], inners[5], counts[5], consts[2], m);
    ks.gmu = grad_output(grads, 5, m, true);
    ks.glv = grad_output(grads, 6, m, ks.lv.mode != ReadMode::Const);
    ks.gpmu = grad_output(grads, 7, m, ks.pmu.mode != ReadMode::Const);
    ks.gplv = grad_output(grads, 8, m, ks.plv.mode != ReadMode::Const);
  } else {
    for (int i = 5; i < 9; ++i) {
      OptTensor g = grads.get(i);
      TORCH_CHECK(!g.has_value() || !g->defined(), "vae_fast_cpu: grad of ", kInputNames[i],
                  " requested without a KL stream");
    }
  }

  const int64_t n_out = red_mode == kTotal ? 1 : (red_mode == kRows ? rows : rows * row_len_r);
  // In ELEMENTWISE mode an output with no elements means "not wanted" (the nll/kl terms
  // have no per-element form worth storing twice).
  auto wanted = [&](const OptTensor& t) {
    return defined(t) && (red_mode != kElementwise || t->numel() > 0);
  };
  const OptTensor none;
  const OptTensor& o_loss = wanted(out_loss) ? out_loss : none;
  const OptTensor& o_nll = wanted(out_nll) ? out_nll : none;
  const OptTensor& o_kl = wanted(out_kl) ? out_kl : none;
  check_out(o_loss, "out_loss", n_out);
  check_out(o_nll, "out_nll", n_out);
  check_out(o_kl, "out_kl", n_out);
  if (red_mode == kElementwise) {
    TORCH_CHECK(kind != kNoRecon, "vae_fast_cpu: the elementwise reduction needs a "
                                  "reconstruction stream");
    // the per-element loss goes to out_loss, or to out_nll when only that is given
    const OptTensor& elem = defined(o_loss) ? o_loss : o_nll;
    if (defined(elem)) {
      rs.elem_loss.data = elem->data_ptr();
      rs.elem_loss.dtype = to_dtype(elem->scalar_type());
    }
  }

  std::vector<double> sums_r, sums_k;
  fused_forward_kernel(rs, ks, static_cast<int>(red_mode), rows, acc_double, sums_r, sums_k);

  if (red_mode == kElementwise) {
    if (defined(o_loss) && defined(o_nll)) o_nll->copy_(*o_loss);
    if (defined(o_kl)) o_kl->zero_();
    return;
  }
  for (int64_t i = 0; i < n_out; ++i) {
    const double nll = scale_r * sums_r[i];
    const double kl = scale_k * sums_k[i];
    if (defined(o_nll)) write_value(*o_nll, i, nll);
    if (defined(o_kl)) write_value(*o_kl, i, kl);
    if (defined(o_loss)) write_value(*o_loss, i, nll + beta * kl);
  }
}

// Per-stream coefficients of scale_: scalar, per row, or per element.
double read_coef(const OptTensor& t, int64_t i) {
  if (!defined(t)) return 0.0;
  if (t->scalar_type() == at::kDouble) return t->data_ptr<double>()[i];
  return static_cast<double>(t->data_ptr<float>()[i]);
}

void check_coef(const OptTensor& t, const char* name, int64_t n) {
  if (!defined(t)) return;
  check_cpu_contig(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
              "vae_fast_cpu: ", name, " must be float32 or float64, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == n, "vae_fast_cpu: ", name, " has ", t->numel(),
              " elements, expected ", n);
}

void scale_buffers(at::TensorList bufs, int64_t n, int64_t row_len, int64_t rows, int red_mode,
                   const OptTensor& ga, double ca, const OptTensor& gb, const char* what) {
  if (bufs.empty()) return;
  for (const Tensor& b : bufs) {
    check_cpu_contig(b, what);
    TORCH_CHECK(is_float(b.scalar_type()), "vae_fast_cpu: ", what, " must be floating, got ",
                b.scalar_type());
    TORCH_CHECK(b.numel() == n, "vae_fast_cpu: ", what, " has ", b.numel(),
                " elements, expected ", n);
  }
  ScaleSpec spec;
  std::vector<double> coef;
  if (red_mode == kElementwise) {
    TORCH_CHECK(ca == 1.0, "vae_fast_cpu: elementwise scaling takes no beta");
    TORCH_CHECK(!defined(ga) || !defined(gb) ||
                    ga->scalar_type() == gb->scalar_type(),
                "vae_fast_cpu: elementwise grad_outputs must share a dtype");
    spec.elementwise = true;
    spec.elem_a = defined(ga) ? ga->data_ptr() : nullptr;
    spec.elem_b = defined(gb) ? gb->data_ptr() : nullptr;
    const OptTensor& any = defined(ga) ? ga : gb;
    spec.elem_dtype = defined(any) && any->scalar_type() == at::kDouble ? DType::Double
                                                                        : DType::Float;
    if (!defined(ga) && !defined(gb)) {
      for (const Tensor& b : bufs) b.zero_();
      return;
    }
  } else {
    const int64_t nc = red_mode == kTotal ? 1 : rows;
    coef.resize(static_cast<size_t>(nc));
    for (int64_t r = 0; r < nc; ++r) coef[r] = ca * read_coef(ga, r) + read_coef(gb, r);
    spec.coef = coef.data();
    spec.n_coef = nc;
    spec.row_len = row_len;
  }
  for (const Tensor& b : bufs) scale_kernel(b.data_ptr(), to_dtype(b.scalar_type()), n, spec);
}

void scale_(at::TensorList bufs_r, at::TensorList bufs_k, const OptTensor& g_loss,
            const OptTensor& g_nll, const OptTensor& g_kl, double beta, int64_t red_mode,
            int64_t rows, int64_t row_len_r, int64_t row_len_k) {
  TORCH_CHECK(red_mode >= 0 && red_mode <= 2, "vae_fast_cpu: red_mode must be 0..2, got ",
              red_mode);
  TORCH_CHECK(rows >= 0 && row_len_r >= 0 && row_len_k >= 0,
              "vae_fast_cpu: rows and row lengths must be >= 0");
  const int64_t n = rows * row_len_r;
  const int64_t m = rows * row_len_k;
  const int64_t n_coef = red_mode == kTotal ? 1 : (red_mode == kRows ? rows : n);
  check_coef(g_loss, "g_loss", n_coef);
  check_coef(g_nll, "g_nll", n_coef);
  check_coef(g_kl, "g_kl", n_coef);
  if (red_mode == kElementwise) {
    TORCH_CHECK(bufs_k.empty(), "vae_fast_cpu: the elementwise reduction has no KL stream");
  }
  // c_r = g_loss + g_nll ; c_k = beta * g_loss + g_kl
  scale_buffers(bufs_r, n, row_len_r, rows, static_cast<int>(red_mode), g_loss, 1.0, g_nll,
                "bufs_r");
  scale_buffers(bufs_k, m, row_len_k, rows, static_cast<int>(red_mode), g_loss, beta, g_kl,
                "bufs_k");
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY(vae_fast_cpu, m) {
  m.def(
      "fused_forward(Tensor? x, Tensor? y, Tensor? rlv, Tensor? w, Tensor? pw, Tensor? mu, "
      "Tensor? lv, Tensor? pmu, Tensor? plv, int rows, int row_len_r, int row_len_k, "
      "int[] modes, int[] inners, int[] counts, float[] consts, int kind, bool full, "
      "int red_mode, float scale_r, float scale_k, float beta, Tensor(a!)? out_loss, "
      "Tensor(b!)? out_nll, Tensor(c!)? out_kl, Tensor(d!)?[] grads) -> ()");
  m.def(
      "scale_(Tensor(a!)[] bufs_r, Tensor(b!)[] bufs_k, Tensor? g_loss, Tensor? g_nll, "
      "Tensor? g_kl, float beta, int red_mode, int rows, int row_len_r, int row_len_k) -> ()");
}

TORCH_LIBRARY_IMPL(vae_fast_cpu, CPU, m) {
  m.impl("fused_forward", &vae_fast::fused_forward);
  m.impl("scale_", &vae_fast::scale_);
}
