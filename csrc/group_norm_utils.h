// Host-side pieces every back end shares: argument checks, layout detection,
// activation parsing and the per-channel parameter tensors the kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "gn_types.h"

namespace gnflex {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Activation parse_activation(c10::string_view name);

GroupNormShape check_forward_args(const at::Tensor& input,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                  double eps);

GroupNormShape check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& mean, const at::Tensor& rstd,
                                   const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t num_groups);

// The input itself when its layout is native, else a contiguous copy.
at::Tensor to_native_layout(const at::Tensor& input, Layout* layout);

// `t` with exactly the strides of `like` (a tensor in native layout), copying
// only when they differ. Used to bring grad_out into the input's layout.
at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like);

// Weight or bias as a contiguous (C,) tensor of the accumulate dtype, or
// `fill` everywhere when absent.
at::Tensor channel_param(const c10::optional<at::Tensor>& param, int64_t C,
                         at::ScalarType acc_dtype, double fill, const at::Device& device);

// Accumulate dtype of an input dtype: double for double, float otherwise.
at::ScalarType acc_dtype_for(at::ScalarType dtype);

// Dtype of dweight/dbias: the weight's when given, else the input's.
at::ScalarType param_dtype(const c10::optional<at::Tensor>& weight, const at::Tensor& input);

// Undefined tensor (-> None in Python) for outputs output_mask leaves out.
inline at::Tensor defined_if(bool wanted, const at::Tensor& t) {
  return wanted ? t : at::Tensor();
}

}  // namespace gnflex
