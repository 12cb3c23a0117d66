// Entry points of the CPU kernels, one variant per CPU capability. Pointers are
// type-erased so this header needs no ATen tensor code: group_norm_cpu.cpp
// checks arguments, allocates outputs and calls the variant for this CPU.
#pragma once

#include <c10/core/ScalarType.h>

#include "../group_norm_types.h"
#include "cpu_tuning.h"

namespace gnflex {
namespace cpu {

// A call's arguments travel in three bundles: ForwardTensors (ATen tensors,
// validated and allocated: group_norm_utils.h), ErasedForwardArgs (their
// type-erased pointers, across the boundary to the variant) and
// TypedForwardArgs<scalar_t> (the same pointers typed, inside the kernels);
// the backward's likewise.
//
// Pointers to contiguous buffers in `layout`; statistics and per-channel
// parameters are in the accumulate type (double for double input, else float).
struct ErasedForwardArgs {
  c10::ScalarType dtype;
  GroupNormShape shape;
  Layout layout;
  Activation activation;
  double eps;
  const void* x;
  const void* weight;                  // accumulate type, (C,) or per sample (N, C); null: absent (1)
  const void* bias;                    // accumulate type, (C,) or per sample (N, C); null: absent (0)
  int64_t weight_stride, bias_stride;  // per sample: C, else 0
  void* y;
  void* mean;  // (N, G) accumulate type
  void* rstd;  // (N, G) accumulate type
  CpuTuning tuning;
};

struct ErasedBackwardArgs {
  c10::ScalarType dtype;
  GroupNormShape shape;
  Layout layout;
  Activation activation;
  const void* dy;
  const void* x;
  const void* mean;
  const void* rstd;
  const void* weight;
  const void* bias;
  int64_t weight_stride, bias_stride;  // as in ErasedForwardArgs
  void* dx;                            // null: not wanted
  void* dweight;                       // accumulate type, in weight's shape, always written
  void* dbias;                         // accumulate type, in bias's shape, always written
  CpuTuning tuning;
};

#define GNFLEX_DECLARE_CPU_KERNELS(capability)                       \
  namespace capability {                                             \
  void group_norm_forward_kernel(const ErasedForwardArgs& params);   \
  void group_norm_backward_kernel(const ErasedBackwardArgs& params); \
  }

GNFLEX_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
#define GNFLEX_HAVE_AVX2_KERNELS 1
#define GNFLEX_HAVE_AVX512_KERNELS 1
GNFLEX_DECLARE_CPU_KERNELS(AVX2)
GNFLEX_DECLARE_CPU_KERNELS(AVX512)
GNFLEX_DECLARE_CPU_KERNELS(AVX512BF16)  // bfloat16 only
#endif
#undef GNFLEX_DECLARE_CPU_KERNELS

// The variant this process runs (group_norm_cpu.cpp): the one for ATen's CPU
// capability (which ATEN_CPU_CAPABILITY sets) that this CPU can run.
struct KernelVariant {
  const char* name;  // "DEFAULT", "AVX2", "AVX512" or "AVX512_BF16"
  void (*forward)(const ErasedForwardArgs&);
  void (*backward)(const ErasedBackwardArgs&);
};
const KernelVariant& kernel_variant();

}  // namespace cpu
}  // namespace gnflex
