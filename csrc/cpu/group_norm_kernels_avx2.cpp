// The AVX2 + FMA copy of the CPU kernels, chosen at run time on CPUs that
// have them (ATen's capability AVX2 or AVX512).
//
// setuptools cannot give one file its own flags, so the target is set with a
// pragma. g++ does not define the feature macros for a target pragma in C++,
// so they are defined here for the headers (ATen vec, sleef) that test them.
// Headers whose inline functions other files share are included before the
// pragma, so only code in CPU_CAPABILITY namespaces is compiled for AVX2.
#if defined(__x86_64__) || defined(_M_X64)

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "group_norm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
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
