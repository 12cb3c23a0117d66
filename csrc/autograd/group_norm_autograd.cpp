// Autograd for gnflex::group_norm, registered on the Autograd key so
// gradients flow for Python, TorchScript and C++ callers alike.
//
// First-order backward calls gnflex::group_norm_backward (our kernels).
// When the backward itself is recorded (create_graph=True, e.g. gradgradcheck
// or gradient penalties) it instead differentiates a composite of the
// forward from ATen ops, which autograd can differentiate again. Calls
// inside torch.func transforms or with forward-mode tangents run that
// composite instead of the kernels (the transforms cannot see into a C++
// graph node).
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>

#include "../group_norm_utils.h"

namespace gnflex {
namespace {

using torch::autograd::variable_list;

c10::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// GroupNorm + activation from differentiable ATen ops, in the accumulate
// dtype (as the kernels), with y in the input's layout. Autograd can
// differentiate it again and again, the torch.func transforms (vmap, grad,
// jvp, ...) and forward-mode AD handle every op in it: the fused kernels'
// graph node (GroupNormBackward) supports none of these. mean and rstd are
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

using torch::autograd::SavedVariable;

// The graph node of a recorded call, built as ATen's generated nodes are:
// saved tensors as SavedVariable members, the other arguments as fields.
// A torch::autograd::Function's node (CppNode) costs more per call: a
// context with a string-keyed map, metadata copied per input and output,
// and its bookkeeping on both passes (docs/performance.md).
struct GroupNormBackward : public torch::autograd::Node {
  SavedVariable input, weight, bias, mean, rstd;
  int64_t num_groups = 0;
  double eps = 0;
  std::string activation;

  std::string name() const override { return "GroupNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&input, &weight, &bias, &mean, &rstd}) v->reset_data();
  }

  // Next edges (outputs here): input, weight, bias; an absent parameter's
  // edge is invalid and gets no gradient.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack();
    const at::Tensor& grad_y = grads[0];
    const std::array<bool, 3> mask = {task_should_compute_output(0), w.defined() && task_should_compute_output(1),
                                      b.defined() && task_should_compute_output(2)};
    variable_list out(3);
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2])) return out;

    if (at::GradMode::is_enabled()) {
      // Higher-order path (create_graph=True).
      const std::array<const at::Tensor*, 3> saved = {&x, &w, &b};
      variable_list wrt;
      for (int i = 0; i < 3; ++i) {
        if (mask[i]) wrt.push_back(*saved[i]);
      }
      const at::Tensor y = std::get<0>(group_norm_composite(x, w, b, num_groups, eps, parse_activation(activation)));
      const auto computed = torch::autograd::grad({y}, wrt, {grad_y}, /*retain_graph=*/true,
                                                  /*create_graph=*/true, /*allow_unused=*/true);
      for (int i = 0, k = 0; i < 3; ++i) {
        if (mask[i]) out[i] = computed[k++];
      }
      return out;
    }

    auto [dx, dweight, dbias] = group_norm_backward(grad_y, x, mean.unpack(), rstd.unpack(), optional_if_defined(w),
                                                    optional_if_defined(b), num_groups, activation, mask);
    out[0] = dx;
    out[1] = dweight;
    out[2] = dbias;
    return out;
  }
};

// A new node, held as the torch build holds them: std::shared_ptr<Node>
// with torch's iterative deleter (deep graphs), or c10::intrusive_ptr<Node>
// in later releases. Both branches depend on N, so only the one that
// matches the installed torch is compiled.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });  // found by ADL, in torch::autograd
  } else {
    return c10::make_intrusive<N>();
  }
}

TensorTriple group_norm_autograd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                 c10::string_view activation) {
  if (needs_composite(input, weight, bias)) {
    return group_norm_composite(input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), num_groups, eps,
                                parse_activation(activation));
  }
  auto [y, mean, rstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return group_norm(input, weight, bias, num_groups, eps, activation);
  }();
  // Nothing to record (no_grad, or no input requires grad): no node.
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  if (!torch::autograd::compute_requires_grad(input, w, b)) return {y, mean, rstd};
  auto node = make_node<GroupNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  node->input = SavedVariable(input, /*is_output=*/false);
  node->weight = SavedVariable(w, false);
  node->bias = SavedVariable(b, false);
  // mean and rstd are outputs without a gradient edge (non-differentiable),
  // saved as any tensor without history.
  node->mean = SavedVariable(mean, false);
  node->rstd = SavedVariable(rstd, false);
  node->num_groups = num_groups;
  node->eps = eps;
  node->activation = std::string(activation);
  torch::autograd::set_history(y, NodePtr(node));
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, Autograd, m) { m.impl("group_norm", &group_norm_autograd); }

}  // namespace gnflex
