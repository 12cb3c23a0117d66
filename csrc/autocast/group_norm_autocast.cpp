// Autocast policy for gnflex::group_norm, the same as torch's group_norm:
//   CUDA autocast (fp16/bf16): inputs cast to float32, so statistics and the
//     output are float32 (torch lists group_norm among its fp32 ops on CUDA).
//   CPU autocast: no cast (torch does not cast group_norm on CPU); a bf16 or
//     fp16 input keeps its dtype, float32 parameters are accepted, and the
//     kernels accumulate statistics in float32 anyway.
//   With set_autocast_half_output(true) (gnflex_ops.h), CUDA autocast casts
//     the input to the autocast dtype instead: output in that dtype.
// group_norm_backward needs no policy: it runs on what the forward saved.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <atomic>

#include "../group_norm_types.h"
#include "../gnflex_ops.h"

namespace gnflex {
namespace {

std::atomic<bool> half_output{false};

// float32 parameters go with any input; a 16-bit one that is not the
// input's dtype is cast to float32.
c10::optional<at::Tensor> cast_param(const c10::optional<at::Tensor>& t, at::ScalarType input_dtype) {
  if (!t.has_value() || !t->defined()) return t;
  const bool half_param = t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16;
  if (half_output.load(std::memory_order_relaxed) && !(half_param && t->scalar_type() != input_dtype)) return t;
  return at::autocast::cached_cast(at::kFloat, *t, c10::DeviceType::CUDA);
}

TensorTriple group_norm_autocast_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                      c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = half_output.load(std::memory_order_relaxed)
                                   ? at::autocast::get_autocast_dtype(c10::DeviceType::CUDA)
                                   : at::kFloat;
  const at::Tensor x = at::autocast::cached_cast(dtype, input, c10::DeviceType::CUDA);
  return group_norm(x, cast_param(weight, x.scalar_type()), cast_param(bias, x.scalar_type()), num_groups, eps,
                    activation);
}

}  // namespace

void set_autocast_half_output(bool enabled) { half_output.store(enabled); }

bool autocast_half_output() { return half_output.load(); }

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, AutocastCUDA, m) { m.impl("group_norm", &group_norm_autocast_cuda); }

}  // namespace gnflex
