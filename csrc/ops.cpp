// vae_fast's operators: schemas, device kernels, and autograd, registered once for every device.
//
//   vae_fast::fused_loss   the op the public functions call: (loss, nll, kl). Its autograd
//                          kernel (below) runs vae_fast::fused_fwd and hangs a
//                          FusedLossBackward node on the result, whose backward only scales
//                          the gradients the forward wrote.
//   vae_fast::fused_fwd    one fused pass: the losses and the gradients asked for in `needs`
//                          (12 outputs). CPU: the C++ vector kernels; CUDA (and CPU under the
//                          Triton interpreter): the Triton kernels; Meta: the plan's shapes,
//                          which is what torch.compile, torch.export and opcheck trace with.
//   vae_fast::triton_fwd,  launch-only ops whose kernels vae_fast/triton_kernels.py registers
//   vae_fast::triton_scale from Python (CUDA, and CPU when TRITON_INTERPRET=1); triton_dmol
//   vae_fast::triton_dmol  launches the discretized logistic mixture's pixels (run.cpp).
//
// An eager call goes Python -> dispatcher -> C++ (checks, plan, allocation, kernel, autograd
// node) with no Python autograd.Function on the way; docs/design.md explains the layout.
#include "autograd_util.h"
#include "cpu_kernels.h"
#include "plan.h"
#include "run.h"

#include <ATen/ExpandUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>

namespace vae_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Outs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                        Tensor, Tensor, Tensor>;

#define VAE_FAST_ARGS                                                                         \
  const OptTensor &x, const OptTensor &y, const OptTensor &rlv, const OptTensor &w,           \
      const OptTensor &pw, const OptTensor &mu, const OptTensor &lv, const OptTensor &pmu,    \
      const OptTensor &plv, const OptTensor &beta_t, int64_t api, int64_t kind,               \
      int64_t reduction, bool full, double rlv_c, double lv_c, double pmu_c, double plv_c,    \
      double beta, int64_t backend
#define VAE_FAST_FORWARD \
  x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t, api, kind, reduction, full, rlv_c, lv_c, pmu_c, \
      plv_c, beta, backend
constexpr const char* kSchemaArgs =
    "Tensor? x, Tensor? y, Tensor? rlv, Tensor? w, Tensor? pw, Tensor? mu, Tensor? lv, "
    "Tensor? pmu, Tensor? plv, Tensor? beta_t, int api, int kind, int reduction, bool full, "
    "float rlv_c, float lv_c, float pmu_c, float plv_c, float beta, int backend";

const std::string kTwice = twice_message("the fused losses'", "vae_fast.reference");

const Tensor& get(const OptTensor& t) {
  static const Tensor none;
  return t.has_value() ? *t : none;
}

Call make_call(VAE_FAST_ARGS, int64_t needs) {
  Call c;
  c.t = {get(x), get(y), get(rlv), get(w), get(pw), get(mu), get(lv), get(pmu), get(plv)};
  c.beta_t = get(beta_t);
  c.api = static_cast<Api>(api);
  c.kind = static_cast<Likelihood>(kind);
  c.reduction = static_cast<Reduction>(reduction);
  c.full = full;
  c.consts[kRlv] = rlv_c;
  c.consts[kLv] = lv_c;
  c.consts[kPmu] = pmu_c;
  c.consts[kPlv] = plv_c;
  c.beta = beta;
  c.backend = static_cast<Backend>(backend);
  c.needs = needs;
  return c;
}

Outs as_tuple(std::vector<Tensor>& o) {
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11]};
}

// ---- vae_fast::fused_fwd: device kernels ------------------------------------------------------

Outs fused_fwd_kernel(VAE_FAST_ARGS, int64_t needs) {
  const Call c = make_call(VAE_FAST_FORWARD, needs);
  const Plan p = make_plan(c);
  std::vector<Tensor> out = allocate(p, c);
  run_forward(p, c, out);
  return as_tuple(out);
}

Outs fused_fwd_meta(VAE_FAST_ARGS, int64_t needs) {
  const Call c = make_call(VAE_FAST_FORWARD, needs);
  std::vector<Tensor> out = allocate(make_plan(c), c);
  return as_tuple(out);
}

const c10::OperatorHandle& fused_fwd_handle() {
  static const c10::OperatorHandle h =
      c10::Dispatcher::singleton().findSchemaOrThrow("vae_fast::fused_fwd", "");
  return h;
}

Outs call_fused_fwd(VAE_FAST_ARGS, int64_t needs) {
  static const auto op =
      fused_fwd_handle().typed<Outs(VAE_FAST_ARGS, int64_t)>();  // NOLINT
  return op.call(VAE_FAST_FORWARD, needs);
}

// fused_fwd is not differentiable: its outputs are gradients already. It is reached with
// autograd on only by a direct caller or when torch.func differentiates a fused loss's
// gradient (torch.func.hessian, jacrev(grad(f))): its outputs then get a node that raises if
// a backward reaches it, instead of an autograd fallback that would give zeros.
void refuse_forward_ad(std::initializer_list<const OptTensor*> inputs) {
  for (const OptTensor* t : inputs) {
    vae_fast::refuse_forward_ad({&get(*t)}, "the fused losses have", "vae_fast.reference");
  }
}

Outs fused_fwd_autograd(VAE_FAST_ARGS, int64_t needs) {
  refuse_forward_ad({&x, &y, &rlv, &w, &pw, &mu, &lv, &pmu, &plv, &beta_t});
  const bool track = torch::autograd::compute_requires_grad(x, y, rlv, w, pw, mu, lv, pmu, plv,
                                                            beta_t);
  Outs out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fused_fwd(VAE_FAST_FORWARD, needs);
  }();
  if (track) {
    std::vector<Tensor> outs = std::apply([](auto&... t) { return std::vector<Tensor>{t...}; }, out);
    raise_on_backward(outs, kTwice,
                      torch::autograd::collect_next_edges(x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t));
  }
  return out;
}

// ---- vae_fast::fused_loss: autograd ------------------------------------------------------------

struct FusedLossBackward : public torch::autograd::Node {
  std::array<SavedVariable, kNumSlots> buf;  // the gradients the forward wrote
  SavedVariable beta_t, kl;                  // a tensor beta, and the KL for its gradient
  std::array<bool, kNumSlots> need{};
  std::array<bool, kNumSlots> full{};  // the input has its stream's full shape
  std::array<std::vector<c10::SymInt>, kNumSlots> shape;  // of the inputs
  std::array<at::ScalarType, kNumSlots> dtype{};
  RedMode red = kTotal;
  c10::SymInt rows = 1;
  double beta = 1.0;
  bool has_beta_t = false;
  Backend backend = kCpuBackend;

  std::string name() const override {
    return "vae_fast::FusedLossBackward";
  }

  void release_variables() override {
    for (SavedVariable& b : buf) b.reset_data();
    beta_t.reset_data();
    kl.reset_data();
  }

  variable_list apply(variable_list&& grads) override;

 private:
  // d(outputs)/d(term) of one stream: weight * g_loss + g_term (a missing one counts 0)
  static Tensor coefficient(const Tensor& g_loss, const Tensor& g_term, const Tensor& weight_t,
                            double weight, const Tensor& like) {
    if (!g_loss.defined()) return g_term.defined() ? g_term : at::zeros({}, like.options());
    Tensor c = weight_t.defined() ? g_loss * weight_t : (weight != 1.0 ? g_loss * weight : g_loss);
    return g_term.defined() ? c + g_term : c;
  }
};

variable_list FusedLossBackward::apply(variable_list&& grads) {
  Tensor g_loss = grads[0], g_nll = grads[1], g_kl = grads[2];
  if (red == kPerElement) g_nll = g_kl = Tensor();  // placeholders: only the loss carries grads
  // a stream whose outputs got no gradient contributes none (not 0 * a stored inf = nan)
  const bool live[2] = {g_loss.defined() || g_nll.defined(), g_loss.defined() || g_kl.defined()};
  const bool grad_mode = at::GradMode::is_enabled();
  const bool keep = torch::autograd::get_current_graph_task_keep_graph();
  const Tensor beta_tensor = has_beta_t ? beta_t.unpack() : Tensor();

  std::array<Tensor, kNumSlots> b;
  bool in_place = !grad_mode && plain(g_loss) && plain(g_nll) && plain(g_kl) && plain(beta_tensor);
  for (int s = 0; s < kNumSlots; ++s) {
    if (!need[s] || !task_should_compute_output(s) || !live[is_recon_slot(s) ? 0 : 1]) continue;
    b[s] = buf[s].unpack();
    in_place = in_place && plain(b[s]);
  }

  variable_list out(kNumSlots + 1);
  std::vector<Tensor> scale_r, scale_k;  // full-size buffers scaled in place
  std::array<bool, kNumSlots> scaled{};
  Tensor coef_r, coef_k;
  for (int s = 0; s < kNumSlots; ++s) {
    if (!b[s].defined()) continue;
    // full-size buffers of the input's own shape are scaled in place, all of a stream at
    // once; a broadcast parameter's small summed buffer takes the plain-torch way below
    if (in_place && full[s] && b[s].sym_sizes() == c10::SymIntArrayRef(shape[s])) {
      // Scaled in place when the graph is freed after this backward (no second backward can
      // read it); with retain_graph a copy, so the buffer stays intact and the gradient
      // handed out is not the buffer a later backward reads.
      if (keep) b[s] = b[s].clone();
      (is_recon_slot(s) ? scale_r : scale_k).push_back(b[s]);
      scaled[s] = true;
      continue;
    }
    // plain torch: under torch.compile / torch.func / create_graph, and for the small summed
    // buffers of broadcast parameters
    if (!coef_r.defined()) {
      coef_r = coefficient(g_loss, g_nll, Tensor(), 1.0, b[s]);
      coef_k = coefficient(g_loss, g_kl, beta_tensor, beta, b[s]);
    }
    Tensor c = is_recon_slot(s) ? coef_r : coef_k;
    if (red == kRows && c.dim() == 1) {
      std::vector<c10::SymInt> view(b[s].dim(), 1);
      view[0] = rows;
      c = c.view_symint(view);
    } else if (red == kPerElement && c.dim()) {
      c = c.reshape_symint(b[s].sym_sizes());
    }
    out[s] = at::sum_to(b[s] * c, shape[s]).to(dtype[s]);
  }
  if (!scale_r.empty() || !scale_k.empty()) {
    ScaleArgs a;
    a.red = red;
    a.rows = rows.expect_int();
    a.backend = backend;
    a.beta = beta;
    a.beta_t = beta_tensor;
    scale_in_place(a, scale_r, scale_k, g_loss, g_nll, g_kl);
    for (int s = 0; s < kNumSlots; ++s) {
      if (scaled[s]) out[s] = b[s].scalar_type() == dtype[s] ? b[s] : b[s].to(dtype[s]);
    }
  }
  if (has_beta_t && g_loss.defined() && task_should_compute_output(kNumSlots)) {
    // d(nll + beta * kl)/d(beta) = kl
    out[kNumSlots] = (g_loss * kl.unpack(getptr())).sum().to(beta_tensor.scalar_type());
  }
  if (grad_mode) {
    // create_graph=True (torch.func.grad always asks for it): the gradients are right, but a
    // second backward through them must raise, not see constants
    raise_on_backward(out, kTwice, torch::autograd::edge_list(next_edges()));
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> fused_loss_autograd(VAE_FAST_ARGS) {
  const std::array<const OptTensor*, kNumSlots> in = {&x, &y, &rlv, &w, &pw, &mu, &lv, &pmu, &plv};
  refuse_forward_ad({&x, &y, &rlv, &w, &pw, &mu, &lv, &pmu, &plv, &beta_t});
  int64_t needs = 0;
  const bool grad_mode = at::GradMode::is_enabled();
  for (int s = 0; s < kNumSlots && grad_mode; ++s) {
    if (in[s]->has_value() && (*in[s])->defined() && (*in[s])->requires_grad()) needs |= 1 << s;
  }
  const bool beta_grad = grad_mode && beta_t.has_value() && beta_t->defined() &&
                         beta_t->requires_grad();
  node_ptr<FusedLossBackward> node;
  if (needs || beta_grad) {
    node = make_node<FusedLossBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, y, rlv, w, pw, mu, lv, pmu, plv,
                                                             beta_t));
  }
  Outs o = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fused_fwd(VAE_FAST_FORWARD, needs);
  }();
  Tensor loss = std::get<0>(o), nll = std::get<1>(o), kl = std::get<2>(o);
  if (node) {
    torch::autograd::set_history(loss, node);
    torch::autograd::set_history(nll, node);
    torch::autograd::set_history(kl, node);
    const Tensor bufs[kNumSlots] = {std::get<3>(o), std::get<4>(o),  std::get<5>(o),
                                    std::get<6>(o), std::get<7>(o),  std::get<8>(o),
                                    std::get<9>(o), std::get<10>(o), std::get<11>(o)};
    for (int s = 0; s < kNumSlots; ++s) {
      if (!((needs >> s) & 1)) continue;
      node->need[s] = true;
      node->buf[s] = SavedVariable(bufs[s], /*is_output=*/false);
      const Tensor& t = **in[s];
      node->full[s] = t.sym_sizes() == in[partner_of(s)]->value().sym_sizes();
      node->shape[s] = std::vector<c10::SymInt>(t.sym_sizes().begin(), t.sym_sizes().end());
      node->dtype[s] = t.scalar_type();
    }
    const Reduction r = static_cast<Reduction>(reduction);
    node->red = red_mode_of(r);
    const Tensor& main = kind != kNone ? get(x) : get(mu);
    node->rows = node->red == kRows ? main.sym_size(0) : c10::SymInt(1);
    node->beta = beta;
    node->backend = static_cast<Backend>(backend);
    if (beta_t.has_value() && beta_t->defined()) {
      node->has_beta_t = true;
      node->beta_t = SavedVariable(*beta_t, /*is_output=*/false);
      if (beta_grad) node->kl = SavedVariable(kl, /*is_output=*/true);
    }
  }
  return {loss, nll, kl};
}

// The plan's numbers for a call, without running it (tests: the host rules, on meta tensors
// of any size): ints = rows, row_len_r, row_len_k, reduction mode, float64 accumulation,
// memory order of the two streams, then per slot its read mode, inner and count; floats =
// scale_r, scale_k.
std::tuple<std::vector<int64_t>, std::vector<double>> plan_info(VAE_FAST_ARGS, int64_t needs) {
  const Call c = make_call(VAE_FAST_FORWARD, needs);
  const Plan p = make_plan(c);
  const Geometry g = geometry(p, c);
  std::vector<int64_t> ints = {g.rows, g.row_len_r, g.row_len_k, p.red_mode,
                               p.acc == at::kDouble, p.memory_order[0], p.memory_order[1]};
  for (int s = 0; s < kNumSlots; ++s) ints.push_back(p.read[s].mode);
  for (int s = 0; s < kNumSlots; ++s) ints.push_back(g.inner[s]);
  for (int s = 0; s < kNumSlots; ++s) ints.push_back(g.count[s]);
  return {ints, {g.scale_r, g.scale_k}};
}

// Without autograd (inference mode, or below it): the pass without gradients.
std::tuple<Tensor, Tensor, Tensor> fused_loss_plain(VAE_FAST_ARGS) {
  Outs o = call_fused_fwd(VAE_FAST_FORWARD, 0);
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o)};
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY(vae_fast, m) {
  using std::string;
  m.def(("fused_loss(" + string(vae_fast::kSchemaArgs) +
         ") -> (Tensor loss, Tensor nll, Tensor kl)").c_str());
  m.def(("fused_fwd(" + string(vae_fast::kSchemaArgs) +
         ", int needs) -> (Tensor loss, Tensor nll, Tensor kl, Tensor g_x, Tensor g_y, "
         "Tensor g_rlv, Tensor g_w, Tensor g_pw, Tensor g_mu, Tensor g_lv, Tensor g_pmu, "
         "Tensor g_plv)").c_str());
  m.def(("plan(" + string(vae_fast::kSchemaArgs) + ", int needs) -> (int[], float[])").c_str());
  m.def(
      "triton_fwd(Tensor? x, Tensor? y, Tensor? rlv, Tensor? w, Tensor? pw, Tensor? mu, "
      "Tensor? lv, Tensor? pmu, Tensor? plv, Tensor? beta_t, Tensor(a!) out_loss, "
      "Tensor(b!) out_nll, Tensor(c!) out_kl, Tensor(d!)?[] grads, int[] ints, float[] floats) "
      "-> ()");
  m.def(
      "triton_dmol(Tensor x, Tensor y, Tensor(a!) sums, Tensor(b!)? gx, int[] ints, "
      "float[] floats) -> ()");
  m.def(
      "triton_scale(Tensor(a!)[] bufs_r, Tensor(b!)[] bufs_k, Tensor? g_loss, Tensor? g_nll, "
      "Tensor? g_kl, Tensor? beta_t, int[] ints, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("fused_loss", &vae_fast::fused_loss_autograd);
  m.impl("fused_fwd", &vae_fast::fused_fwd_autograd);
}

TORCH_LIBRARY_IMPL(vae_fast, CompositeExplicitAutograd, m) {
  m.impl("fused_loss", &vae_fast::fused_loss_plain);
  m.impl("plan", &vae_fast::plan_info);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("fused_fwd", &vae_fast::fused_fwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("fused_fwd", &vae_fast::fused_fwd_kernel);
}

TORCH_LIBRARY_IMPL(vae_fast, Meta, m) {
  m.impl("fused_fwd", &vae_fast::fused_fwd_meta);
}
