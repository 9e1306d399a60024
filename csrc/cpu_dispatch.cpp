// Run-time choice of the CPU kernels' instruction set. setup.py compiles kernels_impl.h three
// times side by side (kernels_default.cpp, and on x86-64 kernels_avx2.cpp and
// kernels_avx512.cpp, each with its own -m flags) instead of once with -march=native, so one
// wheel runs on any x86-64 CPU and uses the widest vectors it has.
//
// The choice follows torch's own kernels: at::get_cpu_capability() (which honours
// $ATEN_CPU_CAPABILITY = default / avx2 / avx512, so tests can force each build), clamped to
// what this CPU can run, and made once.
#include "cpu_kernels.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

namespace vae_fast {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

#if defined(VAE_FAST_X86_BUILDS)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
#endif

Isa pick() {
#if defined(VAE_FAST_X86_BUILDS)
  const std::string want = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
  if (want == "AVX512" && cpu_has_avx512()) return Isa::kAvx512;
  if ((want == "AVX512" || want == "AVX2") && cpu_has_avx2()) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = pick();
  return chosen;
}

}  // namespace

const std::string& cpu_capability() {
  static const std::string names[] = {"default", "avx2", "avx512"};
  return names[static_cast<int>(isa())];
}

void fused_forward_kernel(const ReconStream& rs, const KLStream& ks, int red_mode, int64_t rows,
                          bool acc_double, std::vector<double>& sums_r,
                          std::vector<double>& sums_k) {
  switch (isa()) {
#if defined(VAE_FAST_X86_BUILDS)
    case Isa::kAvx512:
      return vae_fast_avx512::fused_forward_kernel(rs, ks, red_mode, rows, acc_double, sums_r,
                                                   sums_k);
    case Isa::kAvx2:
      return vae_fast_avx2::fused_forward_kernel(rs, ks, red_mode, rows, acc_double, sums_r,
                                                 sums_k);
#endif
    default:
      return vae_fast_default::fused_forward_kernel(rs, ks, red_mode, rows, acc_double, sums_r,
                                                    sums_k);
  }
}

void dmol_forward_kernel(const DmolStream& ds, bool acc_double, std::vector<double>& sums) {
  switch (isa()) {
#if defined(VAE_FAST_X86_BUILDS)
    case Isa::kAvx512:
      return vae_fast_avx512::dmol_forward_kernel(ds, acc_double, sums);
    case Isa::kAvx2:
      return vae_fast_avx2::dmol_forward_kernel(ds, acc_double, sums);
#endif
    default:
      return vae_fast_default::dmol_forward_kernel(ds, acc_double, sums);
  }
}

void iwae_forward_kernel(const IwaeStream& is, bool acc_double) {
  switch (isa()) {
#if defined(VAE_FAST_X86_BUILDS)
    case Isa::kAvx512:
      return vae_fast_avx512::iwae_forward_kernel(is, acc_double);
    case Isa::kAvx2:
      return vae_fast_avx2::iwae_forward_kernel(is, acc_double);
#endif
    default:
      return vae_fast_default::iwae_forward_kernel(is, acc_double);
  }
}

void scale_kernel(void* buf, DType dtype, int64_t n, const ScaleSpec& spec) {
  switch (isa()) {
#if defined(VAE_FAST_X86_BUILDS)
    case Isa::kAvx512:
      return vae_fast_avx512::scale_kernel(buf, dtype, n, spec);
    case Isa::kAvx2:
      return vae_fast_avx2::scale_kernel(buf, dtype, n, spec);
#endif
    default:
      return vae_fast_default::scale_kernel(buf, dtype, n, spec);
  }
}

}  // namespace vae_fast
