// CUDA GroupNorm host planning: the work split of every phase, a pure
// function of the shape, dtype, layout and vector width (never of the GPU),
// so tiling and merge orders, and therefore results, are the same on every
// GPU.
//
// Channels-first (NCHW): a group is one contiguous run of Cg * HxW values;
// statistics blocks take kSpan values of it. Output and gradient blocks take
// ~kBlockValues of one plane, or whole small planes with a warp per plane.
// Channels-last: blocks take a tile of channels of a run of rows; each
// thread owns `vec` adjacent channels (16-byte loads when C and the pointers
// allow) and a share of the rows.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "../group_norm_math.h"

namespace gnflex {
namespace cuda {

constexpr int kThreads = 256;
// Values of one statistics block (channels-first), held in registers.
constexpr int64_t kSpan = 4096;
// Group runs of at most this many values get a warp each, not a block, in
// the statistics and residual kernels (a block of 256 threads per few
// hundred values spends its time on barriers and scheduling).
constexpr int64_t kWarpSpan = 1024;
// A channels-first group that fits its statistics team's registers (one
// part) is normalized in one pass from them where the block's channels fit a
// shared-memory table of this many: the resident path.
constexpr int64_t kResidentChannels = 1024;
// Target values of an output / gradient block, and the smallest plane that
// gets blocks of its own (smaller planes: a warp per plane).
constexpr int64_t kBlockValues = 16384;
constexpr int64_t kSmallPlane = 1024;
// Grids aim at about 4 waves of a 132-SM GPU where the data allows, and
// tensors of kBigTensorBytes or more get at least 2 waves whatever the
// block-size floors below say.
constexpr int64_t kTargetBlocks = 528;
constexpr int64_t kTwoWaves = 264;
constexpr int64_t kBigTensorBytes = 8 << 20;
// Channels-last blocks: at least this many rows and values (the channels'
// coefficients and partial results amortize over them), at most this many
// channels per tile (shared-memory tables). Gradient sums write a partial
// result per channel and block, so their blocks are larger.
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMinBlockValues = 16384;
constexpr int64_t kMinGradBlockRows = 256;
constexpr int64_t kMaxTileChannels = 1024;
constexpr int64_t kMinTileBytes = 256;
// Partial results of a domain (a group's run channels-first, a sample
// channels-last) merge in two levels where it has more than kMergeFanIn
// parts: the team completing a band of kMergeFanIn consecutive parts merges
// them, the one completing the domain merges the bands. A one-level merge
// of thousands of parts (batch-1 VAE and video) is a serial chain per lane
// that the output blocks wait for.
constexpr int64_t kMergeFanIn = 64;
#ifdef GNFLEX_CUDA_SIM
// The simulator test also runs every case on a scaled-down plan (fields > 0 /
// true): rounds of round_bytes, merges of merge_fan_in parts,
// channels-last blocks of one pass of rows, the two-pass path only, output
// rounds reversed past l2_reuse_bytes of re-read. Its small shapes then take
// the many-round schedules, many row blocks, two-level merges and reversed
// outputs of large tensors.
struct SimPlanScale {
  int64_t round_bytes = 0;
  int64_t merge_fan_in = 0;
  bool short_row_blocks = false;
  bool two_pass = false;       // no resident path
  int64_t l2_reuse_bytes = 0;  // the "dram" path's reversed output rounds above it
};
inline SimPlanScale gnflex_sim_plan;
#endif
inline int64_t merge_fan_in() {
#ifdef GNFLEX_CUDA_SIM
  if (gnflex_sim_plan.merge_fan_in > 0) return gnflex_sim_plan.merge_fan_in;
#endif
  return kMergeFanIn;
}

template <typename T>
using acc_type = at::opmath_type<T>;

template <typename scalar_t>
struct PackTraits {
  static constexpr int kSize = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
  struct alignas(16) Pack {
    scalar_t v[kSize];
  };
};

// ---- the work plan ------------------------------------------------------------
// Rows [part * rows, ...) of a sample, cut into parts.
struct RowParts {
  int64_t rows = 1;
  int64_t parts = 0;
  __host__ __device__ int64_t count(int64_t part, int64_t total) const {
    const int64_t begin = part * rows;
    return total - begin < rows ? total - begin : rows;
  }
};

struct Plan {
  Layout layout = Layout::ChannelsFirst;
  // Group runs of at most kWarpSpan values: a warp per run (or residual
  // split) in the statistics and residual kernels, else a block.
  bool warp_runs = false;
  // Channels-first forward in one pass, a team per group (resident_cf).
  bool resident = false;
  // Statistics: channels-first, parts of stat_span() values of a group's run.
  int64_t run_parts = 0;
  // Channels-first outputs / gradient sums: planes_per_block > 0 gives
  // blocks of whole small planes (a warp per plane), else blocks of
  // plane.rows values of one plane (plane.parts per plane).
  RowParts plane;
  int64_t planes_per_block = 0;
  // Channels-last: vec channels per thread, tiles of tile_vecs threads
  // across, rows_per_pass rows at a time; stat_rows / out_rows / grad_rows
  // rows per block of the statistics / output / gradient-sum kernels.
  int vec = 1;
  int64_t tiles = 1, tile_vecs = 1, rows_per_pass = 1;
  RowParts stat_rows, out_rows, grad_rows;
  // Bands of the statistics parts of a domain (channels-first: of a run,
  // channels-last: of a sample) and, channels-last only, of the gradient-sum
  // blocks' row parts (`rows` parts a band, `parts` bands); at most one
  // band: the parts merge at once.
  RowParts stat_bands, grad_bands;
  int64_t group_slots = 1;  // groups a tile touches, at most (per-group partials per block)
  // Backward residual: blocks per group.
  int64_t residual_splits = 1;

  __host__ __device__ int64_t tile_channels() const { return tile_vecs * vec; }
  __host__ __device__ int64_t stat_span() const { return warp_runs ? kWarpSpan : kSpan; }
  // Teams (a warp or the block each) of a statistics, residual or resident block.
  __host__ __device__ int64_t teams_per_block() const { return warp_runs ? kThreads / 32 : 1; }
  // Values of statistics part `part` of a channels-first group run of `run`.
  __host__ __device__ int64_t stat_part_len(int64_t run, int64_t part) const {
    const int64_t left = run - part * stat_span();
    return left < stat_span() ? left : stat_span();
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline RowParts row_parts(int64_t total, int64_t rows) {
  rows = std::max<int64_t>(1, std::min(rows, total));
  return {rows, total == 0 ? 0 : ceil_div(total, rows)};
}

// Band k of the parts of `parts` (cut into `bands`): its first part and
// part count, and the items (rows of a sample, values of a group's run) it
// covers of `total`.
struct PartRange {
  int64_t first, count;
};
__host__ __device__ inline PartRange band_part_range(const RowParts& parts, const RowParts& bands, int64_t k) {
  return {k * bands.rows, bands.count(k, parts.parts)};
}
__host__ __device__ inline int64_t band_span(const RowParts& parts, const RowParts& bands, int64_t k, int64_t total) {
  return RowParts{parts.rows * bands.rows, bands.parts}.count(k, total);
}

// Channels-last vector width: whole packs when every row starts 16-byte
// aligned in every tensor (C a multiple of the pack and aligned pointers).
template <typename scalar_t>
int channels_last_vec(const GroupNormShape& s, std::initializer_list<const void*> pointers) {
  constexpr int kV = PackTraits<scalar_t>::kSize;
  if (s.C % kV != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kV;
}

template <typename scalar_t>
Plan make_plan(const GroupNormShape& s, Layout layout, int vec) {
  using acc_t = acc_type<scalar_t>;
  const bool big = s.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kBigTensorBytes;
  Plan p;
  p.layout = layout;
  const int64_t Cg = s.channels_per_group();
  p.warp_runs = s.group_size() <= kWarpSpan;
  p.residual_splits =
      p.warp_runs ? 1 : std::clamp<int64_t>(ceil_div(2 * kTargetBlocks, std::max<int64_t>(1, s.N * s.G)), 1, 32);
  if (layout == Layout::ChannelsFirst) {
    p.run_parts = s.HxW == 0 ? 0 : ceil_div(Cg * s.HxW, p.stat_span());
    p.stat_bands = row_parts(p.run_parts, merge_fan_in());
    p.resident = p.run_parts == 1 && p.teams_per_block() * Cg <= kResidentChannels;
#ifdef GNFLEX_CUDA_SIM
    if (gnflex_sim_plan.two_pass) p.resident = false;
#endif
    const int64_t planes = s.N * s.C;
    if (s.HxW < kSmallPlane) {
      // At least kSpan values a block (group values are loaded per warp and
      // group), at most kBlockValues.
      const int64_t hxw = std::max<int64_t>(1, s.HxW);
      const int64_t fewest = std::max<int64_t>(8, kSpan / hxw), most = std::max(fewest, kBlockValues / hxw);
      p.planes_per_block = std::clamp<int64_t>(ceil_div(planes, kTargetBlocks), fewest, most);
      p.plane = {std::max<int64_t>(1, s.HxW), 1};
    } else {
      // Blocks of kSpan..kBlockValues values, as many as give the target grid.
      const int64_t want = ceil_div(planes * s.HxW, kTargetBlocks);
      const int64_t rows = std::clamp<int64_t>((want + 255) / 256 * 256, kSpan, kBlockValues);
      p.plane = row_parts(s.HxW, rows);
    }
    return p;
  }
  p.vec = vec;
  const int64_t vecs = std::max<int64_t>(1, s.C / vec);
  const int64_t most_vecs =
      std::min<int64_t>(kThreads, kMaxTileChannels / vec * 4 / static_cast<int64_t>(sizeof(acc_t)));
  p.tiles = ceil_div(vecs, most_vecs);
  // More, narrower tiles where the gradient-sum blocks (the largest) would
  // not fill the target grid: a block's costs (coefficient table, partial
  // results) grow with its tile width as its values do, so narrow tiles keep
  // the rows that amortize them. Tiles stay >= kMinTileBytes wide per row.
  const int64_t min_tile_vecs = std::max<int64_t>(1, kMinTileBytes / (vec * static_cast<int64_t>(sizeof(scalar_t))));
  const int64_t row_blocks = s.N * ceil_div(std::max<int64_t>(1, s.HxW), kMinGradBlockRows);
  const int64_t most_tiles = std::max(p.tiles, vecs / min_tile_vecs);
  p.tiles = std::clamp(ceil_div(kTargetBlocks, row_blocks), p.tiles, most_tiles);
  p.tile_vecs = ceil_div(vecs, p.tiles);
  p.rows_per_pass = std::max<int64_t>(1, kThreads / p.tile_vecs);
  const int64_t tile_ch = p.tile_channels();
  // Rows per block: enough blocks for the target grid, within [lo, 4 lo];
  // big tensors: no more than 2 waves allow.
  const auto rows_for = [&](int64_t min_rows) {
    int64_t lo = std::max({p.rows_per_pass, min_rows, kMinBlockValues / tile_ch});
#ifdef GNFLEX_CUDA_SIM
    if (gnflex_sim_plan.short_row_blocks) lo = p.rows_per_pass;
#endif
    int64_t rows = std::clamp(ceil_div(s.N * s.HxW * p.tiles, kTargetBlocks), lo, 4 * lo);
    if (big) rows = std::min(rows, std::max(p.rows_per_pass, s.N * s.HxW * p.tiles / kTwoWaves));
    return row_parts(s.HxW, rows);
  };
  p.stat_rows = rows_for(kMinBlockRows);
  p.out_rows = rows_for(kMinBlockRows);
  p.grad_rows = rows_for(kMinGradBlockRows);
  p.stat_bands = row_parts(p.stat_rows.parts, merge_fan_in());
  p.grad_bands = row_parts(p.grad_rows.parts, merge_fan_in());
  // Groups a tile of tile_ch channels starting anywhere can touch.
  p.group_slots = std::min<int64_t>(s.G, ceil_div(tile_ch, std::max<int64_t>(1, Cg)) + 1);
  return p;
}

}  // namespace cuda
}  // namespace gnflex
