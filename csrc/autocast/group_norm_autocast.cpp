// Autocast policy for gnflex::group_norm, the same as torch's group_norm:
//   CUDA autocast (fp16/bf16): inputs cast to float32, so statistics and the
//     output are float32 (torch lists group_norm among its fp32 ops on CUDA).
//   CPU autocast: no cast (torch does not cast group_norm on CPU); a bf16 or
//     fp16 input keeps its dtype, float32 parameters are accepted, and the
//     kernels accumulate statistics in float32 anyway.
// group_norm_backward needs no policy: it runs on what the forward saved.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../group_norm_types.h"
#include "../gnflex_ops.h"

namespace gnflex {
namespace {

c10::optional<at::Tensor> cast_optional(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return at::autocast::cached_cast(at::kFloat, *t, c10::DeviceType::CUDA);
}

TensorTriple group_norm_autocast_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                      c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return group_norm(at::autocast::cached_cast(at::kFloat, input, c10::DeviceType::CUDA), cast_optional(weight),
                    cast_optional(bias), num_groups, eps, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, AutocastCUDA, m) { m.impl("group_norm", &group_norm_autocast_cuda); }

}  // namespace gnflex
