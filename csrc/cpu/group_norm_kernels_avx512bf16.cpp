// The bfloat16 kernels of the AVX-512 variant with AVX512-BF16's conversion:
// one vcvtne2ps2bf16 per 32 outputs where ATen's integer rounding takes ~12
// instructions (VecIO::narrow in vec_math.h). Chosen at run time, for
// bfloat16 tensors only, on AVX512 CPUs that have AVX512-BF16 (Cooper Lake,
// Sapphire Rapids and later Xeons, Zen 4 and later); every other dtype runs
// group_norm_kernels_avx512.cpp. Same bits as that variant: the instruction
// reads float denormals as 0, so vectors holding a denormal or a NaN round
// as ATen does (tests/cpu/bf16_narrow_check.cpp checks every float).
#if defined(__x86_64__) || defined(_M_X64)

#include "capability_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512BF16
#define CPU_CAPABILITY_AVX512
#define GNFLEX_CPU_AVX512_BF16 1
#include "capability_features.h"
#include "group_norm_kernels_impl.h"
#pragma GCC pop_options

#endif
