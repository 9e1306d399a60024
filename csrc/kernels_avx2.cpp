// The CPU kernels (kernels_impl.h) built for one instruction set; cpu_dispatch.cpp picks the
// build that runs.
// Compiled with -mavx2 -mfma -mf16c (setup.py); run only where the CPU has them.
#define VAE_FAST_NO_AVX512
#if !defined(__AVX2__) || !defined(__FMA__)
#error "kernels_avx2.cpp needs -mavx2 -mfma"
#endif
#include "kernels_impl.h"
