// The AVX-512 copy of the CPU kernels (512-bit at::vec::Vectorized), chosen
// at run time on CPUs that ATen rates AVX512 (see capability_prelude.h for
// the target pragma). The target is ATen's own for its AVX512 kernels:
// AVX-512 F, BW, VL and DQ, plus FMA.
#if defined(__x86_64__) || defined(_M_X64)

#include "capability_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#include "kernels_impl.h"
#pragma GCC pop_options

#endif
