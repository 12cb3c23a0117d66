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
#include <torch/csrc/dynamo/compiled_autograd.h>
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

// Whether a backward has anything to compute: y's gradient, and a wanted one.
bool computes_any(const at::Tensor& grad_y, const std::array<bool, 3>& mask) {
  return grad_y.defined() && (mask[0] || mask[1] || mask[2]);
}

// dx, dweight, dbias from the kernels (undefined where not in mask).
variable_list first_order_grads(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                                const std::string& activation, const std::array<bool, 3>& mask) {
  auto [dx, dweight, dbias] = group_norm_backward(grad_y, x, mean, rstd, optional_if_defined(w), optional_if_defined(b),
                                                  num_groups, activation, mask);
  return {dx, dweight, dbias};
}

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

  // Compiled autograd (torch._dynamo.compiled_autograd): what keys its
  // cached graph, and the backward as a call in that graph
  // (backward_from_packed), as torch's own C++ nodes do.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : saved_variables()) args.collect(*v, /*is_output=*/false);
    args.collect(num_groups);
    args.collect(activation);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (SavedVariable* v : saved_variables()) saved.before(*v);
    variable_list results = call_packed_backward(grads, saved.get_py_compiler());
    for (SavedVariable* v : saved_variables()) saved.after(*v);
    return results;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved_variables()) v->reset_data();
  }

  // Next edges (outputs here): input, weight, bias; an absent parameter's
  // edge is invalid and gets no gradient.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack();
    const at::Tensor& grad_y = grads[0];
    const std::array<bool, 3> mask = wanted(w, b);
    variable_list out(3);
    if (!computes_any(grad_y, mask)) return out;

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

    return first_order_grads(grad_y, x, w, b, mean.unpack(), rstd.unpack(), num_groups, activation, mask);
  }

 private:
  std::array<SavedVariable*, 5> saved_variables() { return {&input, &weight, &bias, &mean, &rstd}; }
  std::array<const SavedVariable*, 5> saved_variables() const { return {&input, &weight, &bias, &mean, &rstd}; }

  // The gradients this backward computes: those of the edges the current
  // graph task needs, of the parameters present.
  std::array<bool, 3> wanted(const at::Tensor& w, const at::Tensor& b) const {
    return {task_should_compute_output(0), w.defined() && task_should_compute_output(1),
            b.defined() && task_should_compute_output(2)};
  }

  // Binds backward_from_packed to compiled autograd's compiler and records
  // a call to it on the traced gradients and saved tensors.
  variable_list call_packed_backward(const variable_list& grads, PyObject* py_compiler) {
    namespace ca = torch::dynamo::autograd;
    const at::Tensor w = weight.unpack(), b = bias.unpack();
    std::vector<at::Tensor> tensors = {input.unpack(), mean.unpack(), rstd.unpack()};
    if (w.defined()) tensors.push_back(w);
    if (b.defined()) tensors.push_back(b);
    ca::PackedArgs packed;
    packed.pack(tensors);
    packed.pack(w.defined());
    packed.pack(b.defined());
    packed.pack(num_groups);
    packed.pack(activation);
    const std::array<bool, 3> mask = wanted(w, b);
    packed.pack(std::vector<bool>(mask.begin(), mask.end()));
    const std::vector<at::IValue>& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const at::IValue& arg : args) schema.push_back(arg.isTensor() ? at::TensorType::get() : arg.type());
    const auto& compiler = ca::getPyCompilerInterface();
    // As a custom function: bound under a fresh name on every call, since
    // the schema differs with the parameters present.
    const std::string fn_name = compiler->bind_function(py_compiler, name(), backward_from_packed, schema,
                                                        /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto output_metadata = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    return compiler->call_function(py_compiler, "apply_functional", fn_name, grads, args, output_metadata);
  }

  static variable_list backward_from_packed(const variable_list& grads, const std::vector<at::IValue>& packed) {
    torch::dynamo::autograd::PackedArgs args(packed);
    const auto tensors = args.unpack<std::vector<at::Tensor>>();
    const bool has_weight = args.unpack<bool>(), has_bias = args.unpack<bool>();
    const auto num_groups = args.unpack<int64_t>();
    const auto activation = args.unpack<std::string>();
    const auto packed_mask = args.unpack<std::vector<bool>>();
    const std::array<bool, 3> mask = {packed_mask[0], packed_mask[1], packed_mask[2]};
    if (!computes_any(grads[0], mask)) return variable_list(3);
    const at::Tensor w = has_weight ? tensors[3] : at::Tensor();
    const at::Tensor b = has_bias ? tensors[3 + has_weight] : at::Tensor();
    return first_order_grads(grads[0], tensors[0], w, b, tensors[1], tensors[2], num_groups, activation, mask);
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
