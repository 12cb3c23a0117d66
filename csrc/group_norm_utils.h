// Host-side pieces every back end shares: argument checks, layout detection,
// activation parsing and the per-channel parameter tensors the kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "group_norm_types.h"
#include "gnflex_ops.h"

namespace gnflex {

Activation parse_activation(c10::string_view name);
// Every name parse_activation accepts (aliases included).
std::vector<std::string> activation_names();
// act(z) from ATen's differentiable ops (the composite path).
at::Tensor apply_activation(Activation act, const at::Tensor& z);

// Accumulate dtype of an input dtype: double for double, float otherwise.
at::ScalarType acc_dtype_for(at::ScalarType dtype);

// weight / bias are per channel, (C,), or per sample, (N, C): what AdaGN /
// FiLM modulation folds into them. A kernel reads entry (n, c) of a
// parameter at n * sample_stride + c (0 for per-channel ones), and writes its
// gradient in the parameter's shape.
bool is_per_sample(const at::Tensor& param);
int64_t sample_stride(const at::Tensor& param);

// The op's argument checks (shape, dtype, groups, parameters), with the
// messages every back end and the composite path give; returns the sizes.
GroupNormShape check_forward_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps);

// Whether the kernels read `input` as channels-last (dense, channel innermost,
// not also contiguous); their outputs then keep its layout.
bool reads_channels_last(const at::Tensor& input);

// How a back end takes parameters. Either way absent ones stay undefined (the
// kernels read null as 1 / 0). Accumulate gives present weight / bias in the
// accumulate dtype and zeroed accumulate-dtype dweight / dbias; Raw passes
// them in their own dtype (no cast) and dweight / dbias uninitialized in the
// dtype the op returns (the kernels write every element), saving the cast and
// fill launches.
enum class ParamMode { Accumulate, Raw };

// What a back end needs for the forward: validated sizes, the input in a
// native layout, parameters as (C,) or (N, C) tensors and the
// allocated outputs (y in the input's layout, mean/rstd (N, G)). See
// ParamMode for the parameters' dtype.
struct ForwardTensors {
  GroupNormShape shape;
  Activation activation;
  Layout layout;
  at::Tensor x, weight, bias;
  at::Tensor y, mean, rstd;
};

ForwardTensors setup_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                             c10::string_view activation, ParamMode params = ParamMode::Accumulate);

// The same for the backward: grad_out in the input's layout, contiguous
// statistics, dx allocated when wanted (else undefined), and dweight/dbias
// in the parameters' shapes (see ParamMode).
struct BackwardTensors {
  GroupNormShape shape;
  Activation activation;
  Layout layout;
  at::Tensor dy, x, mean, rstd, weight, bias;
  at::Tensor dx, dweight, dbias;
};

BackwardTensors setup_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, c10::string_view activation,
                               std::array<bool, 3> output_mask, ParamMode params = ParamMode::Accumulate);

// The op's result: outputs left out by output_mask undefined (None), the
// parameter gradients in the parameters' dtype.
TensorTriple backward_result(const BackwardTensors& setup, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& input, std::array<bool, 3> output_mask);

// Undefined tensor (-> None in Python) for outputs output_mask leaves out.
inline at::Tensor defined_if(bool wanted, const at::Tensor& t) { return wanted ? t : at::Tensor(); }

}  // namespace gnflex
