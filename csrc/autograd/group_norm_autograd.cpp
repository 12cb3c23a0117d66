// Autograd for gnflex::group_norm, registered on the Autograd key so
// gradients flow for Python, TorchScript and C++ callers alike.
//
// First-order backward calls gnflex::group_norm_backward (our kernels).
// When the backward itself is recorded (create_graph=True, e.g. gradgradcheck
// or gradient penalties) it instead differentiates a composite of the
// forward from ATen ops, which autograd can differentiate again. Calls
// inside torch.func transforms or with forward-mode tangents run that
// composite instead of the kernels (the transforms cannot see into a C++
// autograd Function).
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
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

// GroupNorm + activation from differentiable ATen ops, in the accumulate
// dtype (as the kernels), with y in the input's layout. Autograd can
// differentiate it again and again, the torch.func transforms (vmap, grad,
// jvp, ...) and forward-mode AD handle every op in it: the fused kernels'
// C++ autograd Function supports none of these. mean and rstd are
// non-differentiable, as with the kernels.
TensorTriple group_norm_composite(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                  int64_t num_groups, double eps, Activation act) {
  const GroupNormShape s =
      check_forward_args(input, optional_if_defined(weight), optional_if_defined(bias), num_groups, eps);
  const auto acc = acc_dtype_for(input.scalar_type());
  const at::Tensor grouped = input.to(acc).reshape({s.N, s.G, s.channels_per_group() * s.HxW});
  const at::Tensor mean = grouped.mean({-1}, /*keepdim=*/true);
  const at::Tensor centered = grouped - mean;
  const at::Tensor rstd = at::rsqrt(centered.pow(2).mean({-1}, /*keepdim=*/true) + eps);
  at::Tensor z = (centered * rstd).reshape(input.sizes());
  // A parameter broadcast over the values: (1, C, 1, ...), or (N, C, 1, ...) per sample.
  const auto per_value = [&](const at::Tensor& param) {
    std::vector<int64_t> shape(input.dim(), 1);
    shape[0] = is_per_sample(param) ? s.N : 1;
    shape[1] = s.C;
    return param.to(acc).reshape(shape);
  };
  if (weight.defined()) z = z * per_value(weight);
  if (bias.defined()) z = z + per_value(bias);
  at::Tensor y = apply_activation(act, z).to(input.scalar_type());
  if (reads_channels_last(input)) {  // the kernels' rule: y keeps a channels-last input's layout
    std::vector<int64_t> to_last(input.dim()), back(input.dim());  // (N, C, *) <-> (N, *, C)
    for (int64_t d = 0; d < input.dim(); ++d) to_last[d] = d == 0 ? 0 : d == input.dim() - 1 ? 1 : d + 1;
    for (int64_t d = 0; d < input.dim(); ++d) back[to_last[d]] = d;
    y = y.permute(to_last).contiguous().permute(back);
  }
  return {y, mean.reshape({s.N, s.G}).detach(), rstd.reshape({s.N, s.G}).detach()};
}

// Whether torch.func transforms are active on this thread, by the predicate
// torch::autograd::Function::apply itself checks (the header that exposes
// the transform stack directly is not installed with torch).
bool inside_functorch_transform() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;  // no transform ever ran on this thread
  try {
    tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// Whether a call must take the composite: inside a torch.func transform, or
// with a forward-mode tangent on any input.
bool needs_composite(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias) {
  if (inside_functorch_transform()) return true;
  const auto has_tangent = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
  };
  return has_tangent(input) || has_tangent(weight) || has_tangent(bias);
}

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = group_norm(input, weight, bias, num_groups, eps, activation);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, rstd});
    // The backward reads only y's gradient; undefined ones stay undefined
    // instead of being filled with zeros on every call.
    ctx->set_materialize_grads(false);
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
    // needs_input_grad counts the tensors passed: an absent weight shifts the bias.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1)};
    variable_list grads(6);
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2])) return grads;

    if (at::GradMode::is_enabled()) {
      // Higher-order path (create_graph=True).
      variable_list wrt;
      for (int i = 0; i < 3; ++i) {
        if (mask[i]) wrt.push_back(saved[i]);
      }
      const at::Tensor y = std::get<0>(group_norm_composite(
          input, weight, bias, num_groups, ctx->saved_data["eps"].toDouble(), parse_activation(activation)));
      const auto computed = torch::autograd::grad({y}, wrt, {grad_y}, /*retain_graph=*/true,
                                                  /*create_graph=*/true, /*allow_unused=*/true);
      for (int i = 0, k = 0; i < 3; ++i) {
        if (mask[i]) grads[i] = computed[k++];
      }
      return grads;
    }

    auto [dx, dweight, dbias] = group_norm_backward(grad_y, input, saved[3], saved[4], optional_if_defined(weight),
                                                    optional_if_defined(bias), num_groups, activation, mask);
    grads[0] = dx;
    grads[1] = dweight;
    grads[2] = dbias;
    return grads;
  }
};

TensorTriple group_norm_autograd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                 c10::string_view activation) {
  if (needs_composite(input, weight, bias)) {
    return group_norm_composite(input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), num_groups, eps,
                                parse_activation(activation));
  }
  // Nothing to record (no_grad, inference, or no input requires grad): the
  // kernels directly. The autograd Function would build a node, save the
  // inputs and fill its saved_data map on every call, a good part of a small
  // input's time, for outputs that need none of it.
  const auto requires_grad = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return group_norm(input, weight, bias, num_groups, eps, activation);
  }
  const auto out = GroupNormFunction::apply(input, weight, bias, num_groups, eps, activation);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, Autograd, m) { m.impl("group_norm", &group_norm_autograd); }

}  // namespace gnflex
