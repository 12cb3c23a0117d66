// CUDA GroupNorm device code, part 1 of 3: types, the part plan, block and
// warp helpers, per-value operations. Part 2 (group_norm_stats.cuh): the
// statistics kernels; part 3 (group_norm_launch.cuh): the elementwise and
// gradient kernels and the launch sequence.
//
// nvcc compiles these headers into the op (group_norm_cuda.cu); g++ compiles
// them into the CPU simulator test (tests/cuda_sim/), which includes its
// simulator first and defines GNFLEX_CUDA_SIM. Both run the same kernels
// through the same launch sequence (launch_forward / launch_backward), so the
// simulator checks exactly what a GPU runs, minus timing and memory-model
// effects.
//
// The numerical scheme is gn_math.h's, as on the CPU:
//   forward:  per-(n, part, c) exact chunk stats (chunk mean, then sums of
//             d = x - mean and d^2 about it) -> per-group Chan merge in a fixed
//             order -> mean P (rounded), rstd, per-(n, c) scale/shift
//             -> y = act((x - P) * scale + shift)
//   backward: the saved mean is the pivot; groups with a large |mean| / std
//             recompute their stats for the exact residual; per-(n, part, c)
//             sums of g * (x - P) and g, g = dy * act'(z) -> per-group dx
//             coefficients, dweight, dbias -> dx = g_coef * g + x_coef * (x - P) + bias_coef
// A "part" is a fixed range of spatial positions, so a large group is spread
// over many blocks and partial results merge in index order: no atomics,
// bitwise reproducible results.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../gn_math.h"

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
#define GNFLEX_LAUNCH(kernel, grid, block, stream, ...)     \
  do {                                                      \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                         \
  } while (0)
#endif

namespace gnflex {
namespace cuda {

using math::WelfordStats;

constexpr int kThreads = 256;
// Spatial positions per part: a channels-first block reads kSpan values of one
// plane; a channels-last block reads kSpan / C rows (at least one).
constexpr int64_t kSpan = 4096;

template <typename T>
using acc_type = at::opmath_type<T>;

// Per-(n, c) coefficients. The forward uses pivot/scale/shift; the backward all.
template <typename T>
struct ChannelCoefs {
  T pivot;     // the group's mean rounded to T
  T scale;
  T shift;
  T g_coef;
  T x_coef;
  T bias_coef;
  T residual;  // mean - pivot (0 in the backward unless recomputed)
};

template <typename T>
struct Sum2 {
  T a;
  T b;
};

// WelfordStats of one (n, part, c) chunk; its count follows from the plan.
template <typename T>
struct ChunkStats {
  T center;
  T offset;
  T m2;
};

// How the work is cut into blocks. Channels-first: a block reads part
// `part` (span values) of one plane. Channels-last: a block reads span rows
// of one sample for one tile of tile_width channels (tiles per row), so a
// block covers ~kSpan values whatever C is, and per-block loads of the
// channels' coefficients and writes of partial results amortize over many
// rows. Partial results live at [(n * parts + part) * C + c] in both layouts.
struct PartPlan {
  int64_t span;
  int64_t parts;
  int64_t tiles = 1;
  int64_t tile_width = 0;

  __host__ __device__ int64_t count(int64_t part, int64_t HxW) const {
    const int64_t begin = part * span;
    return HxW - begin < span ? HxW - begin : span;
  }
};

inline PartPlan make_plan(const GroupNormShape& s, Layout layout) {
  const auto parts_of = [&](int64_t span) { return s.HxW == 0 ? 0 : (s.HxW + span - 1) / span; };
  if (layout == Layout::ChannelsFirst) return {kSpan, parts_of(kSpan)};
  const int64_t C = std::max<int64_t>(s.C, 1);
  const int64_t tiles = (C + kThreads - 1) / kThreads;
  const int64_t width = ((C + tiles - 1) / tiles + 31) / 32 * 32;  // <= kThreads, whole warps
  // A thread then holds at most ceil(span / (kThreads / width)) <= 25 rows
  // (chunk_stats_cl_kernel keeps them in registers).
  const int64_t span = std::max<int64_t>(1, kSpan / width);
  return {span, parts_of(span), tiles, width};
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

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
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
// (a plane's coefficients, whether a group needs its statistics) are loaded
// by thread 0 and broadcast, so they are read from global memory once.
template <typename T>
__device__ T block_broadcast(T v) {
  __shared__ T value;
  if (threadIdx.x == 0) value = v;
  __syncthreads();
  const T result = value;
  __syncthreads();  // a later call may overwrite value
  return result;
}

// 16-byte pack of scalars for vector loads/stores.
template <typename scalar_t>
struct PackTraits {
  static constexpr int kSize = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
  struct alignas(16) Pack {
    scalar_t v[kSize];
  };
};

template <int N>
using Width = std::integral_constant<int, N>;

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_values(const scalar_t* p, acc_t (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<acc_t>(gload(p));
  } else {
    using Pack = typename PackTraits<scalar_t>::Pack;
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
    Pack pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = static_cast<scalar_t>(in[k]);
    gstore(reinterpret_cast<Pack*>(p), pack);
  }
}

__device__ __forceinline__ int misalignment(const void* p) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16);
}

// Calls f(i, Width<W>) over a span of len values so that every call with
// W > 1 starts at a 16-byte aligned address of every pointer. Vector steps
// only when all pointers share the same misalignment; scalar otherwise.
template <typename scalar_t, typename F>
__device__ void for_each_in_span(int64_t len, const scalar_t* first, bool same_alignment, F&& f) {
  constexpr int kV = PackTraits<scalar_t>::kSize;
  if constexpr (kV == 1) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) f(i, Width<1>{});
  } else {
    if (!same_alignment) {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) f(i, Width<1>{});
      return;
    }
    int64_t head = ((16 - misalignment(first)) % 16) / static_cast<int64_t>(sizeof(scalar_t));
    head = head < len ? head : len;
    const int64_t packs = (len - head) / kV;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, Width<1>{});
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) f(head + k * kV, Width<kV>{});
    for (int64_t i = head + packs * kV + threadIdx.x; i < len; i += blockDim.x) f(i, Width<1>{});
  }
}

// A span of at most kSpan values held in registers by the block's threads,
// so a second pass over it (the centered sums of the statistics) costs no
// memory traffic: per thread at most kPacks 16-byte packs (fixed slots, so
// they stay in registers) plus one value of the unaligned head and tail.
template <typename scalar_t, typename acc_t>
struct SpanValues {
  static constexpr int kW = PackTraits<scalar_t>::kSize;
  static constexpr int kPacks = static_cast<int>(kSpan / (kThreads * kW));
  static_assert(kPacks >= 1 && kSpan % (kThreads * kW) == 0, "whole packs per thread");
  acc_t v[kPacks][kW];
  acc_t head_value = acc_t(0), tail_value = acc_t(0);
  bool has_head = false, has_tail = false;
  int64_t packs = 0;

  __device__ void load(const scalar_t* p, int64_t len) {
    int64_t head = ((16 - misalignment(p)) % 16) / static_cast<int64_t>(sizeof(scalar_t));
    head = head < len ? head : len;
    packs = (len - head) / kW;
    const int64_t tail = len - head - packs * kW;
    has_head = threadIdx.x < head;
    has_tail = threadIdx.x < tail;
    if (has_head) head_value = static_cast<acc_t>(gload(p + threadIdx.x));
    if (has_tail) tail_value = static_cast<acc_t>(gload(p + head + packs * kW + threadIdx.x));
#pragma unroll
    for (int it = 0; it < kPacks; ++it) {
      const int64_t k = threadIdx.x + static_cast<int64_t>(it) * kThreads;
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
      if (threadIdx.x + static_cast<int64_t>(it) * kThreads < packs) {
#pragma unroll
        for (int j = 0; j < kW; ++j) add(v[it][j]);
      }
    }
    if (has_tail) add(tail_value);
    return s;
  }
};

// What a channels-first block reads: part `part` of plane `plane` (= n * C + c).
struct PlaneSpan {
  int64_t plane;
  int64_t part;
  int64_t offset;
  int64_t len;
};

__device__ __forceinline__ PlaneSpan plane_span(const GroupNormShape& s, const PartPlan& plan) {
  const int64_t plane = blockIdx.x / plan.parts;
  const int64_t part = blockIdx.x % plan.parts;
  return {plane, part, plane * s.HxW + part * plan.span, plan.count(part, s.HxW)};
}

// What a channels-last block reads: rows [row_begin, row_end) of sample n,
// channels [c_begin, c_begin + tile_width) (those below C).
struct RowSpan {
  int64_t n;
  int64_t part;
  int64_t row_begin;
  int64_t row_end;
  int64_t c_begin;
};

__device__ __forceinline__ RowSpan row_span(const GroupNormShape& s, const PartPlan& plan) {
  const int64_t tile = blockIdx.x % plan.tiles;
  const int64_t n = blockIdx.x / plan.tiles / plan.parts;
  const int64_t part = blockIdx.x / plan.tiles % plan.parts;
  const int64_t row_begin = part * plan.span;
  return {n, part, row_begin, row_begin + plan.count(part, s.HxW), tile * plan.tile_width};
}

// Channels-last block shape: threads along the tile's channels (x), rows (y);
// threads with ty >= height are idle.
struct RowTile {
  int tx;
  int ty;
  int width;
  int height;
};

__device__ __forceinline__ RowTile row_tile(const PartPlan& plan) {
  const int width = static_cast<int>(plan.tile_width);
  return {static_cast<int>(threadIdx.x) % width, static_cast<int>(threadIdx.x) / width, width,
          kThreads / width};
}

// The coefficients an operation reads: pivot, scale and shift, and with
// kInputGrad also the dx coefficients (a GPU loads only the fields used).
template <bool kInputGrad, typename acc_t>
__device__ __forceinline__ ChannelCoefs<acc_t> load_coefs(const ChannelCoefs<acc_t>* p) {
  ChannelCoefs<acc_t> k{gload(&p->pivot), gload(&p->scale), gload(&p->shift), acc_t(0), acc_t(0),
                        acc_t(0), acc_t(0)};
  if constexpr (kInputGrad) {
    k.g_coef = gload(&p->g_coef);
    k.x_coef = gload(&p->x_coef);
    k.bias_coef = gload(&p->bias_coef);
  }
  return k;
}

// Whether the statistics of group ng are computed: always in the forward
// (mean == nullptr), in the backward only where the residual matters.
template <typename acc_t>
__device__ __forceinline__ bool wants_stats(const acc_t* mean, const acc_t* rstd, int64_t ng) {
  return mean == nullptr || math::needs_exact_residual(gload(mean + ng), gload(rstd + ng));
}

// ---- per-value operations ----------------------------------------------------
// Backward sums: g * d and g, d = x - pivot, g = dy * act'(z).
template <Activation A>
struct GradSumsOp {
  template <typename acc_t>
  __device__ static Sum2<acc_t> apply(acc_t x, acc_t dy, const ChannelCoefs<acc_t>& k) {
    const acc_t d = x - k.pivot;
    acc_t g = dy;
    if constexpr (A != Activation::None) g = dy * math::activate_grad<A>(d * k.scale + k.shift);
    return {g * d, g};
  }
};

// Forward output.
template <Activation A>
struct ForwardOp {
  static constexpr bool kUsesGrad = false;
  template <typename acc_t>
  __device__ static acc_t apply(acc_t x, acc_t /*dy*/, const ChannelCoefs<acc_t>& k) {
    return math::activate<A>((x - k.pivot) * k.scale + k.shift);
  }
};

// Input gradient.
template <Activation A>
struct InputGradOp {
  static constexpr bool kUsesGrad = true;
  template <typename acc_t>
  __device__ static acc_t apply(acc_t x, acc_t dy, const ChannelCoefs<acc_t>& k) {
    const Sum2<acc_t> gd = GradSumsOp<A>::apply(x, dy, k);  // {g * d, g}
    return k.g_coef * gd.b + k.x_coef * (x - k.pivot) + k.bias_coef;
  }
};

}  // namespace cuda
}  // namespace gnflex
