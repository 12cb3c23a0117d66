// Host-side pieces every back end shares: argument checks, layout detection,
// activation parsing and the per-channel parameter tensors the kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "gn_math.h"

namespace gnflex {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Sizes of an (N, C, *) input seen as (N, C, HxW) with num_groups groups.
struct GroupNormShape {
  int64_t N;
  int64_t C;
  int64_t HxW;
  int64_t G;
  int64_t channels_per_group() const { return C / G; }
  // Number of values normalised together.
  int64_t group_size() const { return C / G * HxW; }
};

// Memory layouts the kernels read natively.
//   ChannelsFirst: dense (N, C, *spatial) row-major (NCHW).
//   ChannelsLast: dense with the channel innermost, (N, *spatial, C) in
//                 memory: channels_last, channels_last_3d, and a transposed
//                 (N, L, C) tensor of rank 3.
enum class Layout { ChannelsFirst, ChannelsLast };

Activation parse_activation(c10::string_view name);

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value, so
// kernels take the activation as a template parameter.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::ReLU:
      return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::SiLU:
      return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::GELU:
      return f(std::integral_constant<Activation, Activation::GELU>{});
    case Activation::None:
    default:
      return f(std::integral_constant<Activation, Activation::None>{});
  }
}

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
