// CUDA GroupNorm device code: types, block and warp helpers, after the
// work plan (group_norm_plan.cuh). Then group_norm_values.cuh (group and
// channel coefficients, per-value operations), group_norm_sequence.cuh (how
// one launch orders its phases), group_norm_stats.cuh (statistics),
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
// The work split (a function of the shape alone): group_norm_plan.cuh.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "group_norm_plan.cuh"

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

using math::CenteredStats;

// Two sums reduced together (block_sum2, Team::sum2): of d and d^2 in the
// statistics, of g * (x - pivot) and g in the gradient sums (ChannelSums).
template <typename T>
struct Sum2 {
  T a;
  T b;
};

// Per-channel coefficients of an output: y = act((x - pivot) * scale + shift).
template <typename T>
struct ScaleShift {
  T scale;
  T shift;
};

// A group's saved mean (its pivot) and rstd, read and broadcast together.
template <typename T>
struct MeanRstd {
  T mean;
  T rstd;
};

// CenteredStats of one chunk; its count follows from the plan.
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

// What a group's channels share: the pivot (its mean rounded to T), rstd,
// the residual mean - pivot and, in the backward, the dx coefficients.
template <typename T>
struct GroupValues {
  T pivot;
  T rstd;
  T residual;
  T x_coef;
  T bias_coef;
};

// What an output value needs of its channel (channel_coefs: a group's values
// with the channel's weight and bias folded in).
template <typename T>
struct ChannelCoefs {
  T pivot;  // the group's mean rounded to T
  T scale;  // rstd * weight
  T shift;
  T x_coef;
  T bias_coef;
};

// 16-byte pack of scalars for vector loads/stores.
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

// The dtype a parameter (weight, bias) or its gradient is stored
// in: the accumulate type, or the 16-bit input type (read and written as is,
// so a half-precision model costs no cast launches).
enum class ParamType : int { Acc, Half, BFloat16 };

// A parameter in its own dtype, per channel (sample_stride 0) or per sample
// (sample_stride C: AdaGN / FiLM modulation); null reads as the default.
template <typename acc_t>
struct ChannelParam {
  const void* data = nullptr;
  ParamType type = ParamType::Acc;
  int64_t sample_stride = 0;

  // Channel c of sample n.
  __device__ __forceinline__ acc_t at(int64_t n, int64_t c, acc_t absent) const {
    if (data == nullptr) return absent;
    c += n * sample_stride;
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

// A parameter's gradient (dweight, dbias) written in its parameter's dtype
// and shape: (C,) or, with sample_stride C, (N, C).
template <typename acc_t>
struct ChannelGrad {
  void* data = nullptr;
  ParamType type = ParamType::Acc;
  int64_t sample_stride = 0;

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
__device__ __forceinline__ MeanRstd<T> warp_broadcast(MeanRstd<T> v) {
  return {warp_broadcast(v.mean), warp_broadcast(v.rstd)};
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
  // Orders the team's shared-memory writes before its reads.
  __device__ void sync() const {
    if constexpr (kLanes == 32) {
      __syncwarp();
    } else {
      __syncthreads();
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
  int64_t head = 0, packs = 0;
  int rank = 0;

  __device__ void load(const scalar_t* p, int64_t len, int team_rank) {
    rank = team_rank;
    head = ((16 - misalignment(p)) % 16) / static_cast<int64_t>(sizeof(scalar_t));
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

  // Calls f(i, Width<W>, values) for this thread's values: the head and the
  // tail value (W = 1) and each pack (W = kW), i the span index of the first.
  template <typename F>
  __device__ __forceinline__ void for_each_held(F&& f) const {
    if (has_head) f(static_cast<int64_t>(rank), Width<1>{}, reinterpret_cast<const acc_t(&)[1]>(head_value));
#pragma unroll
    for (int it = 0; it < kPacks; ++it) {
      const int64_t k = rank + static_cast<int64_t>(it) * kLanes;
      if (k < packs) f(head + k * kW, Width<kW>{}, v[it]);
    }
    if (has_tail) {
      f(head + packs * kW + rank, Width<1>{}, reinterpret_cast<const acc_t(&)[1]>(tail_value));
    }
  }

  // This thread's sum of f(value).
  template <typename F>
  __device__ Sum2<acc_t> sums(F&& f) const {
    Sum2<acc_t> s{acc_t(0), acc_t(0)};
    for_each_held([&](int64_t, auto width, const auto& values) {
#pragma unroll
      for (int j = 0; j < decltype(width)::value; ++j) {
        const Sum2<acc_t> t = f(values[j]);
        s.a += t.a;
        s.b += t.b;
      }
    });
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
