// CUDA GroupNorm device code, part 2 of 3: statistics. Exact per-chunk stats
// (a block's chunk: its mean first, then the sums of d = x - mean and d^2
// about it), the per-group merge, and the coefficients derived from them.
#pragma once

#include "group_norm_device.cuh"

namespace gnflex {
namespace cuda {

// Channels-first chunk stats: one block per (plane, part), two passes over
// the block's values (the second from registers). In the backward
// (mean != null) only blocks of groups that need their stats work; the test
// is uniform per block.
template <typename scalar_t, typename acc_t>
__global__ void chunk_stats_cf_kernel(const scalar_t* __restrict__ x, GroupNormShape s, PartPlan plan,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                      ChunkStats<acc_t>* __restrict__ partial) {
  const PlaneSpan span = plane_span(s, plan);
  const int64_t n = span.plane / s.C;
  const int64_t c = span.plane % s.C;
  const int64_t ng = n * s.G + c / s.channels_per_group();
  if (!block_broadcast(threadIdx.x == 0 && wants_stats(mean, rstd, ng))) return;  // uniform
  SpanValues<scalar_t, acc_t> values;
  values.load(x + span.offset, span.len);
  const acc_t sum = block_sum2(values.sums([](acc_t v) { return Sum2<acc_t>{v, acc_t(0)}; })).a;
  const acc_t center = block_broadcast(math::chunk_center(span.len, sum));
  const Sum2<acc_t> d = block_sum2(values.sums([center](acc_t v) {
    const acc_t dv = v - center;
    return Sum2<acc_t>{dv, dv * dv};
  }));
  if (threadIdx.x == 0) {
    const auto st = math::welford_from_centered_sums(span.len, center, d.a, d.b);
    gstore(partial + (n * plan.parts + span.part) * s.C + c, ChunkStats<acc_t>{st.center, st.offset, st.m2});
  }
}

// Channels-last chunk stats: one block per (n, part, channel tile), threads
// on channels; per channel the rows' mean, then the sums about it, from
// registers. In the backward only samples with a group that needs its stats
// work.
template <typename scalar_t, typename acc_t>
__global__ void chunk_stats_cl_kernel(const scalar_t* __restrict__ x, GroupNormShape s, PartPlan plan,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                      ChunkStats<acc_t>* __restrict__ partial) {
  __shared__ acc_t tile_a[kThreads];
  __shared__ acc_t tile_b[kThreads];
  __shared__ acc_t centers[kThreads];
  const RowSpan rows = row_span(s, plan);
  const int64_t n = rows.n;
  bool wanted = false;
  if (threadIdx.x == 0) {
    for (int64_t g = 0; g < s.G && !wanted; ++g) wanted = wants_stats(mean, rstd, n * s.G + g);
  }
  if (!block_broadcast(wanted)) return;  // uniform
  const RowTile t = row_tile(plan);
  const int64_t count = rows.row_end - rows.row_begin;
  const int64_t c = rows.c_begin + t.tx;
  // This thread's rows of channel c, in fixed register slots: a block has
  // span rows of tile_width channels, and span / height <= 25 for every
  // tile width make_plan picks (widths 32..256 in steps of 32).
  constexpr int kRowSlots = 32;
  acc_t values[kRowSlots];
  const bool active = c < s.C && t.ty < t.height;
#pragma unroll
  for (int it = 0; it < kRowSlots; ++it) {
    const int64_t r = rows.row_begin + t.ty + static_cast<int64_t>(it) * t.height;
    values[it] = active && r < rows.row_end ? static_cast<acc_t>(gload(x + (n * s.HxW + r) * s.C + c)) : acc_t(0);
  }
  // Sum of f(x) over this thread's rows.
  const auto thread_sums = [&](auto f) {
    Sum2<acc_t> sum{acc_t(0), acc_t(0)};
#pragma unroll
    for (int it = 0; it < kRowSlots; ++it) {
      if (active && rows.row_begin + t.ty + static_cast<int64_t>(it) * t.height < rows.row_end) {
        const Sum2<acc_t> v = f(values[it]);
        sum.a += v.a;
        sum.b += v.b;
      }
    }
    return sum;
  };
  // Column totals of the tile, in row order (valid for threads with ty == 0).
  const auto column_total = [&](const acc_t* tile) {
    acc_t total = tile[t.tx];
    for (int y = 1; y < t.height; ++y) total += tile[y * t.width + t.tx];
    return total;
  };
  tile_a[threadIdx.x] = thread_sums([](acc_t v) { return Sum2<acc_t>{v, acc_t(0)}; }).a;
  __syncthreads();
  if (t.ty == 0) centers[t.tx] = math::chunk_center(count, column_total(tile_a));
  __syncthreads();
  const acc_t center = centers[t.tx];
  const Sum2<acc_t> d = thread_sums([center](acc_t v) {
    const acc_t dv = v - center;
    return Sum2<acc_t>{dv, dv * dv};
  });
  tile_a[threadIdx.x] = d.a;  // the first pass's totals were read before the last barrier
  tile_b[threadIdx.x] = d.b;
  __syncthreads();
  if (t.ty == 0 && c < s.C) {
    const auto st =
        math::welford_from_centered_sums(count, center, column_total(tile_a), column_total(tile_b));
    gstore(partial + (n * plan.parts + rows.part) * s.C + c, ChunkStats<acc_t>{st.center, st.offset, st.m2});
  }
}

// Merges the Welford stats of the 32 lanes in a fixed tree; the result is
// valid in lane 0.
template <typename acc_t>
__device__ WelfordStats<acc_t> warp_welford_merge(WelfordStats<acc_t> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    WelfordStats<acc_t> other;
    other.count = __shfl_down_sync(0xffffffffu, s.count, offset);
    other.center = __shfl_down_sync(0xffffffffu, s.center, offset);
    other.offset = __shfl_down_sync(0xffffffffu, s.offset, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
    s = math::welford_combine(s, other);
  }
  return s;
}

// Stats of group ng in every lane of its warp: lane l merges the group's
// chunks l, l + 32, ... (over parts x channels) in order, then the lanes
// merge in a fixed tree and lane 0's result is broadcast.
template <typename acc_t>
__device__ WelfordStats<acc_t> group_stats(const GroupNormShape& s, const PartPlan& plan,
                                           const ChunkStats<acc_t>* partial, int64_t ng, int lane) {
  const int64_t n = ng / s.G;
  const int64_t Cg = s.channels_per_group();
  const int64_t c_begin = ng % s.G * Cg;
  WelfordStats<acc_t> stats;
  for (int64_t item = lane; item < plan.parts * Cg; item += 32) {
    const int64_t part = item / Cg;
    const ChunkStats<acc_t> p = gload(partial + (n * plan.parts + part) * s.C + c_begin + item % Cg);
    WelfordStats<acc_t> chunk;
    chunk.count = plan.count(part, s.HxW);
    chunk.center = p.center;
    chunk.offset = p.offset;
    chunk.m2 = p.m2;
    stats = math::welford_combine(stats, chunk);
  }
  stats = warp_welford_merge(stats);
  stats.count = __shfl_sync(0xffffffffu, stats.count, 0);
  stats.center = __shfl_sync(0xffffffffu, stats.center, 0);
  stats.offset = __shfl_sync(0xffffffffu, stats.offset, 0);
  stats.m2 = __shfl_sync(0xffffffffu, stats.m2, 0);
  return stats;
}

// The group's channels' pivot/scale/shift/residual, written by the lanes.
template <typename acc_t>
__device__ void write_affine_coefs(const GroupNormShape& s, int64_t ng, int lane, acc_t pivot,
                                   acc_t residual, acc_t r, const acc_t* weight, const acc_t* bias,
                                   ChannelCoefs<acc_t>* coefs) {
  const int64_t n = ng / s.G;
  const int64_t Cg = s.channels_per_group();
  const int64_t c_begin = ng % s.G * Cg;
  for (int64_t c = c_begin + lane; c < c_begin + Cg; c += 32) {
    const auto affine = math::fold_affine(residual, r, gload(weight + c), gload(bias + c));
    ChannelCoefs<acc_t>& k = coefs[n * s.C + c];
    gstore(&k.pivot, pivot);
    gstore(&k.scale, affine.scale);
    gstore(&k.shift, affine.shift);
    gstore(&k.residual, residual);
  }
}

// Forward: one warp per (n, g): mean, rstd and the channels' coefficients.
template <typename acc_t>
__global__ void forward_finalize_kernel(GroupNormShape s, PartPlan plan, acc_t eps,
                                        const ChunkStats<acc_t>* __restrict__ partial,
                                        const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                        ChannelCoefs<acc_t>* __restrict__ coefs, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ rstd) {
  const int64_t ng = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= s.N * s.G) return;  // uniform per warp
  const WelfordStats<acc_t> stats = group_stats(s, plan, partial, ng, lane);
  const acc_t pivot = math::rounded_mean(stats);
  const acc_t r = math::rstd_from_stats(stats, eps);
  if (lane == 0) {
    gstore(mean + ng, pivot);
    gstore(rstd + ng, r);
  }
  write_affine_coefs(s, ng, lane, pivot, math::mean_residual(stats, pivot), r, weight, bias, coefs);
}

// Backward: one warp per (n, g): the forward's coefficients about the saved
// mean, with the exact residual where the group's stats were recomputed.
template <typename acc_t>
__global__ void backward_coefs_kernel(GroupNormShape s, PartPlan plan,
                                      const ChunkStats<acc_t>* __restrict__ partial,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                      const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                      ChannelCoefs<acc_t>* __restrict__ coefs) {
  const int64_t ng = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= s.N * s.G) return;  // uniform per warp
  acc_t residual = acc_t(0);
  if (wants_stats(mean, rstd, ng)) {  // uniform per warp
    residual = math::mean_residual(group_stats(s, plan, partial, ng, lane), gload(mean + ng));
  }
  write_affine_coefs(s, ng, lane, gload(mean + ng), residual, gload(rstd + ng), weight, bias, coefs);
}

}  // namespace cuda
}  // namespace gnflex
