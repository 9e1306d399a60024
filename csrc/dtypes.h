// torch dtypes as the CPU kernels see them (cpu_kernels.h's DType).
#pragma once

#include "cpu_kernels.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace vae_fast {

inline bool is_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

inline DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kBool:
      return DType::Bool;
    case c10::kHalf:
      return DType::Half;
    case c10::kBFloat16:
      return DType::BFloat16;
    case c10::kFloat:
      return DType::Float;
    case c10::kDouble:
      return DType::Double;
    default:
      TORCH_CHECK(false, "vae_fast: unsupported dtype ", t);
  }
}

}  // namespace vae_fast
