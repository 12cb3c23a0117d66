// CUDA GroupNorm ops: argument handling and allocation around the launch
// sequence of group_norm_launch.cuh (kernels in group_norm_*.cuh, which the
// CPU simulator test in tests/cuda_sim/ runs unchanged).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../group_norm_utils.h"
#include "group_norm_launch.cuh"

namespace gnflex {
namespace cuda {
namespace {

template <typename scalar_t>
void check_grid(const GroupNormShape& s, Layout layout) {
  const int64_t blocks = max_grid_blocks<scalar_t>(s, layout);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "gnflex.group_norm (CUDA): input too large (", blocks,
              " blocks needed)");
}

// An optional parameter's data, or null (the kernels read null as 1 / 0).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename scalar_t>
at::Tensor workspace_for(const GroupNormShape& s, Layout layout, const at::Tensor& like) {
  return at::empty({workspace_bytes<scalar_t>(s, layout)}, like.options().dtype(at::kByte));
}

TensorTriple group_norm_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                             c10::string_view activation) {
  c10::cuda::CUDAGuard device_guard(input.device());
  ForwardSetup f = setup_forward(input, weight, bias, num_groups, eps, activation, ParamMode::Raw);
  const GroupNormShape& s = f.shape;
  if (s.N * s.C == 0) return {f.y, f.mean, f.rstd};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "gnflex_group_norm_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    check_grid<scalar_t>(s, f.layout);
    at::Tensor workspace = workspace_for<scalar_t>(s, f.layout, f.x);
    launch_forward<scalar_t>(f.x.const_data_ptr<scalar_t>(), f.y.data_ptr<scalar_t>(), data_or_null<acc_t>(f.weight),
                             data_or_null<acc_t>(f.bias), static_cast<acc_t>(eps), f.activation, s, f.layout,
                             f.mean.data_ptr<acc_t>(), f.rstd.data_ptr<acc_t>(), workspace.data_ptr(), stream);
  });
  return {f.y, f.mean, f.rstd};
}

TensorTriple group_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                      const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                      c10::string_view activation, std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard device_guard(input.device());
  BackwardSetup bs =
      setup_backward(grad_out, input, mean, rstd, weight, bias, num_groups, activation, output_mask, ParamMode::Raw);
  const GroupNormShape& s = bs.shape;
  if (s.N * s.C == 0) {  // no samples: zero parameter gradients
    bs.dweight.zero_();
    bs.dbias.zero_();
    return backward_result(bs, weight, input, output_mask);
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool param_grads = output_mask[1] || output_mask[2];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs.x.scalar_type(), "gnflex_group_norm_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    check_grid<scalar_t>(s, bs.layout);
    at::Tensor workspace = workspace_for<scalar_t>(s, bs.layout, bs.x);
    launch_backward<scalar_t>(bs.dy.const_data_ptr<scalar_t>(), bs.x.const_data_ptr<scalar_t>(),
                              bs.mean.const_data_ptr<acc_t>(), bs.rstd.const_data_ptr<acc_t>(),
                              data_or_null<acc_t>(bs.weight), data_or_null<acc_t>(bs.bias), bs.activation, s, bs.layout,
                              output_mask[0] ? bs.dx.data_ptr<scalar_t>() : nullptr,
                              param_grads ? bs.dweight.data_ptr<acc_t>() : nullptr,
                              param_grads ? bs.dbias.data_ptr<acc_t>() : nullptr, workspace.data_ptr(), stream);
  });
  return backward_result(bs, weight, input, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace gnflex
