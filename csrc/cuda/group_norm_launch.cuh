// CUDA GroupNorm device code, part 3 of 3: gradient sums, elementwise
// kernels, and the launch sequence of the forward and backward ops on raw
// pointers (the op in group_norm_cuda.cu and the simulator test both call it).
#pragma once

#include "group_norm_stats.cuh"

namespace gnflex {
namespace cuda {

// Channels-first gradient sums: one block per (plane, part).
template <typename Op, typename scalar_t, typename acc_t>
__global__ void grad_sums_cf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                    GroupNormShape s, PartPlan plan,
                                    const ChannelCoefs<acc_t>* __restrict__ coefs,
                                    Sum2<acc_t>* __restrict__ partial) {
  const PlaneSpan span = plane_span(s, plan);
  const scalar_t* xs = x + span.offset;
  const scalar_t* dys = dy + span.offset;
  const ChannelCoefs<acc_t> k =
      block_broadcast(threadIdx.x == 0 ? load_coefs<false>(coefs + span.plane) : ChannelCoefs<acc_t>{});
  Sum2<acc_t> sum{acc_t(0), acc_t(0)};
  for_each_in_span(span.len, xs, misalignment(xs) == misalignment(dys), [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    acc_t xv[W], dv[W];
    load_values<W>(xs + i, xv);
    load_values<W>(dys + i, dv);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const Sum2<acc_t> t = Op::apply(xv[j], dv[j], k);
      sum.a += t.a;
      sum.b += t.b;
    }
  });
  sum = block_sum2(sum);
  if (threadIdx.x == 0) {
    const int64_t n = span.plane / s.C;
    const int64_t c = span.plane % s.C;
    gstore(partial + (n * plan.parts + span.part) * s.C + c, sum);
  }
}

// Channels-last gradient sums: one block per (n, part, channel tile); threads
// on channels.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void grad_sums_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                    GroupNormShape s, PartPlan plan,
                                    const ChannelCoefs<acc_t>* __restrict__ coefs,
                                    Sum2<acc_t>* __restrict__ partial) {
  __shared__ Sum2<acc_t> tile_sums[kThreads];
  const RowSpan rows = row_span(s, plan);
  const int64_t n = rows.n;
  const RowTile t = row_tile(plan);
  const int64_t c = rows.c_begin + t.tx;
  Sum2<acc_t> sum{acc_t(0), acc_t(0)};
  if (c < s.C && t.ty < t.height) {
    const ChannelCoefs<acc_t> k = load_coefs<false>(coefs + n * s.C + c);
    for (int64_t r = rows.row_begin + t.ty; r < rows.row_end; r += t.height) {
      const int64_t idx = (n * s.HxW + r) * s.C + c;
      const Sum2<acc_t> v = Op::apply(static_cast<acc_t>(gload(x + idx)), static_cast<acc_t>(gload(dy + idx)), k);
      sum.a += v.a;
      sum.b += v.b;
    }
  }
  tile_sums[threadIdx.x] = sum;
  __syncthreads();
  if (t.ty == 0 && c < s.C) {
    Sum2<acc_t> total = tile_sums[t.tx];
    for (int y = 1; y < t.height; ++y) {
      total.a += tile_sums[y * t.width + t.tx].a;
      total.b += tile_sums[y * t.width + t.tx].b;
    }
    gstore(partial + (n * plan.parts + rows.part) * s.C + c, total);
  }
}

// Channels-first elementwise output: one block per (plane, part).
template <typename Op, typename scalar_t, typename acc_t>
__global__ void apply_cf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                scalar_t* __restrict__ out, GroupNormShape s, PartPlan plan,
                                const ChannelCoefs<acc_t>* __restrict__ coefs) {
  const PlaneSpan span = plane_span(s, plan);
  const scalar_t* xs = x + span.offset;
  const scalar_t* dys = Op::kUsesGrad ? dy + span.offset : xs;
  scalar_t* os = out + span.offset;
  const ChannelCoefs<acc_t> k = block_broadcast(
      threadIdx.x == 0 ? load_coefs<Op::kUsesGrad>(coefs + span.plane) : ChannelCoefs<acc_t>{});
  const bool aligned = misalignment(xs) == misalignment(dys) && misalignment(xs) == misalignment(os);
  for_each_in_span(span.len, xs, aligned, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    acc_t xv[W], dv[W];
    load_values<W>(xs + i, xv);
    if constexpr (Op::kUsesGrad) {
      load_values<W>(dys + i, dv);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) xv[j] = Op::apply(xv[j], Op::kUsesGrad ? dv[j] : acc_t(0), k);
    store_values<W>(os + i, xv);
  });
}

// Channels-last elementwise output: one block per (n, part, channel tile);
// threads on channels.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void apply_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                scalar_t* __restrict__ out, GroupNormShape s, PartPlan plan,
                                const ChannelCoefs<acc_t>* __restrict__ coefs) {
  const RowSpan rows = row_span(s, plan);
  const int64_t n = rows.n;
  const RowTile t = row_tile(plan);
  const int64_t c = rows.c_begin + t.tx;
  if (t.ty >= t.height || c >= s.C) return;
  const ChannelCoefs<acc_t> k = load_coefs<Op::kUsesGrad>(coefs + n * s.C + c);
  for (int64_t r = rows.row_begin + t.ty; r < rows.row_end; r += t.height) {
    const int64_t idx = (n * s.HxW + r) * s.C + c;
    const acc_t dv = Op::kUsesGrad ? static_cast<acc_t>(gload(dy + idx)) : acc_t(0);
    gstore(out + idx, static_cast<scalar_t>(Op::apply(static_cast<acc_t>(gload(x + idx)), dv, k)));
  }
}

// Backward: one warp per (n, g). Per channel the lanes sum the parts (kept
// for the parameter gradients); then the group's dx coefficients.
template <typename acc_t>
__global__ void backward_finalize_kernel(GroupNormShape s, PartPlan plan,
                                         const Sum2<acc_t>* __restrict__ partial,
                                         const acc_t* __restrict__ rstd, const acc_t* __restrict__ weight,
                                         ChannelCoefs<acc_t>* __restrict__ coefs,
                                         Sum2<acc_t>* __restrict__ channel_sums) {
  const int64_t ng = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= s.N * s.G) return;  // uniform per warp
  const int64_t n = ng / s.G;
  const int64_t Cg = s.channels_per_group();
  const int64_t c_begin = ng % s.G * Cg;
  acc_t sum_gwx = acc_t(0), sum_gw = acc_t(0);  // meaningful in lane 0
  for (int64_t c = c_begin; c < c_begin + Cg; ++c) {
    Sum2<acc_t> total{acc_t(0), acc_t(0)};
    for (int64_t part = lane; part < plan.parts; part += 32) {
      const Sum2<acc_t> p = gload(partial + (n * plan.parts + part) * s.C + c);
      total.a += p.a;
      total.b += p.b;
    }
    total.a = warp_sum(total.a);
    total.b = warp_sum(total.b);
    if (lane == 0) {
      gstore(channel_sums + n * s.C + c, total);
      const acc_t w = gload(weight + c);
      sum_gwx += w * total.a;
      sum_gw += w * total.b;
    }
  }
  const acc_t r = gload(rstd + ng);
  const acc_t residual = gload(&coefs[n * s.C + c_begin].residual);
  auto dx = math::input_grad_coefs(sum_gwx, sum_gw, residual, r, s.group_size());
  dx.x_coef = __shfl_sync(0xffffffffu, dx.x_coef, 0);
  dx.bias_coef = __shfl_sync(0xffffffffu, dx.bias_coef, 0);
  for (int64_t c = c_begin + lane; c < c_begin + Cg; c += 32) {
    gstore(&coefs[n * s.C + c].g_coef, r * gload(weight + c));
    gstore(&coefs[n * s.C + c].x_coef, dx.x_coef);
    gstore(&coefs[n * s.C + c].bias_coef, dx.bias_coef);
  }
}

// dweight[c], dbias[c]: one thread per channel sums over samples in order.
template <typename acc_t>
__global__ void param_grad_kernel(GroupNormShape s, const Sum2<acc_t>* __restrict__ channel_sums,
                                  const acc_t* __restrict__ rstd,
                                  const ChannelCoefs<acc_t>* __restrict__ coefs,
                                  acc_t* __restrict__ dweight, acc_t* __restrict__ dbias) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= s.C) return;
  const int64_t g = c / s.channels_per_group();
  acc_t dw = acc_t(0), db = acc_t(0);
  for (int64_t n = 0; n < s.N; ++n) {
    const Sum2<acc_t> sums = gload(channel_sums + n * s.C + c);
    dw += math::weight_grad_term(sums.a, sums.b, gload(&coefs[n * s.C + c].residual), gload(rstd + n * s.G + g));
    db += sums.b;
  }
  gstore(dweight + c, dw);
  gstore(dbias + c, db);
}

// ---- launch sequence ---------------------------------------------------------
// Scratch memory of one call, carved from one buffer the caller allocates:
// per-(n, c) coefficients, per-(n, part, c) partial results (chunk stats,
// then gradient sums) and per-(n, c) gradient sums.
template <typename acc_t>
struct Workspace {
  static constexpr int64_t kAlign = 256;
  int64_t coefs_at = 0, partial_at = 0, sums_at = 0, bytes = 0;

  Workspace(const GroupNormShape& s, const PartPlan& plan) {
    static_assert(sizeof(ChunkStats<acc_t>) >= sizeof(Sum2<acc_t>), "partial slots hold either");
    const auto rounded = [](int64_t b) { return (b + kAlign - 1) / kAlign * kAlign; };
    partial_at = rounded(s.N * s.C * static_cast<int64_t>(sizeof(ChannelCoefs<acc_t>)));
    sums_at = partial_at +
              rounded(std::max<int64_t>(1, s.N * plan.parts * s.C) * static_cast<int64_t>(sizeof(ChunkStats<acc_t>)));
    bytes = sums_at + rounded(s.N * s.C * static_cast<int64_t>(sizeof(Sum2<acc_t>)));
  }
  template <typename T>
  static T* at(void* base, int64_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
  }
  ChannelCoefs<acc_t>* coefs(void* base) const { return at<ChannelCoefs<acc_t>>(base, coefs_at); }
  ChunkStats<acc_t>* chunk_stats(void* base) const { return at<ChunkStats<acc_t>>(base, partial_at); }
  Sum2<acc_t>* grad_partial(void* base) const { return at<Sum2<acc_t>>(base, partial_at); }
  Sum2<acc_t>* channel_sums(void* base) const { return at<Sum2<acc_t>>(base, sums_at); }
};

// Bytes of scratch memory launch_forward / launch_backward need.
template <typename scalar_t>
int64_t workspace_bytes(const GroupNormShape& s, Layout layout) {
  return Workspace<acc_type<scalar_t>>(s, make_plan(s, layout)).bytes;
}

// The most blocks one launch uses (1-D grids allow up to 2^31 - 1).
inline int64_t max_grid_blocks(const GroupNormShape& s, Layout layout) {
  const PartPlan plan = make_plan(s, layout);
  const int64_t per_part =
      layout == Layout::ChannelsFirst ? s.N * s.C * plan.parts : s.N * plan.parts * plan.tiles;
  const int64_t per_warp_group = (s.N * s.G * 32 + kThreads - 1) / kThreads;
  return std::max(per_part, per_warp_group);
}

inline dim3 grid_of(int64_t blocks) { return dim3(static_cast<unsigned int>(blocks)); }
// Grid with one thread per item.
inline dim3 grid_for_items(int64_t items) { return grid_of((items + kThreads - 1) / kThreads); }
inline dim3 grid_of_parts(const GroupNormShape& s, Layout layout, const PartPlan& plan) {
  return grid_of(layout == Layout::ChannelsFirst ? s.N * s.C * plan.parts : s.N * plan.parts * plan.tiles);
}

template <typename scalar_t, typename acc_t>
void launch_chunk_stats(const scalar_t* x, const GroupNormShape& s, Layout layout, const PartPlan& plan,
                        const acc_t* mean, const acc_t* rstd, ChunkStats<acc_t>* partial,
                        cudaStream_t stream) {
  if (layout == Layout::ChannelsFirst) {
    GNFLEX_LAUNCH(chunk_stats_cf_kernel, grid_of_parts(s, layout, plan), kThreads, stream, x, s, plan,
                  mean, rstd, partial);
  } else {
    GNFLEX_LAUNCH(chunk_stats_cl_kernel, grid_of_parts(s, layout, plan), kThreads, stream, x, s, plan,
                  mean, rstd, partial);
  }
}

template <typename Op, typename scalar_t, typename acc_t>
void launch_apply(const scalar_t* x, const scalar_t* dy, scalar_t* out, const GroupNormShape& s,
                  Layout layout, const PartPlan& plan, const ChannelCoefs<acc_t>* coefs,
                  cudaStream_t stream) {
  if (layout == Layout::ChannelsFirst) {
    GNFLEX_LAUNCH(apply_cf_kernel<Op>, grid_of_parts(s, layout, plan), kThreads, stream, x, dy, out, s,
                  plan, coefs);
  } else {
    GNFLEX_LAUNCH(apply_cl_kernel<Op>, grid_of_parts(s, layout, plan), kThreads, stream, x, dy, out, s,
                  plan, coefs);
  }
}

// y = act(GroupNorm(x)), mean and rstd (N * G). workspace: workspace_bytes().
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_forward(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias, acc_t eps,
                    Activation act, const GroupNormShape& s, Layout layout, acc_t* mean, acc_t* rstd,
                    void* workspace, cudaStream_t stream) {
  const PartPlan plan = make_plan(s, layout);
  if (plan.parts == 0 || s.N * s.C == 0) return;
  const Workspace<acc_t> ws(s, plan);
  ChannelCoefs<acc_t>* coefs = ws.coefs(workspace);
  launch_chunk_stats(x, s, layout, plan, static_cast<const acc_t*>(nullptr),
                     static_cast<const acc_t*>(nullptr), ws.chunk_stats(workspace), stream);
  GNFLEX_LAUNCH(forward_finalize_kernel, grid_for_items(s.N * s.G * 32), kThreads, stream, s, plan, eps,
                ws.chunk_stats(workspace), weight, bias, coefs, mean, rstd);
  dispatch_activation(act, [&](auto a) {
    launch_apply<ForwardOp<decltype(a)::value>>(x, x, y, s, layout, plan, coefs, stream);
  });
}

// dx (when not null), dweight and dbias (when not null). workspace: workspace_bytes().
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_backward(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd,
                     const acc_t* weight, const acc_t* bias, Activation act, const GroupNormShape& s,
                     Layout layout, scalar_t* dx, acc_t* dweight, acc_t* dbias, void* workspace,
                     cudaStream_t stream) {
  const PartPlan plan = make_plan(s, layout);
  if (plan.parts == 0 || s.N * s.C == 0) return;
  const Workspace<acc_t> ws(s, plan);
  ChannelCoefs<acc_t>* coefs = ws.coefs(workspace);
  launch_chunk_stats(x, s, layout, plan, mean, rstd, ws.chunk_stats(workspace), stream);
  GNFLEX_LAUNCH(backward_coefs_kernel, grid_for_items(s.N * s.G * 32), kThreads, stream, s, plan,
                ws.chunk_stats(workspace), mean, rstd, weight, bias, coefs);
  Sum2<acc_t>* partial = ws.grad_partial(workspace);
  dispatch_activation(act, [&](auto a) {
    using Op = GradSumsOp<decltype(a)::value>;
    if (layout == Layout::ChannelsFirst) {
      GNFLEX_LAUNCH(grad_sums_cf_kernel<Op>, grid_of_parts(s, layout, plan), kThreads, stream, x, dy, s,
                    plan, coefs, partial);
    } else {
      GNFLEX_LAUNCH(grad_sums_cl_kernel<Op>, grid_of_parts(s, layout, plan), kThreads, stream, x, dy, s,
                    plan, coefs, partial);
    }
  });
  GNFLEX_LAUNCH(backward_finalize_kernel, grid_for_items(s.N * s.G * 32), kThreads, stream, s, plan,
                partial, rstd, weight, coefs, ws.channel_sums(workspace));
  if (dweight != nullptr) {
    GNFLEX_LAUNCH(param_grad_kernel, grid_for_items(s.C), kThreads, stream, s, ws.channel_sums(workspace),
                  rstd, coefs, dweight, dbias);
  }
  if (dx != nullptr) {
    dispatch_activation(act, [&](auto a) {
      launch_apply<InputGradOp<decltype(a)::value>>(x, dy, dx, s, layout, plan, coefs, stream);
    });
  }
}

}  // namespace cuda
}  // namespace gnflex
