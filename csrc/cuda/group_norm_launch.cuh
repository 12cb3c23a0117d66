// CUDA GroupNorm device code, part 5 of 5: the workspace and the launch
// sequence of the forward and backward ops on raw pointers (the op in
// group_norm_cuda.cu and the simulator test both call it).
#pragma once

#include "group_norm_apply.cuh"

namespace gnflex {
namespace cuda {

// Scratch memory of one call, carved from one buffer the caller allocates:
// per-(n, g) coefficients, the forward's chunk stats, the backward's
// residual sums and gradient partial sums (each its own region).
template <typename acc_t>
struct Workspace {
  static constexpr int64_t kAlign = 256;
  int64_t coefs_at = 0, stats_at = 0, residual_at = 0, grad_at = 0, group_grad_at = 0, bytes = 0;

  Workspace(const GroupNormShape& s, const Plan& plan) {
    const auto rounded = [](int64_t items, int64_t size) {
      return (std::max<int64_t>(1, items) * size + kAlign - 1) / kAlign * kAlign;
    };
    const int64_t chunks = plan.layout == Layout::ChannelsFirst
                               ? s.N * s.G * plan.run_parts
                               : s.N * plan.stat_rows.parts * plan.tiles * plan.group_slots;
    stats_at = rounded(s.N * s.G, sizeof(GroupCoefs<acc_t>));
    residual_at = stats_at + rounded(chunks, sizeof(ChunkStats<acc_t>));
    grad_at = residual_at + rounded(s.N * s.G * plan.residual_splits, sizeof(acc_t));
    group_grad_at = grad_at + rounded(s.N * s.C * grad_parts(plan), sizeof(Sum2<acc_t>));
    const int64_t group_grads =
        plan.layout == Layout::ChannelsFirst ? 0 : s.N * plan.grad_rows.parts * plan.tiles * plan.group_slots;
    bytes = group_grad_at + rounded(group_grads, sizeof(Sum2<acc_t>));
  }
  template <typename T>
  static T* at(void* base, int64_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
  }
  GroupCoefs<acc_t>* coefs(void* base) const { return at<GroupCoefs<acc_t>>(base, coefs_at); }
  ChunkStats<acc_t>* chunk_stats(void* base) const { return at<ChunkStats<acc_t>>(base, stats_at); }
  acc_t* residual_sums(void* base) const { return at<acc_t>(base, residual_at); }
  Sum2<acc_t>* grad_partial(void* base) const { return at<Sum2<acc_t>>(base, grad_at); }
  Sum2<acc_t>* group_grad_partial(void* base) const { return at<Sum2<acc_t>>(base, group_grad_at); }
};

// Channels-last picks its vector width from the pointers, so the workspace
// and the grid check cover both widths.
// Bytes of scratch memory launch_forward / launch_backward need.
template <typename scalar_t>
int64_t workspace_bytes(const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  int64_t bytes = 0;
  for (int vec : {1, PackTraits<scalar_t>::kSize}) {
    bytes = std::max(bytes, Workspace<acc_t>(s, make_plan<scalar_t>(s, layout, vec)).bytes);
  }
  return bytes;
}

inline dim3 grid_of(int64_t blocks) { return dim3(static_cast<unsigned int>(blocks)); }
inline int64_t warp_per_group_blocks(const GroupNormShape& s) { return ceil_div(s.N * s.G * 32, kThreads); }
// Blocks for `items` team work items with the plan's team (warp or block).
inline int64_t team_blocks(const Plan& plan, int64_t items) {
  return plan.warp_runs ? Team<32>::blocks(items) : Team<kThreads>::blocks(items);
}
inline int64_t stats_blocks(const GroupNormShape& s, const Plan& plan) {
  if (plan.layout == Layout::ChannelsLast) return s.N * plan.stat_rows.parts * plan.tiles;
  return team_blocks(plan, s.N * s.G * plan.run_parts);
}
inline int64_t residual_blocks(const GroupNormShape& s, const Plan& plan) {
  return team_blocks(plan, s.N * s.G * plan.residual_splits);
}
// Calls f(std::integral_constant<int, lanes>) for the plan's team size.
template <typename F>
void dispatch_team(const Plan& plan, F&& f) {
  if (plan.warp_runs) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, kThreads>{});
  }
}
inline int64_t output_blocks(const GroupNormShape& s, const Plan& plan, bool grad_sums = false) {
  if (plan.layout == Layout::ChannelsLast) return s.N * (grad_sums ? plan.grad_rows : plan.out_rows).parts * plan.tiles;
  return plan.planes_per_block > 0 ? ceil_div(s.N * s.C, plan.planes_per_block) : s.N * s.C * plan.plane.parts;
}

// The most blocks one launch uses (1-D grids allow up to 2^31 - 1).
template <typename scalar_t>
int64_t max_grid_blocks(const GroupNormShape& s, Layout layout) {
  int64_t most = 0;
  for (int vec : {1, PackTraits<scalar_t>::kSize}) {
    const Plan plan = make_plan<scalar_t>(s, layout, vec);
    most = std::max({most, stats_blocks(s, plan), output_blocks(s, plan) + ceil_div(s.C, 32), residual_blocks(s, plan),
                     warp_per_group_blocks(s)});
  }
  return most;
}

// Calls f(Width<V>) for the plan's channels-last vector width.
template <typename scalar_t, typename F>
void dispatch_width(const Plan& plan, F&& f) {
  constexpr int kV = PackTraits<scalar_t>::kSize;
  if (plan.vec == kV) {
    f(Width<kV>{});
  } else {
    f(Width<1>{});
  }
}

// The output launch: y or dx (when out != null) and the parameter gradients.
template <typename Op, typename scalar_t, typename acc_t>
void launch_apply(const scalar_t* x, const scalar_t* dy, scalar_t* out, const GroupNormShape& s, const Plan& plan,
                  const GroupSource<acc_t>& src, const acc_t* weight, const acc_t* bias, ParamGrads<acc_t> pg,
                  cudaStream_t stream) {
  const int64_t threads = plan.layout == Layout::ChannelsFirst ? kThreads : plan.block_threads;
  pg.first_block = out != nullptr ? output_blocks(s, plan) : 0;
  const int64_t blocks = pg.first_block + (pg.dweight != nullptr ? ceil_div(s.C, kParamChannels) : 0);
  if (blocks == 0) return;
  if (plan.layout == Layout::ChannelsFirst) {
    GNFLEX_LAUNCH(apply_cf_kernel<Op>, grid_of(blocks), threads, stream, x, dy, out, s, plan, src, weight, bias, pg);
  } else {
    dispatch_width<scalar_t>(plan, [&](auto width) {
      constexpr int V = decltype(width)::value;
      GNFLEX_LAUNCH((apply_cl_kernel<Op, V>), grid_of(blocks), threads, stream, x, dy, out, s, plan, src, weight, bias,
                    pg);
    });
  }
}

// y = act(GroupNorm(x)), mean and rstd (N * G). weight / bias may be null
// (1 / 0). workspace: workspace_bytes().
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_forward(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias, acc_t eps, Activation act,
                    const GroupNormShape& s, Layout layout, acc_t* mean, acc_t* rstd, void* workspace,
                    cudaStream_t stream) {
  if (s.N * s.C == 0 || s.HxW == 0) return;
  const Plan plan = make_plan<scalar_t>(s, layout, channels_last_vec<scalar_t>(s, {x, y}));
  const Workspace<acc_t> ws(s, plan);
  if (layout == Layout::ChannelsFirst) {
    dispatch_team(plan, [&](auto lanes) {
      GNFLEX_LAUNCH(chunk_stats_cf_kernel<decltype(lanes)::value>, grid_of(stats_blocks(s, plan)), kThreads, stream, x,
                    s, plan, ws.chunk_stats(workspace));
    });
  } else {
    dispatch_width<scalar_t>(plan, [&](auto width) {
      constexpr int V = decltype(width)::value;
      GNFLEX_LAUNCH((chunk_stats_cl_kernel<V>), grid_of(stats_blocks(s, plan)), plan.block_threads, stream, x, s, plan,
                    ws.chunk_stats(workspace));
    });
  }
  GNFLEX_LAUNCH(forward_finalize_kernel, grid_of(warp_per_group_blocks(s)), kThreads, stream, s, plan, eps,
                ws.chunk_stats(workspace), mean, rstd, ws.coefs(workspace));
  const GroupSource<acc_t> src{mean, rstd, ws.coefs(workspace)};
  dispatch_activation(act, [&](auto a) {
    launch_apply<ForwardOp<decltype(a)::value>>(x, x, y, s, plan, src, weight, bias, ParamGrads<acc_t>{}, stream);
  });
}

// dx (when not null), dweight and dbias (when not null). weight / bias may be
// null (1 / 0). workspace: workspace_bytes().
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_backward(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd, const acc_t* weight,
                     const acc_t* bias, Activation act, const GroupNormShape& s, Layout layout, scalar_t* dx,
                     acc_t* dweight, acc_t* dbias, void* workspace, cudaStream_t stream) {
  if (s.N * s.C == 0 || s.HxW == 0) return;
  const Plan plan = make_plan<scalar_t>(s, layout, channels_last_vec<scalar_t>(s, {x, dy, dx}));
  const Workspace<acc_t> ws(s, plan);
  dispatch_team(plan, [&](auto lanes) {
    GNFLEX_LAUNCH(residual_sums_kernel<decltype(lanes)::value>, grid_of(residual_blocks(s, plan)), kThreads, stream, x,
                  s, plan, mean, rstd, ws.residual_sums(workspace));
  });
  const GroupSource<acc_t> summed{
      mean, rstd, ws.coefs(workspace), ws.residual_sums(workspace), plan.residual_splits, s.group_size()};
  Sum2<acc_t>* partial = ws.grad_partial(workspace);
  dispatch_activation(act, [&](auto a) {
    using Op = GradSumsOp<decltype(a)::value>;
    if (layout == Layout::ChannelsFirst) {
      GNFLEX_LAUNCH(grad_sums_cf_kernel<Op>, grid_of(output_blocks(s, plan)), kThreads, stream, x, dy, s, plan, summed,
                    weight, bias, partial);
    } else {
      dispatch_width<scalar_t>(plan, [&](auto width) {
        constexpr int V = decltype(width)::value;
        GNFLEX_LAUNCH((grad_sums_cl_kernel<Op, V>), grid_of(output_blocks(s, plan, true)), plan.block_threads, stream,
                      x, dy, s, plan, summed, weight, bias, partial, ws.group_grad_partial(workspace));
      });
    }
  });
  GNFLEX_LAUNCH(backward_finalize_kernel, grid_of(warp_per_group_blocks(s)), kThreads, stream, s, plan, summed, weight,
                partial, ws.group_grad_partial(workspace), ws.coefs(workspace));
  const GroupSource<acc_t> src{mean, rstd, ws.coefs(workspace)};
  dispatch_activation(act, [&](auto a) {
    launch_apply<InputGradOp<decltype(a)::value>>(x, dy, dx, s, plan, src, weight, bias,
                                                  ParamGrads<acc_t>{partial, dweight, dbias}, stream);
  });
}

}  // namespace cuda
}  // namespace gnflex
