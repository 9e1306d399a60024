// The plan of one fused call: every host-side rule of vae_fast, written once, for every device.
//
// make_plan checks the tensors (dtypes, shapes, broadcasts, batch sizes, devices; errors name
// the caller's arguments and match vae_fast/_common.py word for word) and derives what the
// kernels and autograd need: which streams run, how each parameter is read (broadcast
// geometry), the accumulation dtype, whether a stream is walked in memory order
// (channels_last), and the shape, dtype and layout of every output and stored gradient.
// It works on sizes as SymInts, so the same code serves real tensors (the CPU and CUDA
// kernels), meta and fake tensors (torch.compile, torch.export: the op's Meta kernel).
// geometry() adds the plain integers and scales a launch needs (real tensors only).
#pragma once

#include "enums.h"

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <array>
#include <vector>

namespace vae_fast {

using at::Tensor;

// The arguments of vae_fast::fused_loss / fused_fwd, as the dispatcher hands them over.
struct Call {
  std::array<Tensor, kNumSlots> t;  // undefined = absent
  Tensor beta_t;                    // a 0-d tensor beta (replaces `beta`), or undefined
  Api api = kRawApi;
  Likelihood kind = kNone;
  Reduction reduction = kSum;
  bool full = false;
  // values of absent parameters: rlv, lv, pmu, plv (w and pw are 1)
  std::array<double, kNumSlots> consts{};
  double beta = 1.0;
  Backend backend = kCpuBackend;
  int64_t needs = 0;  // bit s: write the gradient of slot s

  const Tensor& operator[](int s) const {
    return t[s];
  }
  bool has(int s) const {
    return t[s].defined();
  }
  bool need(int s) const {
    return (needs >> s) & 1;
  }
};

// How a parameter is read by its stream (see ParamMode).
struct ParamRead {
  ParamMode mode = kConst;
  c10::SymInt inner = 1;
  c10::SymInt count = 1;
};

// Where a slot's gradient waits for grad_output.
struct GradSpec {
  // true: the partner's shape, written by the kernel itself; false: a broadcast parameter's,
  // summed from a full-size temporary at once (to `shape`)
  bool full = true;
  std::vector<c10::SymInt> shape;
  at::ScalarType dtype = at::kFloat;
  bool keep_layout = false;  // allocated like its input (a stream walked in memory order)
};

struct Plan {
  bool recon = false, kl = false;  // which streams run
  at::ScalarType acc = at::kFloat;  // of the sums, the losses and summed parameter gradients
  RedMode red_mode = kTotal;
  c10::SymInt rows = 1;  // segments of the reduction: batch for kRows, else 1
  std::array<ParamRead, kNumSlots> read;
  std::array<bool, 2> memory_order{};  // per stream (0 recon, 1 KL): walked in memory order
  std::array<GradSpec, kNumSlots> grad;
};

// Checks the call and plans it. Bad input raises c10::ValueError / c10::TypeError (Python's
// ValueError / TypeError) with the message vae_fast/_common.py gives for the same input.
Plan make_plan(const Call& c);

// The op's twelve outputs, allocated: loss, nll, kl (0-d; (rows,) per sample; loss of x's
// shape and empty nll/kl per element), then one gradient buffer per slot (empty where the
// gradient is not needed). The Meta kernel returns these as they are.
std::vector<Tensor> allocate(const Plan& p, const Call& c);

// Plain numbers of a launch (real tensors: every size is concrete).
struct Geometry {
  int64_t rows = 1, row_len_r = 0, row_len_k = 0;
  double scale_r = 1.0, scale_k = 1.0;  // of the sums: 1, 1/batch or 1/elements
  std::array<int64_t, kNumSlots> inner{}, count{};
};
Geometry geometry(const Plan& p, const Call& c);

// channels_last layout of any rank >= 2 (dim 1 innermost): kDmol reads such tensors in place.
bool channels_last_dense(const Tensor& t);

// torch's name of a dtype ("torch.float32") and Python's form of a shape ("(4, 5)").
std::string py_dtype(at::ScalarType t);
std::string py_shape(c10::SymIntArrayRef shape);

}  // namespace vae_fast
