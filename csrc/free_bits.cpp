// vae_fast::free_bits_kl: the KL term of free bits (Kingma et al. 2016) in one op call,
// `sum_j max(lam, mean_b KL_bj)` with KL_bj = 0.5*(expm1(s-s_p) - (s-s_p) + (mu-mu_p)^2*exp(-s_p)),
// j running over the positions of mu[0]. vae_fast/functional.py::_floored_kl calls it; the
// formula it must match is vae_fast/reference.py::free_bits_kl.
//
//   vae_fast::free_bits_kl   the op: a 0-d tensor. Its autograd kernel (below) runs
//                            free_bits_fwd and hangs a FreeBitsBackward node on the result,
//                            whose backward only multiplies the gradients the forward wrote by
//                            the incoming grad and casts them to each input's dtype.
//   vae_fast::free_bits_fwd  the pass: the value and the gradients asked for in `needs`
//                            (bits 0-4: mu, lv, pmu, plv, lam_t), already masked by the floor,
//                            scaled by 1/B and summed to each broadcast parameter's shape.
//                            CPU: two loops over (B, D) here (the column sums, then the
//                            gradients), expm1 and exp by ATen's vectorized kernels in place;
//                            other devices (CUDA): a few ATen ops on (B, D); Meta: the shapes
//                            (torch.compile, opcheck).
//
// The reason for a separate op (and not the fused KL plus torch ops, as before): the term is
// tiny, so its cost is host overhead per op call; one call with its backward in C++ costs one
// dispatch forward and one multiply per input backward.
//
// Gradient at the floor, as the reference's autograd gives it: a number lam is
// clamp_min's (the dimension keeps its gradient where mean >= lam); a tensor lam is
// torch.maximum's (half to the dimension, half to lam at a tie; lam takes the gradient of
// every dimension under it).
#include "autograd_util.h"
#include "plan.h"

#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/expm1.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace vae_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// inputs that can take a gradient, in the order of the op's arguments and of `needs`' bits
enum Slot { kGMu = 0, kGLv, kGPmu, kGPlv, kGLam, kNumIn };

#define FB_ARGS                                                                      \
  const Tensor &mu, const OptTensor &lv, const OptTensor &pmu, const OptTensor &plv, \
      double lv_c, double pmu_c, double plv_c, const OptTensor &lam_t, double lam
#define FB_FORWARD mu, lv, pmu, plv, lv_c, pmu_c, plv_c, lam_t, lam
constexpr const char* kArgs =
    "Tensor mu, Tensor? lv, Tensor? pmu, Tensor? plv, float lv_c, float pmu_c, float plv_c, "
    "Tensor? lam_t, float lam";

const std::string kTwice = twice_message("the free-bits KL's", "vae_fast.reference");

const Tensor& get(const OptTensor& t) {
  static const Tensor none;
  return t.has_value() ? *t : none;
}

// The checks of the fused KL (csrc/plan.cpp, worded as vae_fast/_common.py words them for
// gaussian_kl's arguments) plus lam's; returns the accumulation dtype (float64 when any of
// mu, lv, pmu, plv is, else float32: vae_fast/_common.py::acc_dtype; lam does not count).
// The common case (real tensors of the kernels' dtypes on one device, parameters that
// broadcast) is recognized here, cheaply: under cold caches make_plan's code is a measurable
// part of the term's cost. Anything else goes to make_plan, which raises with the wording.
bool plainly_valid(const Tensor& mu, const Tensor* const* params, at::ScalarType& acc) {
  auto readable = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  };
  if (!(mu.is_cpu() || mu.is_cuda()) || mu.layout() != at::kStrided || mu.dim() == 0 ||
      !readable(mu.scalar_type())) {
    return false;
  }
  acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (int k = 0; k < 3; ++k) {
    const Tensor& p = *params[k];
    if (!p.defined()) continue;
    if (!readable(p.scalar_type()) || p.device() != mu.device() || p.dim() > mu.dim()) return false;
    for (int64_t i = 1; i <= p.dim(); ++i) {
      const int64_t n = p.size(p.dim() - i);
      if (n != 1 && n != mu.size(mu.dim() - i)) return false;
    }
    if (p.scalar_type() == at::kDouble) acc = at::kDouble;
  }
  return true;
}

at::ScalarType check(FB_ARGS, int64_t needs) {
  const Tensor* params[3] = {&get(lv), &get(pmu), &get(plv)};
  at::ScalarType acc = at::kFloat;
  if (!plainly_valid(mu, params, acc)) {
    Call c;
    c.api = kGaussianKl;
    c.kind = kNone;
    c.reduction = kSum;
    c.t[kMu] = mu;
    c.t[kLv] = *params[0];
    c.t[kPmu] = *params[1];
    c.t[kPlv] = *params[2];
    acc = make_plan(c).acc;
  }
  const Tensor& l = get(lam_t);
  if (l.defined()) {
    TORCH_CHECK_TYPE(l.is_floating_point() && l.dim() == 0,
                     "free_bits must be a number or a 0-d floating tensor, got a tensor of dtype ",
                     py_dtype(l.scalar_type()), " and shape ", py_shape(l.sym_sizes()));
  } else {
    TORCH_CHECK_VALUE(lam >= 0.0, "free_bits must be a non-negative number, got ", lam);
  }
  const Tensor* in[kNumIn] = {&mu, &get(lv), &get(pmu), &get(plv), &l};
  TORCH_CHECK_VALUE(needs >= 0 && needs < (1 << kNumIn),
                    "vae_fast: needs must be a bit mask of the five inputs, got ", needs);
  for (int s = 0; s < kNumIn; ++s) {
    TORCH_CHECK_VALUE(!((needs >> s) & 1) || in[s]->defined(),
                      "vae_fast: a gradient of input ", s, " is asked for, but it is not a tensor");
  }
  return acc;
}

// an empty placeholder for a gradient not asked for (one each: outputs must not alias)
Tensor placeholder(const Tensor& mu, at::ScalarType acc) {
  return at::empty({0}, mu.options().dtype(acc));
}

// ---- the floor of one dimension: value, gradient weight of the dimension, of lam ------------

template <typename T>
struct Floor {
  T value, w, w_lam;
};

template <typename T>
Floor<T> floor_of(T m, T l, bool tensor_lam) {
  if (!tensor_lam) {  // clamp_min(m, l): nan stays nan; gradient where m >= l
    return {m < l ? l : m, T(m >= l ? 1 : 0), T(0)};
  }
  // torch.maximum: nan if either is; at a tie half each; the smaller side gets 0
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T v = (m != m || l != l) ? nan : (m < l ? l : m);
  const T tie = T(m == l ? 0.5 : 1);
  return {v, m < l ? T(0) : tie, m > l ? T(0) : tie};
}

// ---- CPU: one loop over (B, D) ---------------------------------------------------------------

// One operand on the (B, D) grid, read a row at a time: row b is p + b * s0, its columns
// contiguous (s0 = 0: the same row for every example). Plain pointers with unit column
// stride, so that the compiler vectorizes the loops over columns.
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t s0 = 0;
  const T* row(int64_t b) const {
    return p + b * s0;
  }
};

// A tensor operand in the accumulation dtype, expanded to mu's shape and flattened to (B, D):
// a view wherever the strides allow (a (Z,) prior stays Z numbers), else a copy; columns
// made contiguous (a copy only for the rare broadcasts that leave them strided, (B, 1)).
Tensor grid(const Tensor& t, const Tensor& mu, int64_t b, int64_t d, at::ScalarType acc) {
  Tensor g = t.to(acc).expand(mu.sizes()).reshape({b, d});
  return d > 1 && g.stride(1) != 1 ? g.contiguous() : g;
}

// A tensor operand's rows (`keep` holds a copy where one is made), or a number's: one row
// of it, shared by every example (`fill`). The common layouts, a contiguous tensor of mu's
// shape or of mu[0]'s (a per-feature prior), are read in place without making a view: under
// cold caches every extra op costs.
template <typename T>
Rows<T> rows_of(const Tensor& t, double c, const Tensor& mu, int64_t b_n, int64_t d_n,
                at::ScalarType acc, Tensor& keep, std::vector<T>& fill) {
  if (!t.defined()) {
    fill.assign(static_cast<size_t>(std::max<int64_t>(d_n, 1)), static_cast<T>(c));
    return {fill.data(), 0};
  }
  if (t.scalar_type() == acc && t.is_contiguous()) {
    if (t.sizes() == mu.sizes()) return {t.const_data_ptr<T>(), d_n};
    bool per_feature = t.numel() == d_n;  // mu[0]'s shape, maybe with leading 1s
    for (int64_t i = 1; per_feature && i <= t.dim(); ++i) {
      const int64_t k = mu.dim() - i;
      per_feature = t.size(t.dim() - i) == (k >= 1 ? mu.size(k) : 1);
    }
    if (per_feature) return {t.const_data_ptr<T>(), 0};
  }
  keep = grid(t, mu, b_n, d_n, acc);
  return {keep.const_data_ptr<T>(), keep.stride(0)};
}

// `n_rows` by d_n scratch rows (1: shared by every example).
template <typename T>
Rows<T> scratch(int64_t n_rows, int64_t d_n, const at::TensorOptions& opts, Tensor& keep) {
  keep = at::empty({n_rows, d_n}, opts);
  return {keep.const_data_ptr<T>(), n_rows > 1 ? d_n : 0};
}

// The loops do no transcendental call: expm1(s - s_p) and exp(-s_p) come from ATen's
// vectorized kernels on the parameters' own shapes (glibc's scalar expm1f in the loop made
// it several times slower than the whole term may cost). Two passes per chunk of columns:
// the sums over the batch (in T, in a fixed order), then the gradients with the floor known.
template <typename T>
void cpu_pass(const Rows<T>& mu, const Rows<T>& pmu, const Rows<T>& lv, const Rows<T>& plv,
              const Rows<T>& em, const Rows<T>& e, int64_t b_n, int64_t d_n, T lam, bool tensor_lam, T* g[4],
              double& value, double& w_lam) {
  std::vector<double> val(d_n), wl(d_n);
  const T inv_b = T(1) / static_cast<T>(b_n);
  // chunks of about 32K elements; each sums its own columns over the whole batch in the same
  // order whatever the threads: the result does not depend on them
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(b_n, 1));
  at::parallel_for(0, d_n, grain, [&](int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    std::vector<T> sum_v(n, T(0)), scale_v(n);
    T* __restrict sum = sum_v.data();
    T* __restrict scale = scale_v.data();
    for (int64_t b = 0; b < b_n; ++b) {
      const T *__restrict m = mu.row(b) + j0, *__restrict pm = pmu.row(b) + j0;
      const T *__restrict s = lv.row(b) + j0, *__restrict sp = plv.row(b) + j0;
      const T *__restrict m1 = em.row(b) + j0, *__restrict ee = e.row(b) + j0;
      for (int64_t j = 0; j < n; ++j) {
        const T diff = m[j] - pm[j];
        sum[j] += T(0.5) * (m1[j] - (s[j] - sp[j]) + diff * diff * ee[j]);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const Floor<T> f = floor_of(sum[j] / static_cast<T>(b_n), lam, tensor_lam);  // the mean
      val[j0 + j] = static_cast<double>(f.value);
      wl[j0 + j] = static_cast<double>(f.w_lam);
      scale[j] = f.w * inv_b;
    }
    for (int64_t b = 0; b < b_n; ++b) {
      const T *__restrict m = mu.row(b) + j0, *__restrict pm = pmu.row(b) + j0;
      const T *__restrict m1 = em.row(b) + j0, *__restrict ee = e.row(b) + j0;
      const int64_t o = b * d_n + j0;
      if (g[0]) {
        T* __restrict out = g[0] + o;
        for (int64_t j = 0; j < n; ++j) out[j] = (m[j] - pm[j]) * ee[j] * scale[j];
      }
      if (g[1]) {
        T* __restrict out = g[1] + o;
        for (int64_t j = 0; j < n; ++j) out[j] = T(0.5) * m1[j] * scale[j];
      }
      if (g[2]) {
        T* __restrict out = g[2] + o;
        for (int64_t j = 0; j < n; ++j) out[j] = -(m[j] - pm[j]) * ee[j] * scale[j];
      }
      if (g[3]) {
        T* __restrict out = g[3] + o;
        for (int64_t j = 0; j < n; ++j) {
          const T diff = m[j] - pm[j];
          out[j] = T(-0.5) * (m1[j] + diff * diff * ee[j]) * scale[j];
        }
      }
    }
  });
  value = 0.0;
  w_lam = 0.0;
  for (int64_t j = 0; j < d_n; ++j) {  // in order: deterministic
    value += val[j];
    w_lam += wl[j];
  }
}

// The gradient of a parameter, from its full (B, D) buffer: summed to its own shape.
Tensor to_shape(const Tensor& full, const Tensor& mu, const Tensor& p) {
  Tensor g = full.view(mu.sizes());
  return p.sizes() == mu.sizes() ? g : at::sum_to(g, p.sizes());
}

Fwd free_bits_fwd_cpu(FB_ARGS, int64_t needs) {
  const at::ScalarType acc = check(FB_FORWARD, needs);
  const int64_t b_n = mu.size(0);
  int64_t d_n = 1;  // the positions of mu[0]
  for (int64_t i = 1; i < mu.dim(); ++i) d_n *= mu.size(i);
  const auto opts = mu.options().dtype(acc);
  const Tensor &lv_t = get(lv), &pmu_t = get(pmu), &plv_t = get(plv);
  Tensor full[4];  // the (B, D) gradient buffers asked for
  for (int k = 0; k < 4; ++k) {
    if ((needs >> k) & 1) full[k] = at::empty({b_n, d_n}, opts);
  }
  const bool tensor_lam = lam_t.has_value() && lam_t->defined();
  const double l = tensor_lam ? lam_t->item<double>() : lam;
  double value = 0.0, w_lam = 0.0;
  AT_DISPATCH_FLOATING_TYPES(acc, "free_bits_kl", [&] {
    using T = scalar_t;
    Tensor keep[6];
    std::vector<T> fill[6];  // the rows of numbers
    const Rows<T> r_mu = rows_of<T>(mu, 0.0, mu, b_n, d_n, acc, keep[0], fill[0]);
    const Rows<T> r_pmu = rows_of<T>(pmu_t, pmu_c, mu, b_n, d_n, acc, keep[1], fill[1]);
    const Rows<T> r_lv = rows_of<T>(lv_t, lv_c, mu, b_n, d_n, acc, keep[2], fill[2]);
    const Rows<T> r_plv = rows_of<T>(plv_t, plv_c, mu, b_n, d_n, acc, keep[3], fill[3]);
    // expm1(s - s_p) and exp(-s_p): their arguments written here, then ATen's vectorized
    // kernels in place, on one row where the parameters are the same for every example
    Rows<T> r_em, r_e;
    if (lv_t.defined() || plv_t.defined()) {
      r_em = scratch<T>(r_lv.s0 || r_plv.s0 ? b_n : 1, d_n, opts, keep[4]);
      for (int64_t b = 0; b < keep[4].size(0); ++b) {
        T* out = keep[4].data_ptr<T>() + b * d_n;
        const T *s = r_lv.row(b), *sp = r_plv.row(b);
        for (int64_t j = 0; j < d_n; ++j) out[j] = s[j] - sp[j];
      }
      keep[4].expm1_();
    } else {
      const T d_c = static_cast<T>(lv_c) - static_cast<T>(plv_c);
      r_em = rows_of<T>(Tensor(), std::expm1(d_c), mu, b_n, d_n, acc, keep[4], fill[4]);
    }
    if (plv_t.defined()) {
      r_e = scratch<T>(r_plv.s0 ? b_n : 1, d_n, opts, keep[5]);
      for (int64_t b = 0; b < keep[5].size(0); ++b) {
        T* out = keep[5].data_ptr<T>() + b * d_n;
        const T* sp = r_plv.row(b);
        for (int64_t j = 0; j < d_n; ++j) out[j] = -sp[j];
      }
      keep[5].exp_();
    } else {
      r_e = rows_of<T>(Tensor(), std::exp(-static_cast<T>(plv_c)), mu, b_n, d_n, acc, keep[5],
                       fill[5]);
    }
    T* g[4];
    for (int k = 0; k < 4; ++k) g[k] = full[k].defined() ? full[k].data_ptr<T>() : nullptr;
    cpu_pass<T>(r_mu, r_pmu, r_lv, r_plv, r_em, r_e, b_n, d_n, static_cast<T>(l), tensor_lam, g,
                value, w_lam);
  });
  const Tensor* params[3] = {&lv_t, &pmu_t, &plv_t};
  Tensor out[kNumIn];
  if (full[0].defined()) out[kGMu] = full[0].view(mu.sizes());
  for (int k = 1; k < 4; ++k) {
    if (full[k].defined()) out[k] = to_shape(full[k], mu, *params[k - 1]);
  }
  // 0-d results written in place: at::scalar_tensor would run a fill kernel
  auto number = [&](double v) {
    Tensor t = at::empty({}, opts);
    AT_DISPATCH_FLOATING_TYPES(acc, "free_bits_kl", [&] { *t.data_ptr<scalar_t>() = v; });
    return t;
  };
  if ((needs >> kGLam) & 1) out[kGLam] = number(w_lam);
  for (Tensor& t : out) {
    if (!t.defined()) t = placeholder(mu, acc);
  }
  return {number(value), out[0], out[1], out[2], out[3], out[4]};
}

// ---- other devices (CUDA): ATen ops on (B, D), no host sync ----------------------------------

Fwd free_bits_fwd_aten(FB_ARGS, int64_t needs) {
  const at::ScalarType acc = check(FB_FORWARD, needs);
  const int64_t b_n = mu.size(0);
  // numbers as 0-d CPU tensors: they broadcast against tensors of any device
  auto as_t = [&](const OptTensor& t, double c) {
    return t.has_value() && t->defined() ? t->to(acc)
                                         : at::scalar_tensor(c, at::TensorOptions().dtype(acc));
  };
  const Tensor m0 = mu.to(acc), s = as_t(lv, lv_c), mp = as_t(pmu, pmu_c), sp = as_t(plv, plv_c);
  const Tensor d = s - sp, em = at::expm1(d), e = at::exp(-sp), diff = m0 - mp;
  const Tensor q = diff * diff * e;
  const Tensor m = ((em - d + q) * 0.5).sum(0) / static_cast<double>(b_n);  // mu[0]'s shape
  Tensor value, w, w_lam;
  if (lam_t.has_value() && lam_t->defined()) {
    const Tensor l = lam_t->to(acc);
    value = at::maximum(m, l).sum();
    const Tensor tie = at::where(m == l, 0.5, 1.0).to(acc);
    w = tie.masked_fill(m < l, 0.0);
    w_lam = tie.masked_fill(m > l, 0.0).sum();
  } else {
    value = m.clamp_min(lam).sum();
    w = (m >= lam).to(acc);
  }
  const Tensor scale = w / static_cast<double>(b_n);
  Tensor out[kNumIn];
  const Tensor* params[3] = {&get(lv), &get(pmu), &get(plv)};
  auto put = [&](int k, const Tensor& g) {  // the gradient of input k, on mu's grid
    const Tensor full = (g * scale).expand(mu.sizes());
    out[k] = k == kGMu ? full.contiguous() : at::sum_to(full, params[k - 1]->sizes()).contiguous();
  };
  if ((needs >> kGMu) & 1) put(kGMu, diff * e);
  if ((needs >> kGLv) & 1) put(kGLv, em * 0.5);
  if ((needs >> kGPmu) & 1) put(kGPmu, -(diff * e));
  if ((needs >> kGPlv) & 1) put(kGPlv, (em + q) * -0.5);
  if ((needs >> kGLam) & 1) out[kGLam] = w_lam;  // check(): needs a tensor lam
  for (Tensor& t : out) {
    if (!t.defined()) t = placeholder(mu, acc);
  }
  return {value, out[0], out[1], out[2], out[3], out[4]};
}

// ---- Meta: the shapes ------------------------------------------------------------------------

Fwd free_bits_fwd_meta(FB_ARGS, int64_t needs) {
  const at::ScalarType acc = check(FB_FORWARD, needs);
  const auto opts = mu.options().dtype(acc);
  const Tensor* in[kNumIn] = {&mu, &get(lv), &get(pmu), &get(plv), &get(lam_t)};
  Tensor out[kNumIn];
  for (int s = 0; s < kNumIn; ++s) {
    out[s] = ((needs >> s) & 1) ? at::empty_symint(in[s]->sym_sizes(), opts)
                                : placeholder(mu, acc);
  }
  return {at::empty({}, opts), out[0], out[1], out[2], out[3], out[4]};
}

const c10::TypedOperatorHandle<Fwd(FB_ARGS, int64_t)>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::free_bits_fwd", "")
                             .typed<Fwd(FB_ARGS, int64_t)>();
  return op;
}

void refuse_forward_ad(std::initializer_list<const Tensor*> inputs) {
  vae_fast::refuse_forward_ad(inputs, "the free-bits KL has", "vae_fast.reference");
}

// free_bits_fwd is not differentiable (its outputs are gradients); reached with autograd on
// only by a direct caller or when torch.func differentiates the term's gradient: its outputs
// then get a node that raises if a backward reaches it, rather than silent zeros.
Fwd free_bits_fwd_autograd(FB_ARGS, int64_t needs) {
  refuse_forward_ad({&mu, &get(lv), &get(pmu), &get(plv), &get(lam_t)});
  const bool track = torch::autograd::compute_requires_grad(mu, lv, pmu, plv, lam_t);
  Fwd out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(FB_FORWARD, needs);
  }();
  if (track) {
    std::vector<Tensor> outs = std::apply([](auto&... t) { return std::vector<Tensor>{t...}; }, out);
    raise_on_backward(outs, kTwice, torch::autograd::collect_next_edges(mu, lv, pmu, plv, lam_t));
  }
  return out;
}

// ---- vae_fast::free_bits_kl: autograd --------------------------------------------------------

struct FreeBitsBackward : public torch::autograd::Node {
  std::array<SavedVariable, kNumIn> buf;  // the gradients the forward wrote
  std::array<bool, kNumIn> need{};
  std::array<at::ScalarType, kNumIn> dtype{};

  std::string name() const override {
    return "vae_fast::FreeBitsBackward";
  }

  void release_variables() override {
    for (SavedVariable& b : buf) b.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(kNumIn);
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    for (int s = 0; s < kNumIn; ++s) {
      if (!need[s] || !task_should_compute_output(s)) continue;
      // out of place: the buffers are small, and a retained graph must find them intact
      out[s] = (buf[s].unpack() * g).to(dtype[s]);
    }
    if (at::GradMode::is_enabled()) {
      // create_graph=True (torch.func.grad always asks for it): the gradients are right, but a
      // second backward through them must raise, not treat the buffers as constants
      raise_on_backward(out, kTwice, torch::autograd::edge_list(next_edges()));
    }
    return out;
  }
};

Tensor free_bits_kl_autograd(FB_ARGS) {
  const Tensor* in[kNumIn] = {&mu, &get(lv), &get(pmu), &get(plv), &get(lam_t)};
  refuse_forward_ad({in[0], in[1], in[2], in[3], in[4]});
  int64_t needs = 0;
  if (at::GradMode::is_enabled()) {
    for (int s = 0; s < kNumIn; ++s) {
      if (in[s]->defined() && in[s]->requires_grad()) needs |= int64_t(1) << s;
    }
  }
  Fwd o = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(FB_FORWARD, needs);
  }();
  Tensor value = std::get<0>(o);
  if (needs) {
    auto node = make_node<FreeBitsBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(mu, lv, pmu, plv, lam_t));
    const Tensor bufs[kNumIn] = {std::get<1>(o), std::get<2>(o), std::get<3>(o), std::get<4>(o),
                                 std::get<5>(o)};
    for (int s = 0; s < kNumIn; ++s) {
      if (!((needs >> s) & 1)) continue;
      node->need[s] = true;
      node->buf[s] = SavedVariable(bufs[s], /*is_output=*/false);
      node->dtype[s] = in[s]->scalar_type();
    }
    torch::autograd::set_history(value, node);
  }
  return value;
}

// Without autograd (inference mode, or below it): the value alone.
Tensor free_bits_kl_plain(FB_ARGS) {
  return std::get<0>(fwd_op().call(FB_FORWARD, 0));
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY_FRAGMENT(vae_fast, m) {
  using std::string;
  m.def(("free_bits_kl(" + string(vae_fast::kArgs) + ") -> Tensor").c_str());
  m.def(("free_bits_fwd(" + string(vae_fast::kArgs) +
         ", int needs) -> (Tensor kl, Tensor g_mu, Tensor g_lv, Tensor g_pmu, Tensor g_plv, "
         "Tensor g_lam)").c_str());
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("free_bits_kl", &vae_fast::free_bits_kl_autograd);
  m.impl("free_bits_fwd", &vae_fast::free_bits_fwd_autograd);
}

TORCH_LIBRARY_IMPL(vae_fast, CompositeExplicitAutograd, m) {
  m.impl("free_bits_kl", &vae_fast::free_bits_kl_plain);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("free_bits_fwd", &vae_fast::free_bits_fwd_cpu);
}

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("free_bits_fwd", &vae_fast::free_bits_fwd_aten);
}

TORCH_LIBRARY_IMPL(vae_fast, Meta, m) {
  m.impl("free_bits_fwd", &vae_fast::free_bits_fwd_meta);
}
