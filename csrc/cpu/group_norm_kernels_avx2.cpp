// The AVX2 + FMA variant of the CPU kernels, chosen at run time on CPUs that
// ATen rates AVX2 (see capability_prelude.h for the target pragma).
#if defined(__x86_64__) || defined(_M_X64)

#include "capability_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "capability_features.h"
#include "group_norm_kernels_impl.h"
#pragma GCC pop_options

#endif
