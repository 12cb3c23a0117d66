// CPU implementations of the gnflex ops: shared argument checks and output
// allocation (group_norm_utils), then the kernel variant for this CPU (AVX-512
// with or without AVX512-BF16, AVX2 or portable).
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>

#include "../group_norm_utils.h"
#include "group_norm_kernels.h"

namespace gnflex {
namespace cpu {

// The one place that maps ATen's CPU capability to a kernel variant. ATEN_CPU_CAPABILITY
// lowers it (default, avx2) on any CPU, but ATen takes avx512 on trust, without
// asking the CPU (its own kernels then fault where AVX-512 is missing), so the
// variant is also capped by what the CPU and OS support: the features ATen itself
// requires for AVX512 (F, BW, VL, DQ) and AVX2 (AVX2, FMA). AVX512_BF16 is the
// AVX512 variant with AVX512-BF16's conversion for bfloat16 tensors, where the
// CPU has it. GNFLEX_CPU_VARIANT (default, avx2, avx512, avx512_bf16) caps it
// without changing ATen's own kernels, so benchmarks can compare variants
// against the same torch.
namespace {
#if defined(GNFLEX_HAVE_AVX512_KERNELS)
void forward_avx512_bf16(const ErasedForwardArgs& p) {
  (p.dtype == c10::ScalarType::BFloat16 ? AVX512BF16::group_norm_forward_kernel : AVX512::group_norm_forward_kernel)(p);
}
void backward_avx512_bf16(const ErasedBackwardArgs& p) {
  (p.dtype == c10::ScalarType::BFloat16 ? AVX512BF16::group_norm_backward_kernel
                                        : AVX512::group_norm_backward_kernel)(p);
}
#endif
}  // namespace

const KernelVariant& kernel_variant() {
  static const KernelVariant variant = []() -> KernelVariant {
    const std::string cap = at::get_cpu_capability();
    static const char* const kVariants[] = {"default", "avx2", "avx512", "avx512_bf16"};
    const char* env = std::getenv("GNFLEX_CPU_VARIANT");
    int limit = 3;
    if (env != nullptr && *env != '\0') {
      const auto it = std::find(std::begin(kVariants), std::end(kVariants), std::string(env));
      TORCH_CHECK(it != std::end(kVariants), "GNFLEX_CPU_VARIANT must be default, avx2, avx512 or avx512_bf16, got '",
                  env, "'");
      limit = static_cast<int>(it - std::begin(kVariants));
    }
#if defined(GNFLEX_HAVE_AVX2_KERNELS) && defined(GNFLEX_HAVE_AVX512_KERNELS)
    __builtin_cpu_init();
    const bool avx512 = cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && limit >= 3 && __builtin_cpu_supports("avx512bf16")) {
      return {"AVX512_BF16", &forward_avx512_bf16, &backward_avx512_bf16};
    }
    if (avx512 && limit >= 2) {
      return {"AVX512", &AVX512::group_norm_forward_kernel, &AVX512::group_norm_backward_kernel};
    }
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        limit >= 1) {
      return {"AVX2", &AVX2::group_norm_forward_kernel, &AVX2::group_norm_backward_kernel};
    }
#endif
    return {"DEFAULT", &DEFAULT::group_norm_forward_kernel, &DEFAULT::group_norm_backward_kernel};
  }();
  return variant;
}

namespace {

// The layout the kernels take: planes of one value (an (N, C) input, or
// spatial sizes all 1) lie in memory as channels-last rows too, and the
// channels-last kernels run along them in vectors, where the channels-first
// ones would take each value as a plane of its own.
Layout kernel_layout(const GroupNormShape& s, Layout layout) { return s.HxW == 1 ? Layout::ChannelsLast : layout; }

// An absent parameter passes as null (read as 1 / 0 by the kernels).
const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

TensorTriple group_norm_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                            c10::string_view activation) {
  ForwardTensors f = setup_forward(input, weight, bias, num_groups, eps, activation);
  ErasedForwardArgs p;
  p.dtype = f.x.scalar_type();
  p.shape = f.shape;
  p.layout = kernel_layout(f.shape, f.layout);
  p.activation = f.activation;
  p.eps = eps;
  p.x = f.x.const_data_ptr();
  p.weight = data_or_null(f.weight);
  p.bias = data_or_null(f.bias);
  p.weight_stride = sample_stride(f.weight);
  p.bias_stride = sample_stride(f.bias);
  p.y = f.y.data_ptr();
  p.mean = f.mean.data_ptr();
  p.rstd = f.rstd.data_ptr();
  p.tuning = cpu_tuning();
  kernel_variant().forward(p);
  return {f.y, f.mean, f.rstd};
}

TensorTriple group_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                     c10::string_view activation, std::array<bool, 3> output_mask) {
  BackwardTensors b = setup_backward(grad_out, input, mean, rstd, weight, bias, num_groups, activation, output_mask);
  ErasedBackwardArgs p;
  p.dtype = b.x.scalar_type();
  p.shape = b.shape;
  p.layout = kernel_layout(b.shape, b.layout);
  p.activation = b.activation;
  p.dy = b.dy.const_data_ptr();
  p.x = b.x.const_data_ptr();
  p.mean = b.mean.const_data_ptr();
  p.rstd = b.rstd.const_data_ptr();
  p.weight = data_or_null(b.weight);
  p.bias = data_or_null(b.bias);
  p.weight_stride = sample_stride(b.weight);
  p.bias_stride = sample_stride(b.bias);
  p.dx = b.dx.defined() ? b.dx.data_ptr() : nullptr;
  p.dweight = b.dweight.data_ptr();
  p.dbias = b.dbias.data_ptr();
  p.tuning = cpu_tuning();
  kernel_variant().backward(p);
  return backward_result(b, weight, input, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace gnflex
