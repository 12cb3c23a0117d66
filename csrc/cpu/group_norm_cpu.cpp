// CPU implementations of the gnflex ops: argument checks, output allocation,
// and the call into the kernel copy for this CPU (AVX2 or portable).
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "../group_norm_utils.h"
#include "group_norm_kernels.h"

namespace gnflex {
namespace cpu {
namespace {

// ATen's view of this CPU, which also honours ATEN_CPU_CAPABILITY=default.
bool use_avx2_kernels() {
#ifdef GNFLEX_HAVE_AVX2_KERNELS
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

TensorTriple group_norm_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                            c10::string_view activation) {
  ForwardParams p;
  p.shape = check_forward_args(input, weight, bias, num_groups, eps);
  p.activation = parse_activation(activation);
  const at::Tensor x = to_native_layout(input, &p.layout);
  const auto acc_dtype = acc_dtype_for(x.scalar_type());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.shape.N, p.shape.G}, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({p.shape.N, p.shape.G}, x.options().dtype(acc_dtype));
  const at::Tensor w = channel_param(weight, p.shape.C, acc_dtype, 1.0, x.device());
  const at::Tensor b = channel_param(bias, p.shape.C, acc_dtype, 0.0, x.device());
  p.dtype = x.scalar_type();
  p.eps = eps;
  p.x = x.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.bias = b.const_data_ptr();
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
#ifdef GNFLEX_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) {
    AVX2::group_norm_forward_kernel(p);
    return {y, mean, rstd};
  }
#endif
  DEFAULT::group_norm_forward_kernel(p);
  return {y, mean, rstd};
}

TensorTriple group_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& rstd,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                     c10::string_view activation, std::array<bool, 3> output_mask) {
  BackwardParams p;
  p.shape = check_backward_args(grad_out, input, mean, rstd, weight, bias, num_groups);
  p.activation = parse_activation(activation);
  const at::Tensor x = to_native_layout(input, &p.layout);
  const at::Tensor dy = with_strides_of(grad_out, x);
  const auto acc_dtype = acc_dtype_for(x.scalar_type());
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor w = channel_param(weight, p.shape.C, acc_dtype, 1.0, x.device());
  const at::Tensor b = channel_param(bias, p.shape.C, acc_dtype, 0.0, x.device());
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor dweight = at::empty({p.shape.C}, x.options().dtype(acc_dtype));
  at::Tensor dbias = at::empty({p.shape.C}, x.options().dtype(acc_dtype));
  p.dtype = x.scalar_type();
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.mean = mean_c.const_data_ptr();
  p.rstd = rstd_c.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.bias = b.const_data_ptr();
  p.dx = output_mask[0] ? dx.data_ptr() : nullptr;
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
#ifdef GNFLEX_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) {
    AVX2::group_norm_backward_kernel(p);
  } else {
    DEFAULT::group_norm_backward_kernel(p);
  }
#else
  DEFAULT::group_norm_backward_kernel(p);
#endif
  const auto pdtype = param_dtype(weight, input);
  return {defined_if(output_mask[0], dx), defined_if(output_mask[1], dweight.to(pdtype)),
          defined_if(output_mask[2], dbias.to(pdtype))};
}

}  // namespace

TORCH_LIBRARY_IMPL(gnflex, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace gnflex
