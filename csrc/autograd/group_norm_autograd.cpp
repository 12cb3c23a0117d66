// Autograd for gnflex::group_norm, registered on the Autograd key so
// gradients flow for Python, TorchScript and C++ callers alike.
//
// First-order backward calls gnflex::group_norm_backward (our kernels).
// When the backward itself is recorded (create_graph=True, e.g. gradgradcheck
// or gradient penalties) it instead differentiates a decomposition of the
// forward into ATen ops, which autograd can differentiate again.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../group_norm_utils.h"

namespace gnflex {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// GroupNorm + activation from differentiable ATen ops; only used to build a
// graph that supports higher-order gradients.
at::Tensor group_norm_decomposed(const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias, int64_t num_groups, double eps,
                                 Activation act) {
  const int64_t N = input.size(0);
  const at::Tensor grouped = input.reshape({N, num_groups, -1});
  const at::Tensor centered = grouped - grouped.mean({-1}, /*keepdim=*/true);
  const at::Tensor var = centered.pow(2).mean({-1}, /*keepdim=*/true);
  at::Tensor z = (centered * at::rsqrt(var + eps)).reshape(input.sizes());
  std::vector<int64_t> channel_shape(input.dim(), 1);
  channel_shape[1] = input.size(1);
  if (weight.defined()) z = z * weight.reshape(channel_shape);
  if (bias.defined()) z = z + bias.reshape(channel_shape);
  switch (act) {
    case Activation::ReLU:
      return at::relu(z);
    case Activation::SiLU:
      return at::silu(z);
    case Activation::GELU:
      return at::gelu(z);
    case Activation::None:
    default:
      return z;
  }
}

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups,
                               double eps, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = group_norm(input, weight, bias, num_groups, eps, activation);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& bias = saved[2];
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor& grad_y = grad_outputs[0];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0),
                                      weight.defined() && ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(2)};
    variable_list grads(6);
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2])) return grads;

    if (at::GradMode::is_enabled()) {
      // Higher-order path (create_graph=True).
      variable_list wrt;
      for (int i = 0; i < 3; ++i) {
        if (mask[i]) wrt.push_back(saved[i]);
      }
      const at::Tensor y = group_norm_decomposed(input, weight, bias, num_groups,
                                                 ctx->saved_data["eps"].toDouble(),
                                                 parse_activation(activation));
      const auto computed = torch::autograd::grad({y}, wrt, {grad_y}, /*retain_graph=*/true,
                                                  /*create_graph=*/true, /*allow_unused=*/true);
      for (int i = 0, k = 0; i < 3; ++i) {
        if (mask[i]) grads[i] = computed[k++];
      }
      return grads;
    }

    auto [dx, dweight, dbias] = group_norm_backward(
        grad_y, input, saved[3], saved[4], optional_if_defined(weight), optional_if_defined(bias),
        num_groups, activation, mask);
    grads[0] = dx;
    grads[1] = dweight;
    grads[2] = dbias;
    return grads;
  }
};

TensorTriple group_norm_autograd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                 double eps, c10::string_view activation) {
  const auto out = GroupNormFunction::apply(input, weight, bias, num_groups, eps, activation);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, Autograd, m) {
  m.impl("group_norm", &group_norm_autograd);
}

}  // namespace gnflex
