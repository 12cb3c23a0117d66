// CUDA GroupNorm device code: the backward's gradient sums per
// (n, c, part); the block that completes a domain computes its groups' dx
// coefficients; dweight / dbias. Also the channels-first plane walk and the
// channels-last coefficient tables the output phases (group_norm_apply.cuh)
// share.
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

// Calls f(work, coefs) for work block `block`'s planes: one (plane, part) for
// the block, or, with small planes, a run of whole planes per warp. The
// team's leader loads the group values (kept while the group stays the same)
// and the channel's weight and bias, and broadcasts the coefficients.
template <typename Op, typename acc_t, typename F>
__device__ void for_each_plane(const GroupNormShape& s, const Plan& plan, int64_t block, const GroupSource<acc_t>& src,
                               const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias, F&& f) {
  constexpr bool kInputGrad = Op::kInputGrad;
  const int64_t Cg = s.channels_per_group();
  const auto coefs_of = [&](int64_t plane, const GroupValues<acc_t>& group) {
    return channel_coefs<Op>(group, weight, bias, plane / s.C, plane % s.C);
  };
  const auto ng_of = [&](int64_t plane) { return plane / s.C * s.G + plane % s.C / Cg; };
  if (plan.planes_per_block == 0) {
    const int64_t plane = block / plan.plane.parts, part = block % plan.plane.parts;
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
  const int64_t first = block * plan.planes_per_block + threadIdx.x / 32 * per_warp;
  const int64_t last = std::min({first + per_warp, (block + 1) * plan.planes_per_block, s.N * s.C});
  int64_t cached_ng = -1;
  GroupValues<acc_t> group{};
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

// The groups (domains) channels-first work block `block` of a plane phase
// touches: [first, last].
struct DomainRange {
  int64_t first, last;
};
__device__ __forceinline__ DomainRange plane_block_domains(const GroupNormShape& s, const Plan& plan, int64_t block) {
  const int64_t Cg = s.channels_per_group();
  if (plan.planes_per_block == 0) {
    const int64_t ng = block / plan.plane.parts / Cg;
    return {ng, ng};
  }
  const int64_t first = block * plan.planes_per_block;
  const int64_t last = std::min((block + 1) * plan.planes_per_block, s.N * s.C) - 1;
  return {first / Cg, last / Cg};
}
// The work blocks of a plane phase that touch group ng.
__device__ __forceinline__ int64_t plane_blocks_of_group(const GroupNormShape& s, const Plan& plan, int64_t ng) {
  const int64_t Cg = s.channels_per_group();
  if (plan.planes_per_block == 0) return Cg * plan.plane.parts;
  return ((ng + 1) * Cg - 1) / plan.planes_per_block - ng * Cg / plan.planes_per_block + 1;
}

// Thread 0 waits until domains [first, last] are ready at `level`; then the
// whole block goes on.
__device__ __forceinline__ void wait_domains(const SequenceWords& sw, int level, int64_t first, int64_t last,
                                             Epoch epoch) {
  if (threadIdx.x == 0) {
    for (int64_t d = first; d <= last; ++d) wait_ready(sw.ready(level, d), epoch);
  }
  __syncthreads();
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
  GroupValues<acc_t>* groups;  // [g - first group]
  ScaleShift<acc_t>* affine;   // [c - c_begin]

  static constexpr int64_t kArenaBytes = kTileSlots<acc_t> * (sizeof(GroupValues<acc_t>) + sizeof(ScaleShift<acc_t>));
  // The tables in a block's shared arena of at least kArenaBytes.
  __device__ static TileCoefs in(unsigned char* arena) {
    GroupValues<acc_t>* groups = reinterpret_cast<GroupValues<acc_t>*>(arena);
    return {groups, reinterpret_cast<ScaleShift<acc_t>*>(groups + kTileSlots<acc_t>)};
  }

  __device__ void fill(const GroupNormShape& s, const RowBlock& b, const GroupSource<acc_t>& src,
                       const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias) const {
    const TileGroups tg = tile_groups(s, b.c_begin, b.c_end);
    const int64_t n = b.n, Cg = s.channels_per_group();
    for (int64_t g = tg.first + threadIdx.x; g <= tg.last; g += blockDim.x) {
      groups[g - tg.first] = group_values<kInputGrad>(src, n * s.G + g);
    }
    __syncthreads();
    for (int64_t c = b.c_begin + threadIdx.x; c < b.c_end; c += blockDim.x) {
      const ChannelCoefs<acc_t> k = channel_coefs<Op>(groups[c / Cg - tg.first], weight, bias, n, c);
      affine[c - b.c_begin] = ScaleShift<acc_t>{k.scale, k.shift};
    }
    __syncthreads();
  }

  // Channel c's coefficients (c in the tile).
  __device__ ChannelCoefs<acc_t> at(const GroupNormShape& s, const RowBlock& b, int64_t c) const {
    const GroupValues<acc_t>& group = groups[c / s.channels_per_group() - b.c_begin / s.channels_per_group()];
    const ScaleShift<acc_t> a = affine[c - b.c_begin];
    return {group.pivot, a.scale, a.shift, group.x_coef, group.bias_coef};
  }
};

// ---- gradient sums ---------------------------------------------------------------
// Per-channel partial sums (a: of g * (x - pivot), b: of g), `parts` per (n, c): at (n * C + c) * parts + part
// channels-first, (n * parts + part) * C + c channels-last.
template <typename acc_t>
struct ChannelSums {
  Sum2<acc_t>* data;
  int64_t parts;
  Layout layout;
  __host__ __device__ int64_t index(const GroupNormShape& s, int64_t n, int64_t c, int64_t part) const {
    return layout == Layout::ChannelsFirst ? (n * s.C + c) * parts + part : (n * parts + part) * s.C + c;
  }
};

// Parts of the gradient-sum blocks' per-channel sums: planes' parts
// (channels-first), row blocks (channels-last).
__host__ __device__ __forceinline__ int64_t grad_parts(const Plan& plan) {
  return plan.layout == Layout::ChannelsFirst ? plan.plane.parts : plan.grad_rows.parts;
}

// Where the backward's gradient sums go: per-channel partials (and, channels-
// last, per-group partials, per work block and per band of them), the dx
// coefficients, and the sequence words that say when a domain's
// coefficients are ready (level 1).
template <typename acc_t>
struct GradOut {
  ChannelSums<acc_t> partial;  // per work block
  Sum2<acc_t>* group_partial;  // channels-last: per (n, part, tile, group slot)
  ChannelSums<acc_t> band;     // channels-last two-level merges: per (n, band, c)
  Sum2<acc_t>* band_group;     // and per (n, band, g)
  GroupCoefs<acc_t>* coefs;
  SequenceWords sw;
  Epoch epoch;
};

// Lane-partial sums (lane l: items l, l + 32, ... in order) of channels-
// last group ng's per-group partials over row parts `parts`.
template <typename acc_t>
__device__ Sum2<acc_t> slot_sums(const GroupNormShape& s, const Plan& plan, const Sum2<acc_t>* group_partial,
                                 const PartRange& parts, int64_t ng, int lane) {
  Sum2<acc_t> t{acc_t(0), acc_t(0)};
  for_each_group_slot(s, plan, plan.grad_rows, parts, ng, lane, [&](int64_t index, int64_t, int64_t) {
    const Sum2<acc_t> p = gload_l2(group_partial + index);
    t.a += p.a;
    t.b += p.b;
  });
  return t;
}

// Band k of sample n: each group's and each channel's partial sums of the
// band's row parts added into one, in part order.
template <typename acc_t>
__device__ void merge_grad_band(const GroupNormShape& s, const Plan& plan, const GradOut<acc_t>& out, int64_t n,
                                int64_t k, int lane) {
  const PartRange parts = band_part_range(plan.grad_rows, plan.grad_bands, k);
  for (int64_t g = threadIdx.x / 32; g < s.G; g += blockDim.x / 32) {  // uniform per warp
    Sum2<acc_t> t = slot_sums(s, plan, out.group_partial, parts, n * s.G + g, lane);
    t.a = warp_sum(t.a);
    t.b = warp_sum(t.b);
    if (lane == 0) gstore(out.band_group + band_index<Layout::ChannelsLast>(s, plan.grad_bands, n * s.G + g, k), t);
  }
  for (int64_t c = threadIdx.x; c < s.C; c += blockDim.x) {
    Sum2<acc_t> t{acc_t(0), acc_t(0)};
    for (int64_t part = parts.first; part < parts.first + parts.count; ++part) {
      const Sum2<acc_t> p = gload_l2(out.partial.data + out.partial.index(s, n, c, part));
      t.a += p.a;
      t.b += p.b;
    }
    gstore(out.band.data + out.band.index(s, n, c, k), t);
  }
}

// Group ng's dx coefficients from its gradient sums, by one warp (lane 0
// writes): the sums of weight * g * (x - pivot) and weight * g
// (channels-first: the lanes sum their channels' parts; channels-last: the
// per-group partials), then the coefficients (and the residual dx uses).
template <typename acc_t>
__device__ void finalize_grad_group(const GroupNormShape& s, const Plan& plan, const GroupSource<acc_t>& src,
                                    const ChannelParam<acc_t>& weight, const GradOut<acc_t>& out, int64_t ng,
                                    int lane) {
  const int64_t n = ng / s.G, Cg = s.channels_per_group(), c_begin = ng % s.G * Cg;
  acc_t sum_gwx = acc_t(0), sum_gw = acc_t(0);
  if (plan.layout == Layout::ChannelsFirst) {
    // The group's (channel, part) sums are contiguous: lanes take every
    // 32nd, so no lane adds a channel's parts in a serial chain.
    const int64_t parts = out.partial.parts;
    const Sum2<acc_t>* sums = out.partial.data + out.partial.index(s, n, c_begin, 0);
    for (int64_t item = lane; item < Cg * parts; item += 32) {
      const Sum2<acc_t> p = gload_l2(sums + item);
      const acc_t w = weight.at(n, c_begin + item / parts, acc_t(1));
      sum_gwx += w * p.a;
      sum_gw += w * p.b;
    }
  } else if (plan.grad_bands.parts == 1) {
    const Sum2<acc_t> t = slot_sums(s, plan, out.group_partial, PartRange{0, plan.grad_rows.parts}, ng, lane);
    sum_gwx = t.a;
    sum_gw = t.b;
  } else {
    for (int64_t k = lane; k < plan.grad_bands.parts; k += 32) {
      const Sum2<acc_t> p = gload_l2(out.band_group + band_index<Layout::ChannelsLast>(s, plan.grad_bands, ng, k));
      sum_gwx += p.a;
      sum_gw += p.b;
    }
  }
  sum_gwx = warp_sum(sum_gwx);
  sum_gw = warp_sum(sum_gw);
  if (lane == 0) {
    const acc_t mean = gload(src.mean + ng), rstd = gload(src.rstd + ng);
    const acc_t residual = summed_residual(src, ng, mean, rstd);
    const auto dx = math::input_grad_coefs(sum_gwx, sum_gw, residual, rstd, s.group_size());
    gstore(out.coefs + ng, GroupCoefs<acc_t>{residual, dx.x_coef, dx.bias_coef});
  }
}

// Channels-first: per (plane, part) sums of g * (x - pivot) and g. Waits for
// the residuals of its groups (level 0); each warp then counts the block's
// arrival at some of them, and a warp that completes a group finalizes it.
template <typename Op, typename scalar_t, typename acc_t>
__device__ void grad_sums_cf(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const GroupNormShape& s,
                             const Plan& plan, int64_t block, const GroupSource<acc_t>& src,
                             const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias,
                             const GradOut<acc_t>& out) {
  const DomainRange domains = plane_block_domains(s, plan, block);
  wait_domains(out.sw, 0, domains.first, domains.last, out.epoch);
  Sum2<acc_t> block_total{acc_t(0), acc_t(0)};
  int64_t block_slot = 0;
  for_each_plane<Op>(s, plan, block, src, weight, bias, [&](const PlaneWork& w, const ChannelCoefs<acc_t>& k) {
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
      if (w.tid == 0) gstore(out.partial.data + w.plane, sum);
    } else {
      block_total = sum;
      block_slot = w.plane * plan.plane.parts + w.part;
    }
  });
  if (plan.planes_per_block == 0) {
    block_total = block_sum2(block_total);
    if (threadIdx.x == 0) gstore(out.partial.data + block_slot, block_total);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int64_t ng = domains.first + threadIdx.x / 32; ng <= domains.last; ng += blockDim.x / 32) {  // per warp
    if (!warp_arrive(out.sw.arrivals(1, ng), plane_blocks_of_group(s, plan, ng))) continue;
    finalize_grad_group(s, plan, src, weight, out, ng, lane);
    if (lane == 0) {
      publish(out.sw.ready(1, ng), out.epoch);
      atomicAdd(out.sw.finished(), 1u);
    }
  }
}

template <int V, typename acc_t>
constexpr int64_t kGradClArena =
    kThreads * V * sizeof(Sum2<acc_t>) + TileCoefs<GradSumsOp<Activation::None>, acc_t>::kArenaBytes;

// Channels-last: per (n, row block, c) sums; each thread owns vec channels,
// the threads of a channel merge in a fixed tree. Waits for the residuals of
// the tile's groups; the block that completes sample n finalizes its groups.
template <typename Op, int V, typename scalar_t, typename acc_t>
__device__ void grad_sums_cl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const GroupNormShape& s,
                             const Plan& plan, int64_t block, const GroupSource<acc_t>& src,
                             const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias,
                             const GradOut<acc_t>& out, unsigned char* arena) {
  Sum2<acc_t>* sh_sums = reinterpret_cast<Sum2<acc_t>*>(arena);
  const RowBlock b = row_block(s, plan, plan.grad_rows, block);
  const RowThread t = row_thread(plan, b);
  const TileGroups tg = tile_groups(s, b.c_begin, b.c_end);
  wait_domains(out.sw, 0, b.n * s.G + tg.first, b.n * s.G + tg.last, out.epoch);
  const TileCoefs<Op, acc_t> table = TileCoefs<Op, acc_t>::in(arena + kThreads * V * sizeof(Sum2<acc_t>));
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
    for (int i = 0; i < V; ++i)
      gstore(out.partial.data + out.partial.index(s, b.n, t.c + i, b.part), sh_sums[slot + i]);
  }
  // Per group in the tile, a warp per group slot: sums of weight * the
  // channel totals (channel c's at slot c - c_begin), for the dx coefficients.
  const int64_t Cg = s.channels_per_group();
  const int lane = threadIdx.x % 32;
  for (int64_t g = tg.first + threadIdx.x / 32; g <= tg.last; g += blockDim.x / 32) {  // uniform per warp
    Sum2<acc_t> total{acc_t(0), acc_t(0)};
    for (int64_t c = std::max(b.c_begin, g * Cg) + lane; c < std::min(b.c_end, (g + 1) * Cg); c += 32) {
      const acc_t w = weight.at(b.n, c, acc_t(1));
      total.a += w * sh_sums[c - b.c_begin].a;
      total.b += w * sh_sums[c - b.c_begin].b;
    }
    total.a = warp_sum(total.a);
    total.b = warp_sum(total.b);
    if (lane == 0) {
      gstore(out.group_partial + group_slot_index(plan, plan.grad_rows, b.n, b.part, b.tile, g - tg.first), total);
    }
  }
  // Two-level merges: the block that completes a band merges it.
  const RowParts& bands = plan.grad_bands;
  if (bands.parts > 1) {
    const int64_t k = b.part / bands.rows;
    const int64_t arrivals = bands.count(k, plan.grad_rows.parts) * plan.tiles;
    if (!block_arrive(out.sw.arrivals(kBandLevel, b.n * bands.parts + k), arrivals)) return;  // uniform
    merge_grad_band(s, plan, out, b.n, k, lane);
  }
  // The block that completes sample n finalizes its groups.
  const int64_t arrivals = bands.parts > 1 ? bands.parts : plan.grad_rows.parts * plan.tiles;
  if (!block_arrive(out.sw.arrivals(1, b.n), arrivals)) return;  // uniform
  for (int64_t g = threadIdx.x / 32; g < s.G; g += blockDim.x / 32) {
    finalize_grad_group(s, plan, src, weight, out, b.n * s.G + g, lane);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    publish(out.sw.ready(1, b.n), out.epoch);
    atomicAdd(out.sw.finished(), static_cast<unsigned>(s.G));
  }
}

// dweight[c], dbias[c]: a block per 32 channels (a lane each), once every
// group's dx coefficients are done. Each channel's sums are per (sample,
// part) item; warp k takes items k, k + warps, ... in order, then warp 0
// adds the warps' results in order (a fixed order: deterministic). The terms
// are linear in the sums, so a sample's parts need no total first. Where a
// gradient is per sample, warp k takes samples k, k + warps, ... and adds
// each one's parts in order, storing (n, c).
constexpr int kParamChannels = 32;

template <typename acc_t>
struct ParamGrads {
  ChannelSums<acc_t> sums{};   // the per-channel sums, per band where there are bands
  ChannelGrad<acc_t> dweight;  // data null: no parameter gradients
  ChannelGrad<acc_t> dbias;
};

template <typename acc_t>
__device__ void param_grads_block(const GroupNormShape& s, const Plan& plan, int64_t block,
                                  const GroupSource<acc_t>& src, const ParamGrads<acc_t>& pg, const SequenceWords& sw) {
  __shared__ Sum2<acc_t> sh_slice[kThreads / 32][kParamChannels];
  if (threadIdx.x == 0) {
    GNFLEX_SPIN_UNTIL(static_cast<int64_t>(load_volatile(sw.finished())) == s.N * s.G);
    __threadfence();
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32, slices = blockDim.x / 32;
  const int64_t c_first = block * kParamChannels;
  const int64_t c = c_first + lane < s.C ? c_first + lane : s.C - 1;  // lanes past C repeat the last channel
  const int64_t Cg = s.channels_per_group(), g = c / Cg;
  // The lane that loads channel c's group values: its group's first lane.
  const int group_lane = static_cast<int>(std::max<int64_t>(0, g * Cg - c_first));
  // Group g of sample n: its residual mean - pivot and rstd.
  struct Group {
    acc_t residual, rstd;
  };
  const auto group_of = [&](int64_t n) {
    const int64_t ng = n * s.G + g;
    Group group{acc_t(0), acc_t(0)};
    if (lane == group_lane) group = Group{gload_l2(&src.coefs[ng].residual), gload(src.rstd + ng)};
    group.residual = __shfl_sync(0xffffffffu, group.residual, group_lane);
    group.rstd = __shfl_sync(0xffffffffu, group.rstd, group_lane);
    return group;
  };
  acc_t dw = acc_t(0), db = acc_t(0);
  const int64_t parts = pg.sums.parts;
  const bool valid = c_first + lane < s.C;
  if (pg.dweight.sample_stride != 0 || pg.dbias.sample_stride != 0) {
    for (int64_t n = slice; n < s.N; n += slices) {  // uniform per warp
      const Group group = group_of(n);
      acc_t dw_n = acc_t(0), db_n = acc_t(0);
      for (int64_t k = 0; k < parts; ++k) {
        const Sum2<acc_t> p = gload_l2(pg.sums.data + pg.sums.index(s, n, c, k));
        dw_n += math::weight_grad_term(p.a, p.b, group.residual, group.rstd);
        db_n += p.b;
      }
      if (valid && pg.dweight.sample_stride != 0) pg.dweight.store(n * s.C + c, dw_n);
      if (valid && pg.dbias.sample_stride != 0) pg.dbias.store(n * s.C + c, db_n);
      dw += dw_n;
      db += db_n;
    }
  } else {
#pragma unroll 4
    for (int64_t item = slice; item < s.N * parts; item += slices) {  // uniform per warp
      const int64_t n = item / parts;
      const Group group = group_of(n);
      const Sum2<acc_t> p = gload_l2(pg.sums.data + pg.sums.index(s, n, c, item - n * parts));
      dw += math::weight_grad_term(p.a, p.b, group.residual, group.rstd);
      db += p.b;
    }
  }
  sh_slice[slice][lane] = Sum2<acc_t>{dw, db};
  __syncthreads();
  if (slice == 0 && valid) {
    for (int k = 1; k < slices; ++k) {
      dw += sh_slice[k][lane].a;
      db += sh_slice[k][lane].b;
    }
    if (pg.dweight.sample_stride == 0) pg.dweight.store(c, dw);
    if (pg.dbias.sample_stride == 0) pg.dbias.store(c, db);
  }
}

}  // namespace cuda
}  // namespace gnflex
