// The AVX-512 variant of the CPU kernels (512-bit at::vec::Vectorized), chosen
// at run time on CPUs that ATen rates AVX512 (see capability_prelude.h for
// the target pragma). The target is ATen's own for its AVX512 kernels:
// AVX-512 F, BW, VL and DQ, plus FMA.
#if defined(__x86_64__) || defined(_M_X64)

#include "capability_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "capability_features.h"
#include "group_norm_kernels_impl.h"
#pragma GCC pop_options

#endif
