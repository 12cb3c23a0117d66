// C++ entry points of the gnflex ops. They call through the dispatcher, so
// autograd, autocast and the CPU/CUDA kernels apply exactly as for
// torch.ops.gnflex.* in Python. Link against the gnflex op library.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace gnflex {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// (y, mean, rstd): y = act(GroupNorm(input)), mean/rstd (N, num_groups).
TensorTriple group_norm(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps = 1e-5,
                        c10::string_view activation = "none");

// (dx, dweight, dbias); outputs left out by output_mask are undefined.
TensorTriple group_norm_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t num_groups, c10::string_view activation,
                                 std::array<bool, 3> output_mask);

// Under CUDA autocast, group_norm follows torch's rule for group_norm by
// default: input cast to float32, float32 output. With half output on (an
// opt-in, process-wide), it takes the input in the autocast dtype and returns
// that dtype, float32 math inside (timm's fast_norm): an fp16 / bf16 network
// then moves half the bytes. Read when the op is called (or traced).
void set_autocast_half_output(bool enabled);
bool autocast_half_output();

}  // namespace gnflex
