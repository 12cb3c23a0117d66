// CUDA GroupNorm device code: types, the work plan, block and warp helpers.
// Then group_norm_values.cuh (group and channel coefficients, per-value
// operations), group_norm_sequence.cuh (how one launch orders its phases),
// group_norm_stats.cuh (statistics),
// group_norm_grad.cuh (gradient sums), group_norm_apply.cuh (elementwise
// outputs) and group_norm_launch.cuh (schedules, kernels, launches).
//
// nvcc compiles these headers into the op (group_norm_cuda.cu); g++ compiles
// them into the CPU simulator test (tests/cuda_sim/), which includes its
// simulator first and defines GNFLEX_CUDA_SIM. Both run the same kernels
// through the same launches (launch_forward / launch_backward), so the
// simulator checks exactly what a GPU runs, minus timing and memory-model
// effects.
//
// The numerical scheme is group_norm_math.h's, as on the CPU:
//   forward (one launch): exact chunk stats (a chunk's mean, then the sums of
//     d = x - mean and d^2 about it) per work block -> the block completing a
//     group (channels-first) or sample (channels-last) merges its chunks with
//     Chan's formula in a fixed order: mean P (rounded), rstd, residual
//     mean - P -> every output block folds its channels' scale/shift from
//     those and weight/bias: y = act((x - P) * scale + shift).
//   backward (one launch): the saved mean is the pivot P; groups with a large
//     |mean| / std get the exact residual from sums of x - P (other groups'
//     blocks only count themselves); sums of g * (x - P) and g per channel and
//     block, g = dy * act'(z); the block completing a domain computes its dx
//     coefficients; dx = scale * g + x_coef * (x - P) + bias_coef; dweight /
//     dbias once every group is done.
// Partial results merge in index order; the only atomics are integer
// counters: bitwise reproducible.
//
// Work split. Channels-first (NCHW): a group is one contiguous run of
// Cg * HxW values; statistics blocks take kSpan values of it. Output and
// gradient blocks take ~kBlockValues of one plane, or whole small planes
// with a warp per plane. Channels-last: blocks take a tile of channels of a
// run of rows; each thread owns `vec` adjacent channels (16-byte loads when
// C and the pointers allow) and a share of the rows.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../group_norm_math.h"

// Launches, and global-memory accesses (gload / gstore below): the simulator
// test counts both (bash .ci/cuda-sim --traffic), the only evidence of what
// the kernels would cost a GPU on a machine without one.
#ifdef GNFLEX_CUDA_SIM
#define GNFLEX_LAUNCH(kernel, grid, block, stream, ...) \
  (::gnflex_sim_count_launch((grid).x), CUDASIM_LAUNCH(kernel, grid, block, 0, stream, __VA_ARGS__))
#define GNFLEX_COUNT_TRAFFIC(bytes) ::gnflex_sim_count_traffic(bytes)
#else
#define GNFLEX_COUNT_TRAFFIC(bytes) ((void)0)
#include <c10/cuda/CUDAException.h>
#define GNFLEX_LAUNCH(kernel, grid, block, stream, ...)    \
  do {                                                     \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                        \
  } while (0)
#endif

namespace gnflex {
namespace cuda {

using math::WelfordStats;

constexpr int kThreads = 256;
// Values of one statistics block (channels-first), held in registers.
constexpr int64_t kSpan = 4096;
// Group runs of at most this many values get a warp each, not a block, in
// the statistics and residual kernels (a block of 256 threads per few
// hundred values spends its time on barriers and scheduling).
constexpr int64_t kWarpSpan = 1024;
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

template <typename T>
using acc_type = at::opmath_type<T>;

template <typename T>
struct Sum2 {
  T a;
  T b;
};

// WelfordStats of one chunk; its count follows from the plan.
template <typename T>
struct ChunkStats {
  T center;
  T offset;
  T m2;
};

// Per-(n, g) values besides the mean (pivot) and rstd: the residual
// mean - pivot, and in the backward the dx coefficients.
template <typename T>
struct GroupCoefs {
  T residual;
  T x_coef;
  T bias_coef;
};

// What an output value needs of its channel.
template <typename T>
struct ChannelCoefs {
  T pivot;  // the group's mean rounded to T
  T scale;  // rstd * weight
  T shift;
  T x_coef;
  T bias_coef;
};

// 16-byte pack of scalars for vector loads/stores.
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
  int64_t group_slots = 1;  // groups a tile touches, at most (per-group partials per block)
  // Backward residual: blocks per group.
  int64_t residual_splits = 1;

  __host__ __device__ int64_t tile_channels() const { return tile_vecs * vec; }
  __host__ __device__ int64_t stat_span() const { return warp_runs ? kWarpSpan : kSpan; }
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
    const int64_t lo = std::max({p.rows_per_pass, min_rows, kMinBlockValues / tile_ch});
    int64_t rows = std::clamp(ceil_div(s.N * s.HxW * p.tiles, kTargetBlocks), lo, 4 * lo);
    if (big) rows = std::min(rows, std::max(p.rows_per_pass, s.N * s.HxW * p.tiles / kTwoWaves));
    return row_parts(s.HxW, rows);
  };
  p.stat_rows = rows_for(kMinBlockRows);
  p.out_rows = rows_for(kMinBlockRows);
  p.grad_rows = rows_for(kMinGradBlockRows);
  // Groups a tile of tile_ch channels starting anywhere can touch.
  p.group_slots = std::min<int64_t>(s.G, ceil_div(tile_ch, std::max<int64_t>(1, Cg)) + 1);
  return p;
}

// ---- device helpers --------------------------------------------------------
// Every global-memory access of the kernels goes through these two.
template <typename T>
__device__ __forceinline__ T gload(const T* p) {
  GNFLEX_COUNT_TRAFFIC(sizeof(T));
  return *p;
}
template <typename T>
__device__ __forceinline__ void gstore(T* p, const T& v) {
  GNFLEX_COUNT_TRAFFIC(sizeof(T));
  *p = v;
}

// Data other blocks of the same launch wrote (partial results, group
// coefficients): read from L2 (ld.global.cg), never from an SM's L1, which is
// not coherent and may hold a line read before the other block wrote it.
template <typename T>
__device__ __forceinline__ T gload_l2(const T* p) {
  // In 8-byte words where T's alignment allows (double data), else 4-byte.
  using Word = std::conditional_t<alignof(T) >= 8 && sizeof(T) % 8 == 0, unsigned long long, unsigned>;
  static_assert(sizeof(T) % sizeof(Word) == 0 && alignof(T) >= 4, "whole words");
  GNFLEX_COUNT_TRAFFIC(sizeof(T));
  T v;
  const Word* from = reinterpret_cast<const Word*>(p);
  Word* to = reinterpret_cast<Word*>(&v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / sizeof(Word)); ++i) to[i] = __ldcg(from + i);
  return v;
}

// The dtype a per-channel parameter (weight, bias) or its gradient is stored
// in: the accumulate type, or the 16-bit input type (read and written as is,
// so a half-precision model costs no cast launches).
enum class ParamType : int { Acc, Half, BFloat16 };

// A per-channel parameter in its own dtype; null reads as the default.
template <typename acc_t>
struct ChannelParam {
  const void* data = nullptr;
  ParamType type = ParamType::Acc;

  __device__ __forceinline__ acc_t at(int64_t c, acc_t absent) const {
    if (data == nullptr) return absent;
    switch (type) {
      case ParamType::Half:
        return static_cast<acc_t>(gload(static_cast<const c10::Half*>(data) + c));
      case ParamType::BFloat16:
        return static_cast<acc_t>(gload(static_cast<const c10::BFloat16*>(data) + c));
      default:
        return gload(static_cast<const acc_t*>(data) + c);
    }
  }
};

// A per-channel gradient (dweight, dbias) written in its parameter's dtype.
template <typename acc_t>
struct ChannelGrad {
  void* data = nullptr;
  ParamType type = ParamType::Acc;

  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    switch (type) {
      case ParamType::Half:
        gstore(static_cast<c10::Half*>(data) + c, static_cast<c10::Half>(v));
        break;
      case ParamType::BFloat16:
        gstore(static_cast<c10::BFloat16*>(data) + c, static_cast<c10::BFloat16>(v));
        break;
      default:
        gstore(static_cast<acc_t*>(data) + c, v);
    }
  }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_broadcast(T v) {
  return __shfl_sync(0xffffffffu, v, 0);
}
template <typename T>
__device__ __forceinline__ Sum2<T> warp_broadcast(Sum2<T> v) {
  return {warp_broadcast(v.a), warp_broadcast(v.b)};
}

// Sum over the block (blockDim.x a multiple of 32) in a fixed order; the
// result is valid in thread 0.
template <typename T>
__device__ Sum2<T> block_sum2(Sum2<T> v) {
  __shared__ T shared_a[32];
  __shared__ T shared_b[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v.a = warp_sum(v.a);
  v.b = warp_sum(v.b);
  if (lane == 0) {
    shared_a[warp] = v.a;
    shared_b[warp] = v.b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    v.a = warp_sum(lane < warps ? shared_a[lane] : T(0));
    v.b = warp_sum(lane < warps ? shared_b[lane] : T(0));
  }
  return v;
}

// Thread 0's value in every thread of the block. Values the whole block uses
// are loaded by thread 0 and broadcast, so they are read from global memory
// once.
template <typename T>
__device__ T block_broadcast(T v) {
  __shared__ T value;
  if (threadIdx.x == 0) value = v;
  __syncthreads();
  const T result = value;
  __syncthreads();  // a later call may overwrite value
  return result;
}

template <int N>
using Width = std::integral_constant<int, N>;

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_values(const scalar_t* p, acc_t (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<acc_t>(gload(p));
  } else {
    using Pack = typename PackTraits<scalar_t>::Pack;
    static_assert(N == PackTraits<scalar_t>::kSize, "whole packs");
    const Pack pack = gload(reinterpret_cast<const Pack*>(p));
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<acc_t>(pack.v[k]);
  }
}

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_values(scalar_t* p, const acc_t (&in)[N]) {
  if constexpr (N == 1) {
    gstore(p, static_cast<scalar_t>(in[0]));
  } else {
    using Pack = typename PackTraits<scalar_t>::Pack;
    static_assert(N == PackTraits<scalar_t>::kSize, "whole packs");
    Pack pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = static_cast<scalar_t>(in[k]);
    gstore(reinterpret_cast<Pack*>(p), pack);
  }
}

__device__ __forceinline__ int misalignment(const void* p) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16);
}

// Calls f(i, Width<W>) over a span of len values, thread `tid` of `nthreads`,
// so that every call with W > 1 starts at a 16-byte aligned address of every
// pointer. Vector steps only when all pointers share the same misalignment.
template <typename scalar_t, typename F>
__device__ void for_each_in_span(int64_t len, const scalar_t* first, bool same_alignment, int tid, int nthreads,
                                 F&& f) {
  constexpr int kV = PackTraits<scalar_t>::kSize;
  if (kV == 1 || !same_alignment) {
    for (int64_t i = tid; i < len; i += nthreads) f(i, Width<1>{});
    return;
  }
  if constexpr (kV > 1) {
    int64_t head = ((16 - misalignment(first)) % 16) / static_cast<int64_t>(sizeof(scalar_t));
    head = head < len ? head : len;
    const int64_t packs = (len - head) / kV;
    for (int64_t i = tid; i < head; i += nthreads) f(i, Width<1>{});
    for (int64_t k = tid; k < packs; k += nthreads) f(head + k * kV, Width<kV>{});
    for (int64_t i = head + packs * kV + tid; i < len; i += nthreads) f(i, Width<1>{});
  }
}

// The threads that reduce one work item: a block (kLanes = kThreads; item =
// the work block) or a warp (kLanes = 32; item = the warp's index over all
// work blocks).
// Sums are valid in rank 0; broadcast hands rank 0's value to all.
template <int kLanes>
struct Team {
  static_assert(kLanes == 32 || kLanes == kThreads, "a warp or a block");
  // Values a team holds in registers (SpanValues).
  static constexpr int kSize = kLanes;
  static constexpr int64_t kSpanValues = kLanes == 32 ? kWarpSpan : kSpan;
  int64_t item;
  int rank;

  // The team of this thread in work block `block` (of kThreads threads).
  __device__ static Team in_block(int64_t block) {
    if constexpr (kLanes == 32) {
      return {block * (kThreads / 32) + threadIdx.x / 32, static_cast<int>(threadIdx.x % 32)};
    } else {
      return {block, static_cast<int>(threadIdx.x)};
    }
  }

  template <typename T>
  __device__ Sum2<T> sum2(Sum2<T> v) const {
    if constexpr (kLanes == 32) {
      return {warp_sum(v.a), warp_sum(v.b)};
    } else {
      return block_sum2(v);
    }
  }
  template <typename T>
  __device__ T broadcast(T v) const {
    if constexpr (kLanes == 32) {
      return warp_broadcast(v);
    } else {
      return block_broadcast(v);
    }
  }
};

// A span of at most Team<kLanes>::kSpanValues values held in registers by a
// team, so a second pass over it (the centered sums of the statistics) costs
// no memory traffic: per thread at most kPacks 16-byte packs (fixed slots, so
// they stay in registers) plus one value of the unaligned head and tail.
template <int kLanes, typename scalar_t, typename acc_t>
struct SpanValues {
  static constexpr int kW = PackTraits<scalar_t>::kSize;
  static constexpr int64_t kValues = Team<kLanes>::kSpanValues;
  static constexpr int kPacks = static_cast<int>(kValues / (kLanes * kW));
  static_assert(kPacks >= 1 && kValues % (kLanes * kW) == 0, "whole packs per thread");
  acc_t v[kPacks][kW];
  acc_t head_value = acc_t(0), tail_value = acc_t(0);
  bool has_head = false, has_tail = false;
  int64_t packs = 0;
  int rank = 0;

  __device__ void load(const scalar_t* p, int64_t len, int team_rank) {
    rank = team_rank;
    int64_t head = ((16 - misalignment(p)) % 16) / static_cast<int64_t>(sizeof(scalar_t));
    head = head < len ? head : len;
    packs = (len - head) / kW;
    const int64_t tail = len - head - packs * kW;
    has_head = rank < head;
    has_tail = rank < tail;
    if (has_head) head_value = static_cast<acc_t>(gload(p + rank));
    if (has_tail) tail_value = static_cast<acc_t>(gload(p + head + packs * kW + rank));
#pragma unroll
    for (int it = 0; it < kPacks; ++it) {
      const int64_t k = rank + static_cast<int64_t>(it) * kLanes;
      if (k < packs) load_values<kW>(p + head + k * kW, v[it]);
    }
  }

  // This thread's sum of f(value).
  template <typename F>
  __device__ Sum2<acc_t> sums(F&& f) const {
    Sum2<acc_t> s{acc_t(0), acc_t(0)};
    const auto add = [&](acc_t value) {
      const Sum2<acc_t> t = f(value);
      s.a += t.a;
      s.b += t.b;
    };
    if (has_head) add(head_value);
#pragma unroll
    for (int it = 0; it < kPacks; ++it) {
      if (rank + static_cast<int64_t>(it) * kLanes < packs) {
#pragma unroll
        for (int j = 0; j < kW; ++j) add(v[it][j]);
      }
    }
    if (has_tail) add(tail_value);
    return s;
  }
};

// ---- channels-last blocks ------------------------------------------------------
// Work block `block` of a channels-last phase: rows [row_begin, row_end) of
// sample n, channels [c_begin, c_end) (one tile).
struct RowBlock {
  int64_t n, part, tile;
  int64_t row_begin, row_end;
  int64_t c_begin, c_end;
};

__device__ __forceinline__ RowBlock row_block(const GroupNormShape& s, const Plan& plan, const RowParts& rows,
                                              int64_t block) {
  RowBlock b;
  b.tile = block % plan.tiles;
  b.part = block / plan.tiles % rows.parts;
  b.n = block / plan.tiles / rows.parts;
  b.row_begin = b.part * rows.rows;
  b.row_end = b.row_begin + rows.count(b.part, s.HxW);
  b.c_begin = b.tile * plan.tile_channels();
  b.c_end = b.c_begin + plan.tile_channels() < s.C ? b.c_begin + plan.tile_channels() : s.C;
  return b;
}

// A thread's place in a channels-last block: channels [c, c + vec) (active
// when inside the tile), rows ty, ty + rows_per_pass, ...
struct RowThread {
  int64_t tx, ty, c;
  bool active;
};

__device__ __forceinline__ RowThread row_thread(const Plan& plan, const RowBlock& b) {
  RowThread t;
  t.tx = threadIdx.x % plan.tile_vecs;
  t.ty = threadIdx.x / plan.tile_vecs;
  t.c = b.c_begin + t.tx * plan.vec;
  t.active = t.ty < plan.rows_per_pass && t.c < b.c_end;
  return t;
}

// Merges each thread's shared-memory slot with those of the threads below
// it in the same channel column (ty + 1, ...) in a fixed tree over ty:
// merge_from(other_thread) runs in the thread that keeps the result. Ends
// with a barrier; the totals are then in the slots of ty = 0. Every thread
// of the block calls it.
template <typename F>
__device__ void merge_rows_tree(const Plan& plan, const RowThread& t, F&& merge_from) {
  for (int64_t stride = 1; stride < plan.rows_per_pass; stride *= 2) {
    __syncthreads();
    if (t.active && t.ty % (2 * stride) == 0 && t.ty + stride < plan.rows_per_pass) {
      merge_from(static_cast<int64_t>(threadIdx.x) + stride * plan.tile_vecs);
    }
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace gnflex
