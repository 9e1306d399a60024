// vae_fast::iwae_latent: the latent terms of IWAE's log w_kb (Burda et al. 2016), one op call
// forward and one backward (vae_fast/functional.py::iwae_loss calls it; the formula it must
// match is vae_fast/_common.py::iwae_latent, which the reference runs):
//
//   lat_kb = log N(z_kb; 0, I) - log N(z_kb; mu_b, e^lv_b)
//          = -0.5 * sum_j (z_kbj^2 - lv_bj - (z_kbj - mu_bj)^2 e^-lv_bj)   (the 0.5 log 2 pi cancel)
//
// and, for an incoming gradient g (K, B), with d = z - mu and a = d e^-lv:
//
//   d/dz_kbj = g_kb (a - z),   d/dmu_bj = -sum_k g_kb a,   d/dlv_bj = 0.5 sum_k g_kb (1 - d a).
//
// The reason for an op (and not the formula in torch ops, as before): the terms are small
// ((K, B, Z)), so their cost was the host cost of about 25 ATen calls forward and backward,
// a tenth of an IWAE step at K = 5, B = 64, Z = 128 on a 2-core CPU.
//
//   vae_fast::iwae_latent           (K, B) in `dtype` (the pixels' accumulation dtype). Its
//                                   autograd kernel (below) saves the inputs and hangs an
//                                   IwaeLatentBackward node on the result.
//   vae_fast::iwae_latent_backward  the three gradients asked for in `needs` (bit 0: z, 1: mu,
//                                   2: lv), in `dtype`, lv's summed to lv's own shape.
// Both: CPU, loops over (K, B, Z) here with exp(-lv) from ATen's vectorized kernel once per
// (B, Z); other devices (CUDA): the formula in ATen ops; Meta: the shapes.
#include "autograd_util.h"
#include "plan.h"

#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace vae_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

enum Slot : int { kZ = 0, kMu, kLv, kNumIn };

const char* const kInstead = "vae_fast.reference.iwae_loss";

const Tensor& get(const OptTensor& t) {
  static const Tensor none;
  return t.has_value() ? *t : none;
}

// z (K, B, Z) and mu (B, Z) on one device, lv a tensor that broadcasts to mu (or a number);
// vae_fast/_common.py::parse_iwae has checked this for the public call, with its wording
void check(const Tensor& z, const Tensor& mu, const Tensor& lv, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(z.dim() == 3 && mu.dim() == 2 && z.sym_size(1) == mu.sym_size(0) &&
                        z.sym_size(2) == mu.sym_size(1),
                    "vae_fast::iwae_latent: z must be (samples, batch, latent) over mu (batch, "
                    "latent), got z ", py_shape(z.sym_sizes()), " and mu ", py_shape(mu.sym_sizes()));
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "vae_fast::iwae_latent: dtype must be float32 or float64, got ", py_dtype(dtype));
  for (const Tensor* t : {&z, &mu, &lv}) {
    if (!t->defined()) continue;
    TORCH_CHECK_TYPE(t->is_floating_point(), "vae_fast::iwae_latent: z, mu and lv must be floating "
                     "point, got ", py_dtype(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == z.device(), "vae_fast::iwae_latent: every tensor must be on ",
                      z.device(), ", got ", t->device());
  }
  if (lv.defined()) {
    TORCH_CHECK_VALUE(at::is_expandable_to(lv.sym_sizes(), mu.sym_sizes()),
                      "vae_fast::iwae_latent: lv must broadcast to mu's shape ",
                      py_shape(mu.sym_sizes()), ", got ", py_shape(lv.sym_sizes()));
  }
}

// lv on mu's (B, Z) grid in `dtype`, contiguous (a view of lv itself in the common case)
Tensor lv_grid(const Tensor& lv, double lv_c, const Tensor& mu, at::ScalarType dtype) {
  const Tensor t = lv.defined() ? lv.to(dtype) : at::scalar_tensor(lv_c, mu.options().dtype(dtype));
  return t.expand(mu.sizes()).contiguous();
}

// ---- CPU ---------------------------------------------------------------------------------------

Tensor latent_cpu(const Tensor& z_in, const Tensor& mu_in, const OptTensor& lv_in, double lv_c,
                  at::ScalarType dtype) {
  check(z_in, mu_in, get(lv_in), dtype);
  const int64_t K = z_in.size(0), B = z_in.size(1), Z = z_in.size(2);
  const Tensor z = z_in.to(dtype).contiguous(), mu = mu_in.to(dtype).contiguous();
  const Tensor lv = lv_grid(get(lv_in), lv_c, mu, dtype);
  const Tensor ie = at::exp(at::neg(lv));  // e^-lv, (B, Z)
  Tensor out = at::empty({K, B}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "iwae_latent", [&] {
    using T = scalar_t;
    const T *zp = z.const_data_ptr<T>(), *mp = mu.const_data_ptr<T>();
    const T *lp = lv.const_data_ptr<T>(), *ep = ie.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, K * B, std::max<int64_t>(1, 4096 / std::max<int64_t>(Z, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // row r = k * B + b
        const int64_t b = r % B;
        const T *__restrict zr = zp + r * Z, *__restrict m = mp + b * Z;
        const T *__restrict l = lp + b * Z, *__restrict e = ep + b * Z;
        double s = 0.0;
        for (int64_t j = 0; j < Z; ++j) {
          const T d = zr[j] - m[j];
          s += static_cast<double>(zr[j] * zr[j] - l[j] - d * d * e[j]);
        }
        op[r] = static_cast<T>(-0.5 * s);
      }
    });
  });
  return out;
}

Grads latent_backward_cpu(const Tensor& g_in, const Tensor& z_in, const Tensor& mu_in,
                          const OptTensor& lv_in, double lv_c, int64_t needs) {
  const at::ScalarType dtype = g_in.scalar_type();
  check(z_in, mu_in, get(lv_in), dtype);
  const int64_t K = z_in.size(0), B = z_in.size(1), Z = z_in.size(2);
  TORCH_CHECK_VALUE(g_in.dim() == 2 && g_in.size(0) == K && g_in.size(1) == B,
                    "vae_fast::iwae_latent_backward: grad must be (samples, batch) = (", K, ", ",
                    B, "), got ", py_shape(g_in.sym_sizes()));
  const Tensor g = g_in.contiguous();
  const Tensor z = z_in.to(dtype).contiguous(), mu = mu_in.to(dtype).contiguous();
  const Tensor lv = lv_grid(get(lv_in), lv_c, mu, dtype);
  const Tensor ie = at::exp(at::neg(lv));
  const auto opts = z.options();
  const bool want_z = needs & 1, want_mu = needs & 2, want_lv = (needs & 4) && get(lv_in).defined();
  Tensor gz = at::empty(want_z ? std::vector<int64_t>{K, B, Z} : std::vector<int64_t>{0}, opts);
  Tensor gmu = at::empty(want_mu ? std::vector<int64_t>{B, Z} : std::vector<int64_t>{0}, opts);
  Tensor glv = at::empty(want_lv ? std::vector<int64_t>{B, Z} : std::vector<int64_t>{0}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "iwae_latent_backward", [&] {
    using T = scalar_t;
    const T *zp = z.const_data_ptr<T>(), *mp = mu.const_data_ptr<T>();
    const T *ep = ie.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    T* gzp = want_z ? gz.data_ptr<T>() : nullptr;
    T* gmp = want_mu ? gmu.data_ptr<T>() : nullptr;
    T* glp = want_lv ? glv.data_ptr<T>() : nullptr;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * Z, 1)),
                     [&](int64_t b0, int64_t b1) {
      std::vector<T> sm(static_cast<size_t>(Z)), sl(static_cast<size_t>(Z));
      for (int64_t b = b0; b < b1; ++b) {
        const T *__restrict m = mp + b * Z, *__restrict e = ep + b * Z;
        std::fill(sm.begin(), sm.end(), T(0));
        std::fill(sl.begin(), sl.end(), T(0));
        T *__restrict am = sm.data(), *__restrict al = sl.data();
        for (int64_t k = 0; k < K; ++k) {  // in order of k: the sums do not depend on threads
          const int64_t r = k * B + b;
          const T gk = gp[r];
          const T* __restrict zr = zp + r * Z;
          T* __restrict out = gzp ? gzp + r * Z : nullptr;
          for (int64_t j = 0; j < Z; ++j) {
            const T d = zr[j] - m[j];
            const T a = d * e[j];
            if (out) out[j] = gk * (a - zr[j]);
            am[j] -= gk * a;
            al[j] += gk * (T(1) - d * a);
          }
        }
        if (gmp) std::copy(sm.begin(), sm.end(), gmp + b * Z);
        if (glp) {
          for (int64_t j = 0; j < Z; ++j) glp[b * Z + j] = T(0.5) * al[j];
        }
      }
    });
  });
  if (want_lv) glv = at::sum_to(glv, lv_in->sizes());
  return {gz, gmu, glv};
}

// ---- other devices (CUDA): the formula in ATen ops ---------------------------------------------

Tensor latent_aten(const Tensor& z_in, const Tensor& mu_in, const OptTensor& lv_in, double lv_c,
                   at::ScalarType dtype) {
  check(z_in, mu_in, get(lv_in), dtype);
  const Tensor z = z_in.to(dtype), mu = mu_in.to(dtype), lv = lv_grid(get(lv_in), lv_c, mu, dtype);
  const Tensor d = z - mu;
  return ((z * z - lv - d * d * at::exp(at::neg(lv))).sum(-1) * -0.5);
}

Grads latent_backward_aten(const Tensor& g, const Tensor& z_in, const Tensor& mu_in,
                           const OptTensor& lv_in, double lv_c, int64_t needs) {
  const at::ScalarType dtype = g.scalar_type();
  check(z_in, mu_in, get(lv_in), dtype);
  const Tensor z = z_in.to(dtype), mu = mu_in.to(dtype), lv = lv_grid(get(lv_in), lv_c, mu, dtype);
  const Tensor d = z - mu, a = d * at::exp(at::neg(lv)), gk = g.unsqueeze(-1);
  const auto none = [&] { return at::empty({0}, z.options()); };
  Tensor gz = (needs & 1) ? (gk * (a - z)).contiguous() : none();
  Tensor gmu = (needs & 2) ? at::neg((gk * a).sum(0)) : none();
  Tensor glv = (needs & 4) && get(lv_in).defined()
                   ? at::sum_to((gk * (1.0 - d * a)).sum(0) * 0.5, lv_in->sizes())
                   : none();
  return {gz, gmu, glv};
}

// ---- Meta: the shapes --------------------------------------------------------------------------

Tensor latent_meta(const Tensor& z, const Tensor& mu, const OptTensor& lv, double lv_c,
                   at::ScalarType dtype) {
  check(z, mu, get(lv), dtype);
  return at::empty_symint({z.sym_size(0), z.sym_size(1)}, z.options().dtype(dtype));
}

Grads latent_backward_meta(const Tensor& g, const Tensor& z, const Tensor& mu, const OptTensor& lv,
                           double lv_c, int64_t needs) {
  check(z, mu, get(lv), g.scalar_type());
  const auto opts = z.options().dtype(g.scalar_type());
  const auto none = [&] { return at::empty({0}, opts); };
  return {(needs & 1) ? at::empty_symint(z.sym_sizes(), opts) : none(),
          (needs & 2) ? at::empty_symint(mu.sym_sizes(), opts) : none(),
          (needs & 4) && get(lv).defined() ? at::empty_symint(lv->sym_sizes(), opts) : none()};
}

// ---- autograd ----------------------------------------------------------------------------------

const c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const OptTensor&, double,
                                      at::ScalarType)>&
latent_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::iwae_latent", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, double,
                                           at::ScalarType)>();
  return op;
}

const c10::TypedOperatorHandle<Grads(const Tensor&, const Tensor&, const Tensor&,
                                     const OptTensor&, double, int64_t)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::iwae_latent_backward", "")
                             .typed<Grads(const Tensor&, const Tensor&, const Tensor&,
                                          const OptTensor&, double, int64_t)>();
  return op;
}

struct IwaeLatentBackward : public torch::autograd::Node {
  SavedVariable z, mu, lv;
  double lv_c = 0.0;
  std::array<bool, kNumIn> need{};
  std::array<at::ScalarType, kNumIn> dtype{};

  std::string name() const override {
    return "vae_fast::IwaeLatentBackward";
  }

  void release_variables() override {
    z.reset_data();
    mu.reset_data();
    lv.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(kNumIn);
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    int64_t needs = 0;
    for (int s = 0; s < kNumIn; ++s) {
      if (need[s] && task_should_compute_output(s)) needs |= int64_t{1} << s;
    }
    if (!needs) return out;
    const Tensor lv_t = lv.unpack();
    const OptTensor lv_opt = lv_t.defined() ? OptTensor(lv_t) : std::nullopt;
    Grads r = backward_op().call(g, z.unpack(), mu.unpack(), lv_opt, lv_c, needs);
    const Tensor res[kNumIn] = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    for (int s = 0; s < kNumIn; ++s) {
      if ((needs >> s) & 1) out[s] = res[s].to(dtype[s]);
    }
    if (at::GradMode::is_enabled()) {
      // create_graph=True (torch.func.grad asks for it): right gradients, no second derivative
      raise_on_backward(out, twice_message("iwae_loss's latent terms'", kInstead),
                        torch::autograd::edge_list(next_edges()));
    }
    return out;
  }
};

Tensor latent_autograd(const Tensor& z, const Tensor& mu, const OptTensor& lv, double lv_c,
                       at::ScalarType dtype) {
  refuse_forward_ad({&z, &mu, &get(lv)}, "iwae_loss has", kInstead);
  const Tensor* in[kNumIn] = {&z, &mu, &get(lv)};
  std::array<bool, kNumIn> need{};
  bool any = false;
  if (at::GradMode::is_enabled()) {
    for (int s = 0; s < kNumIn; ++s) {
      need[s] = in[s]->defined() && in[s]->requires_grad();
      any = any || need[s];
    }
  }
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = latent_op().call(z, mu, lv, lv_c, dtype);
  }
  if (!any) return out;
  auto node = make_node<IwaeLatentBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(z, mu, lv));
  node->z = SavedVariable(z, /*is_output=*/false);
  node->mu = SavedVariable(mu, /*is_output=*/false);
  if (lv.has_value() && lv->defined()) node->lv = SavedVariable(*lv, /*is_output=*/false);
  node->lv_c = lv_c;
  for (int s = 0; s < kNumIn; ++s) {
    node->need[s] = need[s];
    if (need[s]) node->dtype[s] = in[s]->scalar_type();
  }
  torch::autograd::set_history(out, node);
  return out;
}

// iwae_latent_backward is not differentiable (its outputs are gradients): reached with autograd
// on when torch.func differentiates the bound's gradient; its outputs then raise on a backward.
Grads latent_backward_autograd(const Tensor& g, const Tensor& z, const Tensor& mu,
                               const OptTensor& lv, double lv_c, int64_t needs) {
  refuse_forward_ad({&g, &z, &mu, &get(lv)}, "iwae_loss has", kInstead);
  const bool track = torch::autograd::compute_requires_grad(g, z, mu, lv);
  Grads r = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(g, z, mu, lv, lv_c, needs);
  }();
  if (track) {
    std::vector<Tensor> outs = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    raise_on_backward(outs, twice_message("iwae_loss's latent terms'", kInstead),
                      torch::autograd::collect_next_edges(g, z, mu, lv));
    return {outs[0], outs[1], outs[2]};
  }
  return r;
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY_FRAGMENT(vae_fast, m) {
  m.def("iwae_latent(Tensor z, Tensor mu, Tensor? lv, float lv_c, ScalarType dtype) -> Tensor");
  m.def("iwae_latent_backward(Tensor grad, Tensor z, Tensor mu, Tensor? lv, float lv_c, "
        "int needs) -> (Tensor g_z, Tensor g_mu, Tensor g_lv)");
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("iwae_latent", &vae_fast::latent_autograd);
  m.impl("iwae_latent_backward", &vae_fast::latent_backward_autograd);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("iwae_latent", &vae_fast::latent_cpu);
  m.impl("iwae_latent_backward", &vae_fast::latent_backward_cpu);
}

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("iwae_latent", &vae_fast::latent_aten);
  m.impl("iwae_latent_backward", &vae_fast::latent_backward_aten);
}

TORCH_LIBRARY_IMPL(vae_fast, Meta, m) {
  m.impl("iwae_latent", &vae_fast::latent_meta);
  m.impl("iwae_latent_backward", &vae_fast::latent_backward_meta);
}
