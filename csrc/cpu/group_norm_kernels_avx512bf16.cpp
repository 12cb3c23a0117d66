// The AVX-512 copy with AVX512-BF16's conversion instruction for bfloat16
// outputs (one vcvtne2ps2bf16 per 32 values instead of ATen's ~10 integer
// operations per 16), chosen at run time on AVX512 CPUs that have it (Cooper
// Lake, Sapphire Rapids and later Xeons, Zen 4 and later). Otherwise the same
// kernels as group_norm_kernels_avx512.cpp. The instruction rounds to nearest
// even as c10::BFloat16 does, but reads float denormals (|y| < 1.2e-38) as 0.
#if defined(__x86_64__) || defined(_M_X64)

#include "capability_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512BF16
#define CPU_CAPABILITY_AVX512
#define GNFLEX_CPU_AVX512_BF16 1
#include "capability_features.h"
#include "kernels_impl.h"
#pragma GCC pop_options

#endif
