// CUDA GroupNorm ops: argument handling and allocation around the launches
// of group_norm_launch.cuh (kernels in group_norm_*.cuh, which the CPU
// simulator test in tests/cuda_sim/ runs unchanged), compiled per dtype in
// launches/*.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../group_norm_utils.h"
#include "group_norm_cuda_plan.h"
#include "group_norm_launch.cuh"

namespace gnflex {
namespace cuda {

GNFLEX_LAUNCHES(extern, float)
GNFLEX_LAUNCHES(extern, double)
GNFLEX_LAUNCHES(extern, c10::Half)
GNFLEX_LAUNCHES(extern, c10::BFloat16)

namespace {

void check_grid(const LaunchNeeds& needs) {
  TORCH_CHECK(needs.tickets <= std::numeric_limits<int32_t>::max(), "gnflex.group_norm (CUDA): input too large (",
              needs.tickets, " blocks needed)");
}

ParamType param_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return ParamType::Half;
    case at::kBFloat16:
      return ParamType::BFloat16;
    default:
      return ParamType::Acc;
  }
}

// An optional parameter as the kernels read it (null: 1 / 0), in its own dtype.
template <typename acc_t>
ChannelParam<acc_t> channel_param(const at::Tensor& t) {
  return t.defined() ? ChannelParam<acc_t>{t.const_data_ptr(), param_type(t), sample_stride(t)} : ChannelParam<acc_t>{};
}

// Per-stream state of the launches: the sequence words (zeroed once, left
// zeroed by every launch) and the scratch memory (never needs clearing). A
// launch queued on a stream runs after the previous one on that stream, so one
// buffer per (device, stream) serves all of them; a CUDA graph capture gets
// buffers of its own (per capture and stream) that only its replays use,
// since a graph may be replayed on any stream, concurrently with eager work.
// Buffers are kept for the life of the process (a captured graph may still
// point at a buffer that was outgrown).
class StreamState {
 public:
  struct Buffers {
    SequenceWords sw;
    void* scratch;
  };

  static Buffers get(const at::Tensor& like, int64_t domains, int64_t scratch_bytes, cudaStream_t stream) {
    static std::mutex mutex;
    static std::map<std::tuple<int, cudaStream_t, unsigned long long>, Entry> entries;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    unsigned long long capture_id = 0;
    C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture_id));
    if (status != cudaStreamCaptureStatusActive) capture_id = 0;
    std::lock_guard<std::mutex> lock(mutex);
    Entry& e = entries[{like.get_device(), stream, capture_id}];
    if (e.capacity < domains) {
      if (e.words.defined()) e.retired.push_back(e.words);
      e.capacity = std::max<int64_t>(domains, 2 * e.capacity);
      e.words = at::zeros({SequenceWords::size(e.capacity)}, like.options().dtype(at::kInt));
    }
    if (e.scratch_bytes < scratch_bytes) {
      if (e.scratch.defined()) e.retired.push_back(e.scratch);
      e.scratch_bytes = std::max<int64_t>(scratch_bytes, 2 * e.scratch_bytes);
      e.scratch = at::empty({e.scratch_bytes}, like.options().dtype(at::kByte));
    }
    return {SequenceWords{reinterpret_cast<unsigned*>(e.words.data_ptr<int>()), e.capacity}, e.scratch.data_ptr()};
  }

 private:
  struct Entry {
    at::Tensor words, scratch;
    int64_t capacity = 0, scratch_bytes = 0;
    std::vector<at::Tensor> retired;
  };
};

TensorTriple group_norm_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                             c10::string_view activation) {
  c10::cuda::CUDAGuard device_guard(input.device());
  ForwardTensors f = setup_forward(input, weight, bias, num_groups, eps, activation, ParamMode::Raw);
  const GroupNormShape& s = f.shape;
  if (s.N * s.C == 0) return {f.y, f.mean, f.rstd};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "gnflex_group_norm_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const LaunchNeeds needs = launch_needs<scalar_t>(s, f.layout);
    check_grid(needs);
    const auto buffers = StreamState::get(f.x, needs.domains, needs.workspace_bytes, stream);
    launch_forward<scalar_t>(f.x.const_data_ptr<scalar_t>(), f.y.data_ptr<scalar_t>(), channel_param<acc_t>(f.weight),
                             channel_param<acc_t>(f.bias), static_cast<acc_t>(eps), f.activation, s, f.layout,
                             f.mean.data_ptr<acc_t>(), f.rstd.data_ptr<acc_t>(), buffers.scratch, buffers.sw, stream);
  });
  return {f.y, f.mean, f.rstd};
}

TensorTriple group_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                      const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                      c10::string_view activation, std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard device_guard(input.device());
  BackwardTensors bs =
      setup_backward(grad_out, input, mean, rstd, weight, bias, num_groups, activation, output_mask, ParamMode::Raw);
  const GroupNormShape& s = bs.shape;
  if (s.N * s.C == 0) {  // no samples: zero parameter gradients
    bs.dweight.zero_();
    bs.dbias.zero_();
    return backward_result(bs, weight, input, output_mask);
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool param_grads = output_mask[1] || output_mask[2];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs.x.scalar_type(), "gnflex_group_norm_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const LaunchNeeds needs = launch_needs<scalar_t>(s, bs.layout);
    check_grid(needs);
    const auto buffers = StreamState::get(bs.x, needs.domains, needs.workspace_bytes, stream);
    const auto grad = [&](at::Tensor& t) {
      return param_grads ? ChannelGrad<acc_t>{t.data_ptr(), param_type(t), sample_stride(t)} : ChannelGrad<acc_t>{};
    };
    launch_backward<scalar_t>(bs.dy.const_data_ptr<scalar_t>(), bs.x.const_data_ptr<scalar_t>(),
                              bs.mean.const_data_ptr<acc_t>(), bs.rstd.const_data_ptr<acc_t>(),
                              channel_param<acc_t>(bs.weight), channel_param<acc_t>(bs.bias), bs.activation, s,
                              bs.layout, output_mask[0] ? bs.dx.data_ptr<scalar_t>() : nullptr, grad(bs.dweight),
                              grad(bs.dbias), buffers.scratch, buffers.sw, stream);
  });
  return backward_result(bs, weight, input, output_mask);
}

template <typename scalar_t>
PlanInfo plan_info_for(const GroupNormShape& s, Layout layout) {
  const Plan plan = make_plan<scalar_t>(s, layout, channels_last_vec<scalar_t>(s, {}));
  const int64_t bytes = s.numel() * static_cast<int64_t>(sizeof(scalar_t));
  const Schedule bwd = backward_schedule<scalar_t>(s, plan, true, true);
  if (plan.resident) return {"block", resident_blocks(s, plan), bwd.tickets, 1, 0};
  const Schedule fwd = forward_schedule<scalar_t>(s, plan);
  const int64_t reuse = reuse_bytes(fwd, bytes);
  return {rereads_from_dram(fwd, bytes) ? "dram" : "l2", fwd.tickets, bwd.tickets, fwd.stage[0].rounds(), reuse};
}

}  // namespace

PlanInfo plan_info(int64_t N, int64_t C, int64_t HxW, int64_t G, int64_t element_size, bool channels_last) {
  const GroupNormShape s{N, C, HxW, G};
  const Layout layout = channels_last ? Layout::ChannelsLast : Layout::ChannelsFirst;
  TORCH_CHECK(N >= 0 && C > 0 && HxW > 0 && G > 0 && C % G == 0, "gnflex.cuda_plan: invalid shape");
  switch (element_size) {
    case 2:
      return plan_info_for<c10::Half>(s, layout);
    case 4:
      return plan_info_for<float>(s, layout);
    case 8:
      return plan_info_for<double>(s, layout);
    default:
      TORCH_CHECK(false, "gnflex.cuda_plan: element_size must be 2, 4 or 8, got ", element_size);
  }
}

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace gnflex
