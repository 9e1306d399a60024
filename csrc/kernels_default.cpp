// The CPU kernels (kernels_impl.h) built for one instruction set; cpu_dispatch.cpp picks the
// build that runs.
// Baseline instruction set: whatever the compiler flags say, no AVX.
#define VAE_FAST_NO_AVX512
#define VAE_FAST_NO_AVX2
#include "kernels_impl.h"
