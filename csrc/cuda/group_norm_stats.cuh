// CUDA GroupNorm device code: statistics. Exact chunk stats per
// work block; the block that completes a domain merges its chunks (mean,
// rstd, residual) and marks it ready; the backward's residual sums.
#pragma once

#include "group_norm_sequence.cuh"
#include "group_norm_values.cuh"

namespace gnflex {
namespace cuda {

// Where the forward's statistics go: partials per work block (and per
// band of them), then per group the mean (pivot), rstd and residual, and
// the sequence words that say when a group (level 0, domain ng or n) is
// ready.
template <typename acc_t>
struct StatsOut {
  ChunkStats<acc_t>* partial;
  ChunkStats<acc_t>* band;  // two-level merges: per (n, g, band) channels-first, (n, band, g) channels-last
  acc_t* mean;
  acc_t* rstd;
  GroupCoefs<acc_t>* coefs;
  acc_t eps;
  SequenceWords sw;
  Epoch epoch;
};

// Merges the statistics of the 32 lanes (Chan) in a fixed tree; the result is
// valid in lane 0.
template <typename acc_t>
__device__ CenteredStats<acc_t> warp_chan_merge(CenteredStats<acc_t> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    CenteredStats<acc_t> other;
    other.count = __shfl_down_sync(0xffffffffu, s.count, offset);
    other.center = __shfl_down_sync(0xffffffffu, s.center, offset);
    other.offset = __shfl_down_sync(0xffffffffu, s.offset, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
    s = math::chan_merge(s, other);
  }
  return s;
}

template <typename acc_t>
__device__ __forceinline__ CenteredStats<acc_t> centered_stats_of(int64_t count, const ChunkStats<acc_t>& c) {
  CenteredStats<acc_t> w;
  w.count = count;
  w.center = c.center;
  w.offset = c.offset;
  w.m2 = c.m2;
  return w;
}

// Groups [first, last] that channels [c_begin, c_end) of a tile touch.
struct TileGroups {
  int64_t first, last;
};
__device__ __forceinline__ TileGroups tile_groups(const GroupNormShape& s, int64_t c_begin, int64_t c_end) {
  const int64_t Cg = s.channels_per_group();
  return {c_begin / Cg, (c_end - 1) / Cg};
}

// Where a channels-last per-group partial result lives: one slot per group
// a tile touches (slot = g - the tile's first group) in each (n, part, tile)
// block of `rows`.
__device__ __forceinline__ int64_t group_slot_index(const Plan& plan, const RowParts& rows, int64_t n, int64_t part,
                                                    int64_t tile, int64_t slot) {
  return ((n * rows.parts + part) * plan.tiles + tile) * plan.group_slots + slot;
}

// Calls f(index, channels, part) for the channels-last per-group partial
// results of group ng in row parts `parts` of `rows` (per part, tile and
// group slot), lane l taking items l, l + 32, ...: index into the partial
// array, the group's channels in that tile, the row part.
template <typename F>
__device__ void for_each_group_slot(const GroupNormShape& s, const Plan& plan, const RowParts& rows,
                                    const PartRange& parts, int64_t ng, int lane, F&& f) {
  const int64_t n = ng / s.G, g = ng % s.G, Cg = s.channels_per_group();
  const int64_t tile_ch = plan.tile_channels();
  const int64_t t_first = g * Cg / tile_ch, t_last = ((g + 1) * Cg - 1) / tile_ch;
  const int64_t nt = t_last - t_first + 1;
  for (int64_t item = lane; item < parts.count * nt; item += 32) {
    const int64_t part = parts.first + item / nt, tile = t_first + item % nt;
    const int64_t c_begin = tile * tile_ch;
    const int64_t c_end = std::min(s.C, c_begin + tile_ch);
    const int64_t channels = std::min(c_end, (g + 1) * Cg) - std::max(c_begin, g * Cg);
    f(group_slot_index(plan, rows, n, part, tile, g - c_begin / Cg), channels, part);
  }
}

// Where group ng's partial result of band k (of `bands` per domain) lives:
// per (n, g, band) channels-first, per (n, band, g) channels-last.
template <Layout L>
__host__ __device__ __forceinline__ int64_t band_index(const GroupNormShape& s, const RowParts& bands, int64_t ng,
                                                       int64_t k) {
  if constexpr (L == Layout::ChannelsFirst) return ng * bands.parts + k;
  return (ng / s.G * bands.parts + k) * s.G + ng % s.G;
}

// Stats of channels-last group ng over row parts `parts`, in lane 0 of its
// warp: lane l merges the group's partials l, l + 32, ... in order, then the
// lanes merge in a fixed tree.
template <typename acc_t>
__device__ CenteredStats<acc_t> slot_stats(const GroupNormShape& s, const Plan& plan, const ChunkStats<acc_t>* partial,
                                           const PartRange& parts, int64_t ng, int lane) {
  CenteredStats<acc_t> stats;
  for_each_group_slot(s, plan, plan.stat_rows, parts, ng, lane, [&](int64_t index, int64_t channels, int64_t part) {
    const int64_t count = plan.stat_rows.count(part, s.HxW) * channels;
    stats = math::chan_merge(stats, centered_stats_of(count, gload_l2(partial + index)));
  });
  return warp_chan_merge(stats);
}

// Channels-first stats of group ng over parts `parts` of its run, in lane 0
// of its warp (lanes over the parts, then a fixed tree).
template <typename acc_t>
__device__ CenteredStats<acc_t> run_stats(const GroupNormShape& s, const Plan& plan, const ChunkStats<acc_t>* partial,
                                          const PartRange& parts, int64_t ng, int lane) {
  CenteredStats<acc_t> stats;
  for (int64_t part = parts.first + lane; part < parts.first + parts.count; part += 32) {
    const int64_t count = plan.stat_part_len(s.group_size(), part);
    stats = math::chan_merge(stats, centered_stats_of(count, gload_l2(partial + ng * plan.run_parts + part)));
  }
  return warp_chan_merge(stats);
}

// The statistics parts of a domain: row blocks of a sample (channels-last),
// spans of a group's run (channels-first).
template <Layout L>
__host__ __device__ __forceinline__ RowParts stat_parts(const Plan& plan) {
  if constexpr (L == Layout::ChannelsFirst) return RowParts{plan.stat_span(), plan.run_parts};
  return plan.stat_rows;
}

// Stats of group ng over its statistics parts `parts`, in lane 0.
template <Layout L, typename acc_t>
__device__ CenteredStats<acc_t> part_stats(const GroupNormShape& s, const Plan& plan, const ChunkStats<acc_t>* partial,
                                           const PartRange& parts, int64_t ng, int lane) {
  if constexpr (L == Layout::ChannelsFirst) return run_stats(s, plan, partial, parts, ng, lane);
  return slot_stats(s, plan, partial, parts, ng, lane);
}

// Two-level merges: group ng's partials of band k merged into one (lane 0
// stores it).
template <Layout L, typename acc_t>
__device__ void merge_stats_band(const GroupNormShape& s, const Plan& plan, const StatsOut<acc_t>& out, int64_t ng,
                                 int64_t k, int lane) {
  const PartRange parts = band_part_range(stat_parts<L>(plan), plan.stat_bands, k);
  const CenteredStats<acc_t> st = part_stats<L>(s, plan, out.partial, parts, ng, lane);
  if (lane == 0) {
    gstore(out.band + band_index<L>(s, plan.stat_bands, ng, k), ChunkStats<acc_t>{st.center, st.offset, st.m2});
  }
}

// Stats of group ng in lane 0 of its warp: from its band partials in order
// (two-level merges), else from its parts' partials.
template <Layout L, typename acc_t>
__device__ CenteredStats<acc_t> group_stats(const GroupNormShape& s, const Plan& plan, const StatsOut<acc_t>& out,
                                            int64_t ng, int lane) {
  const RowParts& bands = plan.stat_bands;
  const RowParts parts = stat_parts<L>(plan);
  if (bands.parts <= 1) return part_stats<L>(s, plan, out.partial, PartRange{0, parts.parts}, ng, lane);
  const int64_t per_value = L == Layout::ChannelsFirst ? 1 : s.channels_per_group();
  const int64_t total = L == Layout::ChannelsFirst ? s.group_size() : s.HxW;
  CenteredStats<acc_t> stats;
  for (int64_t k = lane; k < bands.parts; k += 32) {
    const int64_t count = band_span(parts, bands, k, total) * per_value;
    const ChunkStats<acc_t> c = gload_l2(out.band + band_index<L>(s, bands, ng, k));
    stats = math::chan_merge(stats, centered_stats_of(count, c));
  }
  return warp_chan_merge(stats);
}

// Group ng's mean (the pivot), rstd and residual from its chunk partials, by
// one warp (lane 0 writes).
template <Layout L, typename acc_t>
__device__ void finalize_group(const GroupNormShape& s, const Plan& plan, const StatsOut<acc_t>& out, int64_t ng,
                               int lane) {
  const CenteredStats<acc_t> stats = group_stats<L>(s, plan, out, ng, lane);
  if (lane == 0) {
    const acc_t pivot = math::rounded_mean(stats);
    gstore(out.mean + ng, pivot);
    gstore(out.rstd + ng, math::rstd_from_stats(stats, out.eps));
    gstore(&out.coefs[ng].residual, math::mean_residual(stats, pivot));
  }
}

// Channels-first chunk stats: a team (block, or warp for short runs) per
// (n, g, part) of plan.stat_span() values of the group's contiguous run, two
// passes over them (the second from registers). The team that completes a
// group finalizes it and marks it ready.
template <int kLanes, typename scalar_t, typename acc_t>
__device__ void chunk_stats_cf(const scalar_t* __restrict__ x, const GroupNormShape& s, const Plan& plan, int64_t block,
                               const StatsOut<acc_t>& out) {
  using T = Team<kLanes>;
  const T team = T::in_block(block);
  if (team.item >= s.N * s.G * plan.run_parts) return;  // uniform per team
  const int64_t ng = team.item / plan.run_parts;
  const int64_t part = team.item % plan.run_parts;
  const int64_t run = s.group_size();
  const int64_t len = plan.stat_part_len(run, part);  // <= T::kSpanValues: the kernel picks T from the plan
  SpanValues<kLanes, scalar_t, acc_t> values;
  values.load(x + ng * run + part * plan.stat_span(), len, team.rank);
  const acc_t sum = team.sum2(values.sums([](acc_t v) { return Sum2<acc_t>{v, acc_t(0)}; })).a;
  const acc_t center = team.broadcast(math::chunk_center(len, sum));
  const Sum2<acc_t> d = team.sum2(values.sums([center](acc_t v) {
    const acc_t dv = v - center;
    return Sum2<acc_t>{dv, dv * dv};
  }));
  // Two-level merges: the team completing a band merges it, then arrives
  // at the group.
  const RowParts& bands = plan.stat_bands;
  const int64_t k = part / bands.rows;
  bool last = false;
  if (team.rank == 0) {
    const auto st = math::stats_from_centered_sums(len, center, d.a, d.b);
    gstore(out.partial + team.item, ChunkStats<acc_t>{st.center, st.offset, st.m2});
    last = bands.parts > 1 ? arrive(out.sw.arrivals(kBandLevel, ng * bands.parts + k), bands.count(k, plan.run_parts))
                           : arrive(out.sw.arrivals(0, ng), plan.run_parts);
  }
  if (!team.broadcast(last) || team.rank >= 32) return;  // uniform per team, then per warp
  __syncwarp();  // orders lane 0's acquire before the other lanes' reads (a shuffle does not)
  if (bands.parts > 1) {
    merge_stats_band<Layout::ChannelsFirst>(s, plan, out, ng, k, team.rank);
    if (!warp_arrive(out.sw.arrivals(0, ng), bands.parts)) return;  // uniform per warp
  }
  finalize_group<Layout::ChannelsFirst>(s, plan, out, ng, team.rank);
  if (team.rank == 0) publish(out.sw.ready(0, ng), out.epoch);
}

// A thread's exact statistics of its V channels over the rows it has seen,
// in tiles of up to kTileRows of its rows: per tile and channel a center
// (the tile's first value), the sums of d = x - center and d^2 as the rows
// stream in, then Chan's merge into the running stats. A center that is one
// of the tile's m values bounds the relative rounding error of the tile's M2
// by about 1 + m units whatever the data (math::chunk_center). Rows pass
// through registers one at a time, so a tile can be long and its merge (two
// divisions for all V channels) is paid once per kTileRows rows. The counts
// stay in acc_t (exact: a thread sees far fewer than 2^24 rows).
template <int V, typename acc_t>
struct ThreadStats {
  static constexpr int kTileRows = 16;
  acc_t count = acc_t(0);
  acc_t center[V] = {}, offset[V] = {}, m2[V] = {};
  acc_t tile_center[V], sum_d[V], sum_d2[V];

  __device__ __forceinline__ void start_tile(const acc_t (&v)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      tile_center[i] = v[i];
      sum_d[i] = acc_t(0);
      sum_d2[i] = acc_t(0);
    }
  }
  __device__ __forceinline__ void add_row(const acc_t (&v)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const acc_t d = v[i] - tile_center[i];
      sum_d[i] += d;
      sum_d2[i] += d * d;
    }
  }
  // Folds the tile of m rows into the running stats.
  __device__ __forceinline__ void end_tile(int m) {
    const acc_t tile = static_cast<acc_t>(m);
    const acc_t inv_m = acc_t(1) / tile;
    const acc_t b_frac = tile / (count + tile);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const acc_t off = sum_d[i] * inv_m;
      const acc_t tile_m2 = sum_d2[i] - sum_d[i] * off;
      const acc_t tm2 = tile_m2 < acc_t(0) ? acc_t(0) : tile_m2;  // NaN stays NaN
      // The tile's mean as a center and a remainder: a first value far from
      // the mean (a spike) then enters no later merge's delta.
      const acc_t mean = tile_center[i] + off;
      const acc_t rest = (tile_center[i] - mean) + off;
      if (count == acc_t(0)) {
        center[i] = mean;
        offset[i] = rest;
        m2[i] = tm2;
      } else {
        const acc_t delta = (mean - center[i]) + (rest - offset[i]);
        offset[i] += delta * b_frac;
        m2[i] += tm2 + delta * delta * count * b_frac;
      }
    }
    count += tile;
  }

  __device__ __forceinline__ CenteredStats<acc_t> stats(int i) const {
    CenteredStats<acc_t> w;
    if (count > acc_t(0)) {
      w.count = static_cast<int64_t>(count);
      w.center = center[i];
      w.offset = offset[i];
      w.m2 = m2[i];
    }
    return w;
  }
};

// Channels-last chunk stats: one block per (n, part, tile). Each thread owns
// vec channels and a share of the rows, taken kTileRows rows at a time
// (ThreadStats). The threads of a channel then merge in a fixed tree, and the
// channels of each group in the tile in a warp: one partial per (n, part,
// tile, group slot).
template <int V, typename acc_t>
constexpr int64_t kStatsClArena = 3 * kThreads * V * sizeof(acc_t) + kThreads * sizeof(int64_t);

template <int V, typename scalar_t, typename acc_t>
__device__ void chunk_stats_cl(const scalar_t* __restrict__ x, const GroupNormShape& s, const Plan& plan, int64_t block,
                               const StatsOut<acc_t>& out, unsigned char* arena) {
  constexpr int kTileRows = ThreadStats<V, acc_t>::kTileRows;
  acc_t* sh_center = reinterpret_cast<acc_t*>(arena);
  acc_t* sh_offset = sh_center + kThreads * V;
  acc_t* sh_m2 = sh_offset + kThreads * V;
  int64_t* sh_count = reinterpret_cast<int64_t*>(sh_m2 + kThreads * V);
  const RowBlock b = row_block(s, plan, plan.stat_rows, block);
  const RowThread t = row_thread(plan, b);
  const int64_t step = plan.rows_per_pass;
  ThreadStats<V, acc_t> mine;
  if (t.active) {
    const int64_t row_stride = step * s.C;  // elements between a thread's rows
    const scalar_t* p = x + (b.n * s.HxW + b.row_begin + t.ty) * s.C + t.c;
    const int rows = static_cast<int>((b.row_end - b.row_begin - t.ty + step - 1) / step);  // this thread's
    for (int r = 0; r < rows; r += kTileRows, p += kTileRows * row_stride) {
      acc_t v[V];
      load_values<V>(p, v);
      mine.start_tile(v);
      const int m = std::min(kTileRows, rows - r);
      if (m == kTileRows) {
#pragma unroll
        for (int j = 1; j < kTileRows; ++j) {
          load_values<V>(p + j * row_stride, v);
          mine.add_row(v);
        }
      } else {
        for (int j = 1; j < m; ++j) {
          load_values<V>(p + j * row_stride, v);
          mine.add_row(v);
        }
      }
      mine.end_tile(m);
    }
  }
  CenteredStats<acc_t> run[V];
#pragma unroll
  for (int i = 0; i < V; ++i) run[i] = mine.stats(i);
  const int64_t slot = threadIdx.x * V;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sh_center[slot + i] = run[i].center;
    sh_offset[slot + i] = run[i].offset;
    sh_m2[slot + i] = run[i].m2;
  }
  sh_count[threadIdx.x] = run[0].count;
  merge_rows_tree(plan, t, [&](int64_t other_thread) {
    const int64_t other = other_thread * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const auto a = centered_stats_of(sh_count[threadIdx.x],
                                       ChunkStats<acc_t>{sh_center[slot + i], sh_offset[slot + i], sh_m2[slot + i]});
      const auto o = centered_stats_of(sh_count[other_thread],
                                       ChunkStats<acc_t>{sh_center[other + i], sh_offset[other + i], sh_m2[other + i]});
      const auto merged = math::chan_merge(a, o);
      sh_center[slot + i] = merged.center;
      sh_offset[slot + i] = merged.offset;
      sh_m2[slot + i] = merged.m2;
    }
    sh_count[threadIdx.x] += sh_count[other_thread];
  });
  // Channels of a group: a warp per group slot; channel c's stats sit at slot
  // c - c_begin (ty = 0) and cover all rows of the block.
  const TileGroups tg = tile_groups(s, b.c_begin, b.c_end);
  const int64_t Cg = s.channels_per_group();
  const int64_t rows = b.row_end - b.row_begin;
  const int lane = threadIdx.x % 32;
  for (int64_t g = tg.first + threadIdx.x / 32; g <= tg.last; g += blockDim.x / 32) {  // uniform per warp
    const int64_t c_lo = std::max(b.c_begin, g * Cg);
    const int64_t c_hi = std::min(b.c_end, (g + 1) * Cg);
    CenteredStats<acc_t> st;
    for (int64_t c = c_lo + lane; c < c_hi; c += 32) {
      const int64_t k = c - b.c_begin;
      st = math::chan_merge(st, centered_stats_of(rows, ChunkStats<acc_t>{sh_center[k], sh_offset[k], sh_m2[k]}));
    }
    st = warp_chan_merge(st);
    if (lane == 0) {
      gstore(out.partial + group_slot_index(plan, plan.stat_rows, b.n, b.part, b.tile, g - tg.first),
             ChunkStats<acc_t>{st.center, st.offset, st.m2});
    }
  }
  // Two-level merges: the block that completes a band merges its groups.
  const RowParts& bands = plan.stat_bands;
  if (bands.parts > 1) {
    const int64_t k = b.part / bands.rows;
    const int64_t arrivals = bands.count(k, plan.stat_rows.parts) * plan.tiles;
    if (!block_arrive(out.sw.arrivals(kBandLevel, b.n * bands.parts + k), arrivals)) return;  // uniform
    for (int64_t g = threadIdx.x / 32; g < s.G; g += blockDim.x / 32) {                       // uniform per warp
      merge_stats_band<Layout::ChannelsLast>(s, plan, out, b.n * s.G + g, k, lane);
    }
  }
  // The block that completes sample n merges its groups, a warp per group.
  const int64_t arrivals = bands.parts > 1 ? bands.parts : plan.stat_rows.parts * plan.tiles;
  if (!block_arrive(out.sw.arrivals(0, b.n), arrivals)) return;  // uniform
  for (int64_t g = threadIdx.x / 32; g < s.G; g += blockDim.x / 32)
    finalize_group<Layout::ChannelsLast>(s, plan, out, b.n * s.G + g, lane);
  __syncthreads();
  if (threadIdx.x == 0) publish(out.sw.ready(0, b.n), out.epoch);
}

// The sum of x - pivot over split `split` of group ng (stored by rank 0).
template <typename T, typename scalar_t, typename acc_t>
__device__ void residual_split_sum(const scalar_t* __restrict__ x, const GroupNormShape& s, const Plan& plan,
                                   const T& team, int64_t ng, int64_t split, acc_t pivot, acc_t* __restrict__ sums) {
  constexpr int kLanes = T::kSize;
  const int64_t run = s.group_size(), Cg = s.channels_per_group();
  const int64_t begin = run * split / plan.residual_splits, end = run * (split + 1) / plan.residual_splits;
  const int64_t n = ng / s.G, c0 = ng % s.G * Cg;
  acc_t sum = acc_t(0);
  for (int64_t j = begin + team.rank; j < end; j += kLanes) {
    // The j-th value of the group in either layout.
    const int64_t idx = plan.layout == Layout::ChannelsFirst ? ng * run + j : (n * s.HxW + j / Cg) * s.C + c0 + j % Cg;
    sum += static_cast<acc_t>(gload(x + idx)) - pivot;
  }
  sum = team.sum2(Sum2<acc_t>{sum, acc_t(0)}).a;
  if (team.rank == 0) gstore(sums + team.item, sum);
}

// Backward, groups whose residual mean - pivot matters (|mean| >> std): sums
// of x - pivot over a split of the group, a team (block, or warp for short
// runs) per (n, g, split); the other groups' teams only count their arrival.
// x - pivot is exact for values near the mean, so the sum's rounding stays
// ~epsilon * std. The arrival that completes a group marks it ready (level 0).
template <int kLanes, typename scalar_t, typename acc_t>
__device__ void residual_sums(const scalar_t* __restrict__ x, const GroupNormShape& s, const Plan& plan, int64_t block,
                              const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, acc_t* __restrict__ sums,
                              const SequenceWords& sw, Epoch epoch) {
  using T = Team<kLanes>;
  const T team = T::in_block(block);
  if (team.item >= s.N * s.G * plan.residual_splits) return;  // uniform per team
  const int64_t ng = team.item / plan.residual_splits;
  const int64_t split = team.item % plan.residual_splits;
  const MeanRstd<acc_t> group = team.broadcast(team.rank == 0 ? MeanRstd<acc_t>{gload(mean + ng), gload(rstd + ng)}
                                                              : MeanRstd<acc_t>{acc_t(0), acc_t(0)});
  if (math::needs_exact_residual(group.mean, group.rstd)) {
    residual_split_sum(x, s, plan, team, ng, split, group.mean, sums);
  }
  if (team.rank == 0 && arrive(sw.arrivals(0, ng), plan.residual_splits)) publish(sw.ready(0, ng), epoch);
}

}  // namespace cuda
}  // namespace gnflex
