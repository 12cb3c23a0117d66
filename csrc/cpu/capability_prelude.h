// Included first by each SIMD copy of the CPU kernels
// (group_norm_kernels_<capability>.cpp), before its target pragma.
//
// setuptools cannot give one file its own flags, so each copy sets its target
// with `#pragma GCC target`. g++ does not define the feature macros (__AVX2__,
// __AVX512F__, ...) for a target pragma in C++, so capability_features.h
// defines them for the headers (ATen vec, sleef) that test them. The headers
// below have inline functions outside the CPU_CAPABILITY namespaces that
// other files share; they are included here, before the pragma, so the
// linker can never keep a copy built for a wider target than the CPU has.
// Only code in CPU_CAPABILITY namespaces is compiled for the copy's target.
#pragma once

#if !defined(__x86_64__) && !defined(_M_X64)
#error "the SIMD copies of the CPU kernels are x86-64 only"
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
