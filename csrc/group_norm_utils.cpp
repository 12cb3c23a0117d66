#include "group_norm_utils.h"

#include <ATen/ATen.h>

#include <cmath>
#include <iterator>

namespace gnflex {

// The activations: the one C++ table (Python's is gnflex/activations.py; a
// test checks they agree). Each canonical name, with ATen's function for the
// composite path (GELU: the exact, erf form), then the aliases.
struct ActivationEntry {
  const char* name;
  Activation value;
  at::Tensor (*aten_function)(const at::Tensor&);
};
constexpr ActivationEntry kActivations[] = {
    {"none", Activation::None, [](const at::Tensor& z) { return z; }},
    {"relu", Activation::ReLU, [](const at::Tensor& z) { return at::relu(z); }},
    {"silu", Activation::SiLU, [](const at::Tensor& z) { return at::silu(z); }},
    {"gelu", Activation::GELU, [](const at::Tensor& z) { return at::gelu(z); }},
};
struct ActivationAlias {
  const char* name;
  Activation value;
};
// apply_activation and the error message index kActivations by the enum's value.
constexpr bool indexed_by_value() {
  for (size_t i = 0; i < std::size(kActivations); ++i) {
    if (static_cast<size_t>(kActivations[i].value) != i) return false;
  }
  return true;
}
static_assert(indexed_by_value(), "kActivations must list the activations in the order of their enum values");
constexpr ActivationAlias kActivationAliases[] = {{"identity", Activation::None}, {"swish", Activation::SiLU}};

Activation parse_activation(c10::string_view name) {
  for (const ActivationEntry& entry : kActivations) {
    if (name == entry.name) return entry.value;
  }
  for (const ActivationAlias& alias : kActivationAliases) {
    if (name == alias.name) return alias.value;
  }
  std::string expected;
  for (const ActivationEntry& entry : kActivations)
    expected += (expected.empty() ? "'" : ", '") + std::string(entry.name) + "'";
  std::string aliases;
  for (const ActivationAlias& alias : kActivationAliases) {
    aliases += (aliases.empty() ? "" : ", ") + std::string(alias.name) + "=" +
               kActivations[static_cast<int>(alias.value)].name;
  }
  TORCH_CHECK(false, "gnflex.group_norm: unknown activation '", std::string(name), "'; expected one of ", expected,
              " (aliases: ", aliases, ")");
}

std::vector<std::string> activation_names() {
  std::vector<std::string> names;
  for (const ActivationEntry& entry : kActivations) names.emplace_back(entry.name);
  for (const ActivationAlias& alias : kActivationAliases) names.emplace_back(alias.name);
  return names;
}

at::Tensor apply_activation(Activation act, const at::Tensor& z) {
  return kActivations[static_cast<int>(act)].aten_function(z);
}

at::ScalarType acc_dtype_for(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

bool is_per_sample(const at::Tensor& param) { return param.defined() && param.dim() == 2; }

int64_t sample_stride(const at::Tensor& param) { return is_per_sample(param) ? param.size(1) : 0; }

namespace {

at::ScalarType param_dtype(const c10::optional<at::Tensor>& weight, const at::Tensor& input) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
}

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_channel_param(const c10::optional<at::Tensor>& param, const char* name, const at::Tensor& input, int64_t C) {
  if (!param.has_value() || !param->defined()) return;
  const at::Tensor& p = *param;
  const bool per_channel = p.dim() == 1 && p.size(0) == C;
  const bool per_sample = p.dim() == 2 && p.size(0) == input.size(0) && p.size(1) == C;
  TORCH_CHECK(per_channel || per_sample, "gnflex.group_norm: expected ", name, " of shape [", C,
              "] (num_channels) or [", input.size(0), ", ", C, "] (per sample), got ", p.sizes());
  TORCH_CHECK(p.device() == input.device(), "gnflex.group_norm: ", name, " is on ", p.device(), " but input is on ",
              input.device());
  const bool same = p.scalar_type() == input.scalar_type();
  const bool fp32_with_half = p.scalar_type() == at::kFloat && is_reduced_float(input.scalar_type());
  TORCH_CHECK(same || fp32_with_half, "gnflex.group_norm: ", name, " dtype ", p.scalar_type(),
              " does not match input dtype ", input.scalar_type(),
              " (float32 parameters are allowed with float16/bfloat16 input)");
}

}  // namespace

GroupNormShape check_forward_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps) {
  TORCH_CHECK(input.dim() >= 2, "gnflex.group_norm: expected input of shape (N, C, *) with at least 2 dims, got ",
              input.dim(), " dims with shape ", input.sizes());
  const auto dtype = input.scalar_type();
  // NotImplementedError, as torch's group_norm for these dtypes.
  TORCH_CHECK_NOT_IMPLEMENTED(dtype == at::kFloat || dtype == at::kDouble || is_reduced_float(dtype),
                              "gnflex.group_norm: expected a float32, float64, float16 or bfloat16 input, got ", dtype);
  const int64_t C = input.size(1);
  TORCH_CHECK(C > 0, "gnflex.group_norm: expected num_channels > 0, got input of shape ", input.sizes());
  // As torch: a batch may be empty (N = 0), the spatial extent may not.
  int64_t HxW = 1;
  for (int64_t d = 2; d < input.dim(); ++d) HxW *= input.size(d);
  TORCH_CHECK(HxW > 0, "gnflex.group_norm: expected non-empty spatial dims, got input of shape ", input.sizes());
  TORCH_CHECK(num_groups > 0, "gnflex.group_norm: num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, "gnflex.group_norm: num_channels (", C, ") must be divisible by num_groups (",
              num_groups, ")");
  // Any eps is accepted, as by torch: a negative eps works while var + eps > 0
  // (torch's own conformance cases use -0.5), NaN gives NaN, inf gives bias.
  check_channel_param(weight, "weight", input, C);
  check_channel_param(bias, "bias", input, C);
  return {input.size(0), C, HxW, num_groups};
}

namespace {

GroupNormShape check_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                   const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t num_groups) {
  const GroupNormShape shape = check_forward_args(input, weight, bias, num_groups, 0.0);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "gnflex.group_norm_backward: grad_out shape ", grad_out.sizes(),
              " does not match input shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "gnflex.group_norm_backward: grad_out dtype ",
              grad_out.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "gnflex.group_norm_backward: grad_out is on ", grad_out.device(),
              " but input is on ", input.device());
  const auto acc = acc_dtype_for(input.scalar_type());
  for (const auto* stat : {&mean, &rstd}) {
    const char* name = stat == &mean ? "mean" : "rstd";
    TORCH_CHECK(stat->numel() == shape.N * shape.G, "gnflex.group_norm_backward: expected ", name,
                " with N * num_groups = ", shape.N * shape.G, " elements, got shape ", stat->sizes());
    TORCH_CHECK(stat->scalar_type() == acc, "gnflex.group_norm_backward: expected ", name, " of dtype ", acc, ", got ",
                stat->scalar_type());
    TORCH_CHECK(stat->device() == input.device(), "gnflex.group_norm_backward: ", name, " is on ", stat->device(),
                " but input is on ", input.device());
  }
  return shape;
}

// True when `t` is dense with the channel dim innermost: strides match a
// row-major (N, *spatial, C) tensor. Size-1 dims may have any stride.
bool is_channels_last_dense(const at::Tensor& t) {
  if (t.dim() < 3 || t.stride(1) != 1) return false;
  int64_t expected = t.size(1);
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

}  // namespace

bool reads_channels_last(const at::Tensor& input) {
  // A tensor that is both (e.g. C == 1 or HxW == 1) is read as channels-first
  // (the CPU kernels then run HxW == 1 as channels-last rows: the same memory).
  return !input.is_contiguous() && is_channels_last_dense(input);
}

namespace {

at::Tensor to_native_layout(const at::Tensor& input, Layout* layout) {
  if (reads_channels_last(input)) {
    *layout = Layout::ChannelsLast;
    return input;
  }
  *layout = Layout::ChannelsFirst;
  return input.contiguous();
}

at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  // empty_like keeps the strides of a dense tensor.
  return at::empty_like(like).copy_(t);
}

at::Tensor param_grad(const at::Tensor& param, const GroupNormShape& shape, at::ScalarType dtype, ParamMode mode,
                      const at::Device& device) {
  const auto options = at::TensorOptions().dtype(dtype).device(device);
  if (is_per_sample(param)) {
    return mode == ParamMode::Raw ? at::empty({shape.N, shape.C}, options) : at::zeros({shape.N, shape.C}, options);
  }
  return mode == ParamMode::Raw ? at::empty({shape.C}, options) : at::zeros({shape.C}, options);
}

at::Tensor channel_param(const c10::optional<at::Tensor>& param, at::ScalarType acc_dtype, ParamMode mode) {
  if (param.has_value() && param->defined()) {
    return mode == ParamMode::Raw ? param->contiguous() : param->to(acc_dtype).contiguous();
  }
  return at::Tensor();
}

}  // namespace

ForwardTensors setup_forward(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                             c10::string_view activation, ParamMode params) {
  ForwardTensors f;
  f.shape = check_forward_args(input, weight, bias, num_groups, eps);
  f.activation = parse_activation(activation);
  f.x = to_native_layout(input, &f.layout);
  const auto acc = acc_dtype_for(f.x.scalar_type());
  f.weight = channel_param(weight, acc, params);
  f.bias = channel_param(bias, acc, params);
  f.y = at::empty_like(f.x);
  f.mean = at::empty({f.shape.N, f.shape.G}, f.x.options().dtype(acc));
  f.rstd = at::empty({f.shape.N, f.shape.G}, f.x.options().dtype(acc));
  return f;
}

BackwardTensors setup_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, c10::string_view activation,
                               std::array<bool, 3> output_mask, ParamMode params) {
  BackwardTensors b;
  b.shape = check_backward_args(grad_out, input, mean, rstd, weight, bias, num_groups);
  b.activation = parse_activation(activation);
  b.x = to_native_layout(input, &b.layout);
  b.dy = with_strides_of(grad_out, b.x);
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  const auto acc = acc_dtype_for(b.x.scalar_type());
  b.weight = channel_param(weight, acc, params);
  b.bias = channel_param(bias, acc, params);
  if (output_mask[0]) b.dx = at::empty_like(b.x);
  const auto grad_dtype = params == ParamMode::Raw ? param_dtype(weight, input) : acc;
  b.dweight = param_grad(b.weight, b.shape, grad_dtype, params, b.x.device());
  b.dbias = param_grad(b.bias, b.shape, grad_dtype, params, b.x.device());
  return b;
}

TensorTriple backward_result(const BackwardTensors& setup, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& input, std::array<bool, 3> output_mask) {
  const auto dtype = param_dtype(weight, input);
  return {defined_if(output_mask[0], setup.dx), defined_if(output_mask[1], setup.dweight.to(dtype)),
          defined_if(output_mask[2], setup.dbias.to(dtype))};
}

}  // namespace gnflex
