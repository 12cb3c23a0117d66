// CUDA GroupNorm device code, part 3 of 5: the backward's gradient sums per
// (n, c, part), the per-group dx coefficients, and dweight / dbias. Also the
// channels-first plane walk and the channels-last coefficient tables the
// output kernels (group_norm_apply.cuh) share.
#pragma once

#include "group_norm_stats.cuh"

namespace gnflex {
namespace cuda {

// ---- channels-first planes ---------------------------------------------------
// What a team of threads (the block, or a warp) works on: len values of
// plane `plane` from offset `offset`; the team's thread tid of nthreads.
struct PlaneWork {
  int64_t plane, part, offset, len;
  int tid, nthreads;
  bool warp;
};

// Calls f(work, coefs) for the current block's planes: one (plane, part) for
// the block, or, with small planes, a run of whole planes per warp. The
// team's leader loads the group values (kept while the group stays the same)
// and the channel's weight and bias, and broadcasts the coefficients.
template <typename Op, typename acc_t, typename F>
__device__ void for_each_plane(const GroupNormShape& s, const Plan& plan, const GroupSource<acc_t>& src,
                               const acc_t* weight, const acc_t* bias, F&& f) {
  constexpr bool kInputGrad = Op::kInputGrad;
  const int64_t Cg = s.channels_per_group();
  const auto coefs_of = [&](int64_t plane, ChannelCoefs<acc_t> group) {
    return channel_coefs<Op>(group, weight, bias, plane % s.C);
  };
  const auto ng_of = [&](int64_t plane) { return plane / s.C * s.G + plane % s.C / Cg; };
  if (plan.planes_per_block == 0) {
    const int64_t plane = blockIdx.x / plan.plane.parts, part = blockIdx.x % plan.plane.parts;
    ChannelCoefs<acc_t> k{};
    if (threadIdx.x == 0) k = coefs_of(plane, group_values<kInputGrad>(src, ng_of(plane)));
    k = block_broadcast(k);
    f(PlaneWork{plane, part, plane * s.HxW + part * plan.plane.rows, plan.plane.count(part, s.HxW),
                static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), false},
      k);
    return;
  }
  const int64_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t per_warp = (plan.planes_per_block + warps - 1) / warps;
  const int64_t first = blockIdx.x * plan.planes_per_block + threadIdx.x / 32 * per_warp;
  const int64_t last = std::min({first + per_warp, (blockIdx.x + 1) * plan.planes_per_block, s.N * s.C});
  int64_t cached_ng = -1;
  ChannelCoefs<acc_t> group{};
  for (int64_t plane = first; plane < last; ++plane) {  // uniform per warp
    ChannelCoefs<acc_t> k{};
    if (lane == 0) {
      if (ng_of(plane) != cached_ng) {
        cached_ng = ng_of(plane);
        group = group_values<kInputGrad>(src, cached_ng);
      }
      k = coefs_of(plane, group);
    }
    f(PlaneWork{plane, 0, plane * s.HxW, s.HxW, static_cast<int>(lane), 32, true}, warp_broadcast(k));
  }
}

// ---- channels-last coefficient tables ------------------------------------------
// Groups / channels one tile's table holds (kMaxTileChannels for a 4-byte
// accumulate type; the same bytes for float64).
template <typename acc_t>
constexpr int64_t kTileSlots = kMaxTileChannels * 4 / static_cast<int64_t>(sizeof(acc_t));

// Fills the block's table of its tile's channel coefficients: first the
// group values of the groups the tile touches, then each channel's scale
// and shift, each loaded once per block. Ends with a barrier.
template <typename Op, typename acc_t>
struct TileCoefs {
  static constexpr bool kInputGrad = Op::kInputGrad;
  ChannelCoefs<acc_t>* groups;  // [g - first group]
  Sum2<acc_t>* affine;          // [c - c_begin]: scale, shift

  __device__ static TileCoefs shared() {
    __shared__ ChannelCoefs<acc_t> group_table[kTileSlots<acc_t>];
    __shared__ Sum2<acc_t> affine_table[kTileSlots<acc_t>];
    return {group_table, affine_table};
  }

  __device__ void fill(const GroupNormShape& s, const RowBlock& b, const GroupSource<acc_t>& src, const acc_t* weight,
                       const acc_t* bias) const {
    const TileGroups tg = tile_groups(s, b.c_begin, b.c_end);
    const int64_t n = b.n, Cg = s.channels_per_group();
    for (int64_t g = tg.first + threadIdx.x; g <= tg.last; g += blockDim.x) {
      groups[g - tg.first] = group_values<kInputGrad>(src, n * s.G + g);
    }
    __syncthreads();
    for (int64_t c = b.c_begin + threadIdx.x; c < b.c_end; c += blockDim.x) {
      const ChannelCoefs<acc_t> k = channel_coefs<Op>(groups[c / Cg - tg.first], weight, bias, c);
      affine[c - b.c_begin] = Sum2<acc_t>{k.scale, k.shift};
    }
    __syncthreads();
  }

  // Channel c's coefficients (c in the tile).
  __device__ ChannelCoefs<acc_t> at(const GroupNormShape& s, const RowBlock& b, int64_t c) const {
    ChannelCoefs<acc_t> k = groups[c / s.channels_per_group() - b.c_begin / s.channels_per_group()];
    const Sum2<acc_t> a = affine[c - b.c_begin];
    k.scale = a.a;
    k.shift = a.b;
    return k;
  }
};

// ---- gradient sums ---------------------------------------------------------------
// Partial sums live at grad_index(n, c, part): per plane and part
// (channels-first), per row block and channel (channels-last).
__host__ __device__ __forceinline__ int64_t grad_parts(const Plan& plan) {
  return plan.layout == Layout::ChannelsFirst ? plan.plane.parts : plan.grad_rows.parts;
}
__host__ __device__ __forceinline__ int64_t grad_index(const GroupNormShape& s, const Plan& plan, int64_t n, int64_t c,
                                                       int64_t part) {
  return plan.layout == Layout::ChannelsFirst ? (n * s.C + c) * plan.plane.parts + part
                                              : (n * plan.grad_rows.parts + part) * s.C + c;
}

// Channel c's gradient sums of sample n over all parts, in part order.
template <typename acc_t>
__device__ Sum2<acc_t> channel_grad_total(const GroupNormShape& s, const Plan& plan, const Sum2<acc_t>* partial,
                                          int64_t n, int64_t c) {
  Sum2<acc_t> total{acc_t(0), acc_t(0)};
  for (int64_t part = 0; part < grad_parts(plan); ++part) {
    const Sum2<acc_t> p = gload(partial + grad_index(s, plan, n, c, part));
    total.a += p.a;
    total.b += p.b;
  }
  return total;
}

// Channels-first: per (plane, part) sums of g * (x - pivot) and g.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void grad_sums_cf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, GroupNormShape s,
                                    Plan plan, GroupSource<acc_t> src, const acc_t* __restrict__ weight,
                                    const acc_t* __restrict__ bias, Sum2<acc_t>* __restrict__ partial) {
  Sum2<acc_t> block_total{acc_t(0), acc_t(0)};
  int64_t block_slot = 0;
  for_each_plane<Op>(s, plan, src, weight, bias, [&](const PlaneWork& w, const ChannelCoefs<acc_t>& k) {
    const scalar_t* xs = x + w.offset;
    const scalar_t* dys = dy + w.offset;
    Sum2<acc_t> sum{acc_t(0), acc_t(0)};
    for_each_in_span(w.len, xs, misalignment(xs) == misalignment(dys), w.tid, w.nthreads, [&](int64_t i, auto width) {
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
    if (w.warp) {
      sum.a = warp_sum(sum.a);
      sum.b = warp_sum(sum.b);
      if (w.tid == 0) gstore(partial + w.plane, sum);
    } else {
      block_total = sum;
      block_slot = w.plane * plan.plane.parts + w.part;
    }
  });
  if (plan.planes_per_block == 0) {
    block_total = block_sum2(block_total);
    if (threadIdx.x == 0) gstore(partial + block_slot, block_total);
  }
}

// Channels-last: per (n, row block, c) sums; each thread owns vec channels,
// the threads of a channel merge in a fixed tree.
template <typename Op, int V, typename scalar_t, typename acc_t>
__global__ void grad_sums_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, GroupNormShape s,
                                    Plan plan, GroupSource<acc_t> src, const acc_t* __restrict__ weight,
                                    const acc_t* __restrict__ bias, Sum2<acc_t>* __restrict__ partial,
                                    Sum2<acc_t>* __restrict__ group_partial) {
  __shared__ Sum2<acc_t> sh_sums[kThreads * V];
  const RowBlock b = row_block(s, plan, plan.grad_rows);
  const RowThread t = row_thread(plan, b);
  const TileCoefs<Op, acc_t> table = TileCoefs<Op, acc_t>::shared();
  table.fill(s, b, src, weight, bias);
  Sum2<acc_t> sum[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sum[i] = Sum2<acc_t>{acc_t(0), acc_t(0)};
  if (t.active) {
    ChannelCoefs<acc_t> k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = table.at(s, b, t.c + i);
    for (int64_t r = b.row_begin + t.ty; r < b.row_end; r += plan.rows_per_pass) {
      const int64_t idx = (b.n * s.HxW + r) * s.C + t.c;
      acc_t xv[V], dv[V];
      load_values<V>(x + idx, xv);
      load_values<V>(dy + idx, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const Sum2<acc_t> v = Op::apply(xv[i], dv[i], k[i]);
        sum[i].a += v.a;
        sum[i].b += v.b;
      }
    }
  }
  const int64_t slot = threadIdx.x * V;
#pragma unroll
  for (int i = 0; i < V; ++i) sh_sums[slot + i] = sum[i];
  merge_rows_tree(plan, t, [&](int64_t other_thread) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sh_sums[slot + i].a += sh_sums[other_thread * V + i].a;
      sh_sums[slot + i].b += sh_sums[other_thread * V + i].b;
    }
  });
  if (t.active && t.ty == 0) {
#pragma unroll
    for (int i = 0; i < V; ++i) gstore(partial + grad_index(s, plan, b.n, t.c + i, b.part), sh_sums[slot + i]);
  }
  // Per group in the tile, a warp per group slot: sums of weight * the
  // channel totals (channel c's at slot c - c_begin), for the dx coefficients.
  const TileGroups tg = tile_groups(s, b.c_begin, b.c_end);
  const int64_t Cg = s.channels_per_group();
  const int lane = threadIdx.x % 32;
  for (int64_t g = tg.first + threadIdx.x / 32; g <= tg.last; g += blockDim.x / 32) {  // uniform per warp
    Sum2<acc_t> total{acc_t(0), acc_t(0)};
    for (int64_t c = std::max(b.c_begin, g * Cg) + lane; c < std::min(b.c_end, (g + 1) * Cg); c += 32) {
      const acc_t w = param_at(weight, c, acc_t(1));
      total.a += w * sh_sums[c - b.c_begin].a;
      total.b += w * sh_sums[c - b.c_begin].b;
    }
    total.a = warp_sum(total.a);
    total.b = warp_sum(total.b);
    if (lane == 0) {
      gstore(group_partial + group_slot_index(plan, plan.grad_rows, b.n, b.part, b.tile, g - tg.first), total);
    }
  }
}

// Backward: one warp per (n, g): the group's sums of weight * g * (x - pivot)
// and weight * g (channels-first: the lanes sum their channels' parts;
// channels-last: the per-group partials), then the dx coefficients (and the
// residual the output uses).
template <typename acc_t>
__global__ void backward_finalize_kernel(GroupNormShape s, Plan plan, GroupSource<acc_t> src,
                                         const acc_t* __restrict__ weight, const Sum2<acc_t>* __restrict__ partial,
                                         const Sum2<acc_t>* __restrict__ group_partial,
                                         GroupCoefs<acc_t>* __restrict__ coefs) {
  const int64_t ng = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= s.N * s.G) return;  // uniform per warp
  const int64_t n = ng / s.G, Cg = s.channels_per_group(), c_begin = ng % s.G * Cg;
  acc_t sum_gwx = acc_t(0), sum_gw = acc_t(0);
  if (plan.layout == Layout::ChannelsFirst) {
    for (int64_t c = c_begin + lane; c < c_begin + Cg; c += 32) {
      const Sum2<acc_t> total = channel_grad_total(s, plan, partial, n, c);
      const acc_t w = param_at(weight, c, acc_t(1));
      sum_gwx += w * total.a;
      sum_gw += w * total.b;
    }
  } else {
    for_each_group_slot(s, plan, plan.grad_rows, ng, lane, [&](int64_t index, int64_t, int64_t) {
      const Sum2<acc_t> p = gload(group_partial + index);
      sum_gwx += p.a;
      sum_gw += p.b;
    });
  }
  sum_gwx = warp_sum(sum_gwx);
  sum_gw = warp_sum(sum_gw);
  if (lane == 0) {
    const acc_t mean = gload(src.mean + ng), rstd = gload(src.rstd + ng);
    const acc_t residual = summed_residual(src, ng, mean, rstd);
    const auto dx = math::input_grad_coefs(sum_gwx, sum_gw, residual, rstd, s.group_size());
    gstore(coefs + ng, GroupCoefs<acc_t>{residual, dx.x_coef, dx.bias_coef});
  }
}

// dweight[c], dbias[c]: a block per 32 channels (a lane each); warp k sums
// samples k, k + warps, ... in order, then warp 0 adds the warps' sums in
// order (a fixed order: deterministic). Sample slices keep the serial chain
// short for large N (a thread per channel looping over every sample made
// this tail the longest part of the backward at N = 1024). Runs as the
// blocks from `first_block` on of the dx launch.
constexpr int kParamChannels = 32;

template <typename acc_t>
struct ParamGrads {
  const Sum2<acc_t>* partial = nullptr;
  acc_t* dweight = nullptr;  // null: no parameter gradients
  acc_t* dbias = nullptr;
  int64_t first_block = 0;
};

template <typename acc_t>
__device__ void param_grads_block(const GroupNormShape& s, const Plan& plan, const GroupSource<acc_t>& src,
                                  const ParamGrads<acc_t>& pg) {
  __shared__ Sum2<acc_t> sh_slice[kThreads / 32][kParamChannels];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32, slices = blockDim.x / 32;
  const int64_t c_first = (blockIdx.x - pg.first_block) * kParamChannels;
  const int64_t c = c_first + lane < s.C ? c_first + lane : s.C - 1;  // lanes past C repeat the last channel
  const int64_t Cg = s.channels_per_group(), g = c / Cg;
  // The lane that loads channel c's group values: its group's first lane.
  const int group_lane = static_cast<int>(std::max<int64_t>(0, g * Cg - c_first));
  acc_t dw = acc_t(0), db = acc_t(0);
#pragma unroll 4
  for (int64_t n = slice; n < s.N; n += slices) {  // uniform per warp
    const int64_t ng = n * s.G + g;
    Sum2<acc_t> group{acc_t(0), acc_t(0)};
    if (lane == group_lane) group = Sum2<acc_t>{gload(&src.coefs[ng].residual), gload(src.rstd + ng)};
    group.a = __shfl_sync(0xffffffffu, group.a, group_lane);
    group.b = __shfl_sync(0xffffffffu, group.b, group_lane);
    const Sum2<acc_t> total = channel_grad_total(s, plan, pg.partial, n, c);
    dw += math::weight_grad_term(total.a, total.b, group.a, group.b);
    db += total.b;
  }
  sh_slice[slice][lane] = Sum2<acc_t>{dw, db};
  __syncthreads();
  if (slice == 0 && c_first + lane < s.C) {
    for (int k = 1; k < slices; ++k) {
      dw += sh_slice[k][lane].a;
      db += sh_slice[k][lane].b;
    }
    gstore(pg.dweight + c, dw);
    gstore(pg.dbias + c, db);
  }
}

}  // namespace cuda
}  // namespace gnflex
