// vae_fast::iwae: the importance-weighted bound (Burda et al. 2016) of vae_fast.iwae_loss, the
// pixels' part in one pass that also applies the importance weights to the gradient.
//
// With rows k*B + b of recon (K, B, ...) against target (B, ...) and the latent terms
// lat_kb = log N(z_kb; 0, I) - log N(z_kb; mu_b, sigma_b) (computed by the op of
// csrc/iwae_latent.cpp, whose backward takes lat's gradient to z, mu and logvar):
//
//   log w_kb = lat_kb - nll_kb,   per_b = -(logsumexp_k log w_kb - log K),
//   w_kb = softmax_k(log w_kb),   d per_b / d nll_kb = w_kb,   d per_b / d lat_kb = -w_kb.
//
// The weights are known only once all K rows of an example are summed, so before this op the
// backward multiplied the whole (K, B, ...) gradient by them in one more pass over memory (read
// and write of K times the pixels). Here the CPU pass works example by example: the K rows of
// example b, their weights, and the K rows of gradient scaled while still in cache
// (run.cpp::run_iwae, cpu_kernels.h: IwaeStream). The gradient is stored already multiplied by
// the reduction's scale (1/B for batchmean), so a backward with grad_output 1 moves no memory.
// Triton (CUDA): the sampled pass, then the weights and one scaling pass by ATen ops.
//
//   vae_fast::iwae      the op: the reduced bound. Its autograd kernel runs iwae_fwd and hangs
//                       an IwaeBackward node on the result, which saves the stored gradients
//                       and w (K, B).
//   vae_fast::iwae_fwd  per (B,), w (K, B), and the gradients asked for in `needs` (bit 0:
//                       x, bit 1: rlv; the target takes none). CPU, CUDA and Meta kernels.
#include "autograd_util.h"
#include "plan.h"
#include "run.h"

#include <ATen/ExpandUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/neg.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace vae_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor>;

#define IWAE_ARGS                                                                          \
  const Tensor &x, const Tensor &y, const OptTensor &rlv, const Tensor &lat, int64_t kind, \
      bool full, double rlv_c, int64_t reduction, int64_t backend
#define IWAE_FORWARD x, y, rlv, lat, kind, full, rlv_c, reduction, backend
constexpr const char* kArgs =
    "Tensor x, Tensor y, Tensor? rlv, Tensor lat, int kind, bool full, float rlv_c, "
    "int reduction, int backend";

enum Need : int64_t { kNeedX = 1, kNeedRlv = 2 };

const char* const kInstead = "vae_fast.reference.iwae_loss";

const Tensor& get(const OptTensor& t) {
  static const Tensor none;
  return t.has_value() ? *t : none;
}

// The sampled-NLL call of the pixels (rows k*B + b, one value per row), planned by the plan
// every fused op shares (csrc/plan.cpp: its checks, broadcasts, dtypes and buffer shapes).
Call make_call(IWAE_ARGS, int64_t needs) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "vae_fast::iwae: x must be (samples, batch, ...), got shape ",
                    py_shape(x.sym_sizes()));
  TORCH_CHECK_VALUE(reduction == kSum || reduction == kBatchmean || reduction == kPerSample,
                    "vae_fast::iwae: reduction must be sum, batchmean or per-sample, got ",
                    reduction);
  Call c;
  c.api = kSampledNll;
  c.kind = static_cast<Likelihood>(kind);
  c.reduction = kPerSample;
  c.full = full;
  c.backend = static_cast<Backend>(backend);
  c.t[kX] = x.flatten(0, 1);
  c.t[kY] = y;
  const Tensor& r = get(rlv);
  c.t[kRlv] = r.defined() && r.dim() == x.dim() ? r.flatten(0, 1) : r;
  c.consts[kRlv] = rlv_c;
  c.needs = ((needs & kNeedX) ? int64_t{1} << kX : 0) |
            ((needs & kNeedRlv) ? int64_t{1} << kRlv : 0);
  return c;
}

void check_lat(const Tensor& x, const Tensor& lat) {
  TORCH_CHECK_VALUE(lat.dim() == 2 && lat.sym_size(0) == x.sym_size(0) &&
                        lat.sym_size(1) == x.sym_size(1),
                    "vae_fast::iwae: lat must be (samples, batch) = (", x.sym_size(0), ", ",
                    x.sym_size(1), "), got shape ", py_shape(lat.sym_sizes()));
  TORCH_CHECK_TYPE(lat.is_floating_point(), "vae_fast::iwae: lat must be floating point, got ",
                   py_dtype(lat.scalar_type()));
  TORCH_CHECK_VALUE(lat.device() == x.device(), "vae_fast::iwae: lat must be on ", x.device(),
                    ", got ", lat.device());
}

double grad_scale(int64_t reduction, int64_t batch) {
  if (reduction != kBatchmean) return 1.0;
  return batch ? 1.0 / static_cast<double>(batch) : INFINITY;  // an empty mean is nan, as torch's
}

// ---- vae_fast::iwae_fwd: device and Meta kernels ---------------------------------------------

Fwd fwd_kernel(IWAE_ARGS, int64_t needs) {
  const Call c = make_call(IWAE_FORWARD, needs);
  check_lat(x, lat);
  const Plan p = make_plan(c);
  std::vector<Tensor> out = allocate(p, c);
  const auto opts = x.options().dtype(p.acc);
  Tensor per = at::empty({x.size(1)}, opts), w = at::empty({x.size(0), x.size(1)}, opts);
  run_iwae(p, c, lat.to(p.acc), grad_scale(reduction, x.size(1)), out, per, w);
  return {per, w, out[3 + kX], out[3 + kRlv]};
}

Fwd fwd_meta(IWAE_ARGS, int64_t needs) {
  const Call c = make_call(IWAE_FORWARD, needs);
  check_lat(x, lat);
  const Plan p = make_plan(c);
  std::vector<Tensor> out = allocate(p, c);
  const auto opts = x.options().dtype(p.acc);
  return {at::empty_symint({x.sym_size(1)}, opts),
          at::empty_symint({x.sym_size(0), x.sym_size(1)}, opts), out[3 + kX], out[3 + kRlv]};
}

const c10::TypedOperatorHandle<Fwd(IWAE_ARGS, int64_t)>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::iwae_fwd", "")
                             .typed<Fwd(IWAE_ARGS, int64_t)>();
  return op;
}

// iwae_fwd is not differentiable (two of its outputs are gradients): reached with autograd on
// only by a direct caller or when torch.func differentiates the bound's gradient.
Fwd fwd_autograd(IWAE_ARGS, int64_t needs) {
  refuse_forward_ad({&x, &y, &get(rlv), &lat}, "iwae_loss has", kInstead);
  const bool track = torch::autograd::compute_requires_grad(x, y, rlv, lat);
  Fwd o = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(IWAE_FORWARD, needs);
  }();
  if (track) {
    std::vector<Tensor> outs = {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o)};
    raise_on_backward(outs, twice_message("iwae_loss's", kInstead),
                      torch::autograd::collect_next_edges(x, y, rlv, lat));
  }
  return o;
}

// ---- vae_fast::iwae: reduction and autograd ---------------------------------------------------

Tensor reduce(const Tensor& per, int64_t reduction) {
  if (reduction == kPerSample) return per;
  const Tensor total = per.sum();
  return reduction == kSum ? total : at::div(total, c10::Scalar(per.sym_size(0)));
}

enum In : int { kInX = 0, kInY, kInRlv, kInLat, kNumIn };

struct IwaeBackward : public torch::autograd::Node {
  SavedVariable gx, grlv, w;  // the stored gradients (already weighted and scaled), w (K, B)
  std::array<bool, kNumIn> need{};
  std::array<std::vector<c10::SymInt>, kNumIn> shape;
  std::array<at::ScalarType, kNumIn> dtype{};
  bool rlv_full = false;  // rlv's gradient buffer has x's (flattened) shape, else one per row
  int64_t reduction = kBatchmean;
  c10::SymInt batch = 1;  // B: batchmean's 1/B is in the buffers, and in lat's gradient below

  std::string name() const override {
    return "vae_fast::IwaeBackward";
  }

  void release_variables() override {
    gx.reset_data();
    grlv.reset_data();
    w.reset_data();
  }

  variable_list apply(variable_list&& grads) override;
};

// A per-sample grad_output (B,) as the coefficient of the rows k*B + b of a buffer: shaped
// (K * B, 1, ..., 1) to the buffer's rank.
Tensor row_coefficient(const Tensor& g, const c10::SymInt& K, int64_t rank) {
  std::vector<c10::SymInt> view(static_cast<size_t>(rank), c10::SymInt(1));
  view[0] = K * g.sym_size(0);
  return g.unsqueeze(0).expand_symint({K, g.sym_size(0)}).reshape_symint(view);
}

variable_list IwaeBackward::apply(variable_list&& grads) {
  variable_list out(kNumIn);
  const Tensor& g = grads[0];
  if (!g.defined()) return out;
  const bool grad_mode = at::GradMode::is_enabled();
  const bool keep = torch::autograd::get_current_graph_task_keep_graph();
  const bool per_sample = reduction == kPerSample;
  const Tensor wt = w.unpack();
  const c10::SymInt K = wt.sym_size(0);
  // grad_output 1 (loss.backward()) hands the stored buffer out as it is: no memory moves
  const bool unit = !per_sample && plain(g) && g.is_cpu() && scalar_value(g) == 1.0;
  // one buffer times the coefficient: in place when nothing can read the buffer again (no
  // retained graph, no create_graph, real tensors), else out of place
  auto weighted = [&](const Tensor& buf) {
    if (unit) return keep ? buf.clone() : buf;
    const Tensor c = per_sample ? row_coefficient(g, K, buf.dim()) : g;
    if (!grad_mode && !keep && plain(buf) && plain(g)) return buf.mul_(c);
    return buf * c;
  };
  if (need[kInX] && task_should_compute_output(kInX)) {
    out[kInX] = weighted(gx.unpack()).view_symint(shape[kInX]).to(dtype[kInX]);
  }
  if (need[kInRlv] && task_should_compute_output(kInRlv)) {
    const Tensor b = grlv.unpack();
    out[kInRlv] = rlv_full ? weighted(b).view_symint(shape[kInRlv]).to(dtype[kInRlv])
                           : at::sum_to(weighted(b), shape[kInRlv]).to(dtype[kInRlv]);
  }
  if (need[kInLat] && task_should_compute_output(kInLat)) {
    Tensor gl = at::neg(wt * g);  // a per-sample g (B,) broadcasts over (K, B)
    if (reduction == kBatchmean) gl = at::div(gl, c10::Scalar(batch));
    out[kInLat] = gl.to(dtype[kInLat]);
  }
  if (grad_mode) {
    // create_graph=True (torch.func.grad asks for it): right gradients, no second derivative
    raise_on_backward(out, twice_message("iwae_loss's", kInstead),
                      torch::autograd::edge_list(next_edges()));
  }
  return out;
}

Tensor iwae_autograd(IWAE_ARGS) {
  refuse_forward_ad({&x, &y, &get(rlv), &lat}, "iwae_loss has", kInstead);
  const Tensor& r = get(rlv);
  const bool grad_mode = at::GradMode::is_enabled();
  std::array<bool, kNumIn> need{};
  need[kInX] = grad_mode && x.requires_grad();
  need[kInRlv] = grad_mode && r.defined() && r.requires_grad();
  need[kInLat] = grad_mode && lat.requires_grad();
  if (grad_mode && y.requires_grad()) {
    // the plan's refusal, with its message (the target is read by every sample)
    Call c = make_call(IWAE_FORWARD, 0);
    c.needs |= int64_t{1} << kY;
    make_plan(c);
  }
  const int64_t needs = (need[kInX] ? kNeedX : 0) | (need[kInRlv] ? kNeedRlv : 0);
  Tensor loss, w, bx, brlv;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor per;
    std::tie(per, w, bx, brlv) = fwd_op().call(IWAE_FORWARD, needs);
    loss = reduce(per, reduction);
  }
  if (!(need[kInX] || need[kInRlv] || need[kInLat])) return loss;
  auto node = make_node<IwaeBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, y, rlv, lat));
  const Tensor* ins[kNumIn] = {&x, &y, &r, &lat};
  for (int s = 0; s < kNumIn; ++s) {
    node->need[s] = need[s];
    if (!need[s]) continue;
    node->shape[s] = std::vector<c10::SymInt>(ins[s]->sym_sizes().begin(), ins[s]->sym_sizes().end());
    node->dtype[s] = ins[s]->scalar_type();
  }
  if (need[kInX]) node->gx = SavedVariable(bx, /*is_output=*/false);
  if (need[kInRlv]) {
    node->grlv = SavedVariable(brlv, /*is_output=*/false);
    node->rlv_full = r.sym_sizes() == x.sym_sizes();
  }
  node->w = SavedVariable(w, /*is_output=*/false);
  node->reduction = reduction;
  node->batch = x.sym_size(1);
  torch::autograd::set_history(loss, node);
  return loss;
}

// Without autograd (inference mode, or below it): no gradients.
Tensor iwae_plain(IWAE_ARGS) {
  return reduce(std::get<0>(fwd_op().call(IWAE_FORWARD, 0)), reduction);
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY_FRAGMENT(vae_fast, m) {
  using std::string;
  m.def(("iwae(" + string(vae_fast::kArgs) + ") -> Tensor").c_str());
  m.def(("iwae_fwd(" + string(vae_fast::kArgs) +
         ", int needs) -> (Tensor per, Tensor w, Tensor g_x, Tensor g_rlv)").c_str());
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("iwae", &vae_fast::iwae_autograd);
  m.impl("iwae_fwd", &vae_fast::fwd_autograd);
}

TORCH_LIBRARY_IMPL(vae_fast, CompositeExplicitAutograd, m) {
  m.impl("iwae", &vae_fast::iwae_plain);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("iwae_fwd", &vae_fast::fwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("iwae_fwd", &vae_fast::fwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, Meta, m) {
  m.impl("iwae_fwd", &vae_fast::fwd_meta);
}
