// What the hand-written autograd of every vae_fast op does alike (ops.cpp, free_bits.cpp,
// mixture.cpp, iwae.cpp): refuse forward-mode AD with a message, and hang a node that raises
// on outputs that must not be differentiated (gradients handed out under create_graph=True,
// the raw forward ops' outputs), so that a second derivative raises instead of silently
// treating the hand-written gradients as constants.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace vae_fast {

// Autograd nodes are held in c10::intrusive_ptr from torch 2.13 and in std::shared_ptr before
// it: node_ptr<T> and make_node<T>(...) are whichever this torch's Edge holds, so that the
// extension builds against both (a GPU machine's torch may be older than this project's pin).
inline constexpr bool kSharedNodes =
    std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<torch::autograd::Node>>;
template <class T>
using node_ptr = std::conditional_t<kSharedNodes, std::shared_ptr<T>, c10::intrusive_ptr<T>>;
template <class T, class... Args>
node_ptr<T> make_node(Args&&... args) {
  if constexpr (kSharedNodes) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// NotImplementedError if any input carries a forward-mode tangent: "vae_fast: <what> has no
// forward-mode derivative (...); use <instead> for that".
inline void refuse_forward_ad(std::initializer_list<const at::Tensor*> inputs, const char* what,
                              const char* instead) {
  for (const at::Tensor* t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!t->defined() || !torch::autograd::isFwGradDefined(*t),
                                "vae_fast: ", what, " no forward-mode derivative "
                                "(torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad); "
                                "use ", instead, " for that");
  }
}

// The message of a second backward through a hand-written backward pass.
inline std::string twice_message(const char* whose, const char* instead) {
  return std::string("vae_fast: ") + whose + " backward is hand-written and cannot be "
         "differentiated again (a Hessian, a gradient penalty, create_graph=True followed by "
         "a second backward); use " + instead + " for that";
}

// Gives every defined tensor in ts a history through one node that raises `message` when a
// backward reaches it; its edges are `edges` (so that the graph still connects to the inputs).
template <typename Tensors>
void raise_on_backward(Tensors& ts, const std::string& message, torch::autograd::edge_list edges) {
  auto err = make_node<torch::autograd::Error>(message, std::move(edges));
  for (at::Tensor& t : ts) {
    if (t.defined()) torch::autograd::set_history(t, err);
  }
}

// a tensor the in-place backward may write through a raw pointer: no tensor subclass (fake,
// functional), no functorch wrapper, on a device with a kernel
inline bool plain(const at::Tensor& t) {
  if (!t.defined()) return true;
  constexpr auto wrappers = c10::DispatchKeySet({c10::DispatchKey::Python,
                                                 c10::DispatchKey::Functionalize,
                                                 c10::DispatchKey::FuncTorchBatched,
                                                 c10::DispatchKey::FuncTorchGradWrapper});
  return !t.key_set().has_any(wrappers) && (t.is_cpu() || t.is_cuda()) &&
         t.layout() == at::kStrided;
}

}  // namespace vae_fast
