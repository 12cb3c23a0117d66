// Included first by each SIMD variant of the CPU kernels
// (group_norm_kernels_<capability>.cpp), before its target pragma.
//
// Each variant sets its target with `#pragma GCC target`, not with per-file
// -m flags: the headers below have templates and inline functions outside the
// CPU_CAPABILITY namespaces that other files share, and a function is built
// for the target in force where it is defined. Included here, before the
// pragma, they are built for the baseline in every file, so the linker can
// never keep a build of them for a wider target than the CPU has (per-file
// flags would build them for the variant's target; see docs/design.md). Only
// code in CPU_CAPABILITY namespaces is compiled for the variant's target.
// g++ does not define the feature macros (__AVX2__, __AVX512F__, ...) for a
// target pragma in C++, so capability_features.h defines them for the headers
// (ATen vec, sleef) that test them.
#pragma once

#if !defined(__x86_64__) && !defined(_M_X64)
#error "the SIMD variants of the CPU kernels are x86-64 only"
#endif

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
