// The CPU kernels (kernels_impl.h) built for one instruction set; cpu_dispatch.cpp picks the
// build that runs.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (setup.py); run only where the
// CPU has them.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
#error "kernels_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif
#include "kernels_impl.h"
