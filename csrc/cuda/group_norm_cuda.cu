// CUDA GroupNorm forward and backward.
//
// The same scheme as the CPU kernels (see cpu/kernels_impl.h), on the math of
// gn_math.h:
//   forward:  pivots -> per-(n, part, c) sums of (x - pivot) and its square
//             -> per-group Welford merge in a fixed order -> mean, rstd,
//             per-(n, c) scale/shift -> y = act((x - pivot) * scale + shift)
//   backward: per-(n, part, c) sums of g * (x - pivot) and g, g = dy * act'(z)
//             -> per-group dx coefficients, dweight, dbias
//             -> dx = g_coef * g + x_coef * (x - pivot) + bias_coef
// A "part" is a fixed range of spatial positions, so a large group is spread
// over many blocks (the whole GPU works when N * G is small) and partial sums
// are merged in index order: no atomics, bitwise reproducible results.
//
// Layouts: channels-first spans are read with 16-byte vector loads where the
// pointers allow it (scalar head and tail otherwise); channels-last rows are
// read with consecutive threads on consecutive channels (coalesced).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../gn_math.h"
#include "../group_norm_utils.h"

namespace gnflex {
namespace cuda {
namespace {

using math::WelfordStats;

constexpr int kThreads = 256;
// Spatial positions per part: a channels-first block reads kSpan values of one
// plane; a channels-last block reads kSpan / C rows (at least one).
constexpr int64_t kSpan = 4096;

template <typename T>
using acc_type = at::opmath_type<T>;

// Per-(n, c) coefficients. Forward uses the first three; backward all six.
template <typename T>
struct ChannelCoefs {
  T pivot;
  T scale;
  T shift;
  T g_coef;
  T x_coef;
  T bias_coef;
};

template <typename T>
struct Sum2 {
  T a;
  T b;
};

// How the spatial positions are cut into parts; partial sums live at
// [(n * parts + part) * C + c] for both layouts.
struct PartPlan {
  int64_t span;
  int64_t parts;

  __host__ __device__ int64_t count(int64_t part, int64_t HxW) const {
    const int64_t begin = part * span;
    return HxW - begin < span ? HxW - begin : span;
  }
};

PartPlan make_plan(const GroupNormShape& s, Layout layout) {
  const int64_t span =
      layout == Layout::ChannelsFirst ? kSpan : std::max<int64_t>(1, kSpan / std::max<int64_t>(s.C, 1));
  return {span, s.HxW == 0 ? 0 : (s.HxW + span - 1) / span};
}

// ---- device helpers --------------------------------------------------------
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
    out[0] = static_cast<acc_t>(*p);
  } else {
    using Pack = typename PackTraits<scalar_t>::Pack;
    const Pack pack = *reinterpret_cast<const Pack*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<acc_t>(pack.v[k]);
  }
}

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_values(scalar_t* p, const acc_t (&in)[N]) {
  if constexpr (N == 1) {
    *p = static_cast<scalar_t>(in[0]);
  } else {
    using Pack = typename PackTraits<scalar_t>::Pack;
    Pack pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = static_cast<scalar_t>(in[k]);
    *reinterpret_cast<Pack*>(p) = pack;
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

// What a channels-last block reads: rows [row_begin, row_end) of sample n.
struct RowSpan {
  int64_t n;
  int64_t part;
  int64_t row_begin;
  int64_t row_end;
};

__device__ __forceinline__ RowSpan row_span(const GroupNormShape& s, const PartPlan& plan) {
  const int64_t n = blockIdx.x / plan.parts;
  const int64_t part = blockIdx.x % plan.parts;
  const int64_t row_begin = part * plan.span;
  return {n, part, row_begin, row_begin + plan.count(part, s.HxW)};
}

// Channels-last block shape: threads along channels (x), rows (y).
struct RowTile {
  int tx;
  int ty;
  int width;
  int height;
};

__device__ __forceinline__ RowTile row_tile(int64_t C) {
  const int width = C >= kThreads ? kThreads : static_cast<int>((C + 31) / 32 * 32);
  return {static_cast<int>(threadIdx.x) % width, static_cast<int>(threadIdx.x) / width, width,
          kThreads / width};
}

// ---- per-value operations ----------------------------------------------------
// Statistics: sums of d and d^2, d = x - pivot.
struct StatsOp {
  static constexpr bool kUsesGrad = false;
  template <typename acc_t>
  __device__ static Sum2<acc_t> apply(acc_t x, acc_t /*dy*/, const ChannelCoefs<acc_t>& k) {
    const acc_t d = x - k.pivot;
    return {d, d * d};
  }
};

// Backward sums: g * d and g, g = dy * act'(z).
template <Activation A>
struct GradSumsOp {
  static constexpr bool kUsesGrad = true;
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
    const acc_t d = x - k.pivot;
    return k.g_coef * gd.b + k.x_coef * d + k.bias_coef;
  }
};

// ---- kernels -------------------------------------------------------------------
// Pivot (first value of the group) per (n, c); with mean/rstd given (backward)
// also the forward's scale and shift, to recompute the activation input.
template <typename scalar_t, typename acc_t>
__global__ void channel_coefs_kernel(const scalar_t* __restrict__ x, GroupNormShape s, Layout layout,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                     const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                     ChannelCoefs<acc_t>* __restrict__ coefs) {
  const int64_t nc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (nc >= s.N * s.C) return;
  const int64_t n = nc / s.C;
  const int64_t c = nc % s.C;
  const int64_t Cg = s.channels_per_group();
  const int64_t first_channel = c / Cg * Cg;
  acc_t pivot = acc_t(0);
  if (s.HxW > 0) {
    const int64_t offset = layout == Layout::ChannelsFirst ? (n * s.C + first_channel) * s.HxW
                                                           : n * s.HxW * s.C + first_channel;
    pivot = static_cast<acc_t>(x[offset]);
  }
  ChannelCoefs<acc_t> k{pivot, acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  if (mean != nullptr) {
    const int64_t ng = n * s.G + c / Cg;
    const auto affine = math::fold_affine(mean[ng] - pivot, rstd[ng], weight[c], bias[c]);
    k.scale = affine.scale;
    k.shift = affine.shift;
  }
  coefs[nc] = k;
}

// Channels-first partial sums: one block per (plane, part).
template <typename Op, typename scalar_t, typename acc_t>
__global__ void partial_sums_cf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                       GroupNormShape s, PartPlan plan,
                                       const ChannelCoefs<acc_t>* __restrict__ coefs,
                                       Sum2<acc_t>* __restrict__ partial) {
  const PlaneSpan span = plane_span(s, plan);
  const scalar_t* xs = x + span.offset;
  const scalar_t* dys = Op::kUsesGrad ? dy + span.offset : xs;
  const ChannelCoefs<acc_t> k = coefs[span.plane];
  Sum2<acc_t> sum{acc_t(0), acc_t(0)};
  for_each_in_span(span.len, xs, misalignment(xs) == misalignment(dys), [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    acc_t xv[W], dv[W];
    load_values<W>(xs + i, xv);
    if constexpr (Op::kUsesGrad) {
      load_values<W>(dys + i, dv);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const Sum2<acc_t> t = Op::apply(xv[j], Op::kUsesGrad ? dv[j] : acc_t(0), k);
      sum.a += t.a;
      sum.b += t.b;
    }
  });
  sum = block_sum2(sum);
  if (threadIdx.x == 0) {
    const int64_t n = span.plane / s.C;
    const int64_t c = span.plane % s.C;
    partial[(n * plan.parts + span.part) * s.C + c] = sum;
  }
}

// Channels-last partial sums: one block per (n, part); threads on channels.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void partial_sums_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                       GroupNormShape s, PartPlan plan,
                                       const ChannelCoefs<acc_t>* __restrict__ coefs,
                                       Sum2<acc_t>* __restrict__ partial) {
  __shared__ Sum2<acc_t> tile_sums[kThreads];
  const RowSpan rows = row_span(s, plan);
  const int64_t n = rows.n;
  const RowTile t = row_tile(s.C);
  for (int64_t c0 = 0; c0 < s.C; c0 += t.width) {
    const int64_t c = c0 + t.tx;
    Sum2<acc_t> sum{acc_t(0), acc_t(0)};
    if (c < s.C && t.ty < t.height) {
      const ChannelCoefs<acc_t> k = coefs[n * s.C + c];
      for (int64_t r = rows.row_begin + t.ty; r < rows.row_end; r += t.height) {
        const int64_t idx = (n * s.HxW + r) * s.C + c;
        const acc_t dv = Op::kUsesGrad ? static_cast<acc_t>(dy[idx]) : acc_t(0);
        const Sum2<acc_t> v = Op::apply(static_cast<acc_t>(x[idx]), dv, k);
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
      partial[(n * plan.parts + rows.part) * s.C + c] = total;
    }
    __syncthreads();
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
  const ChannelCoefs<acc_t> k = coefs[span.plane];
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

// Channels-last elementwise output: one block per (n, part); threads on channels.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void apply_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                scalar_t* __restrict__ out, GroupNormShape s, PartPlan plan,
                                const ChannelCoefs<acc_t>* __restrict__ coefs) {
  const RowSpan rows = row_span(s, plan);
  const int64_t n = rows.n;
  const RowTile t = row_tile(s.C);
  if (t.ty >= t.height) return;
  for (int64_t c = t.tx; c < s.C; c += t.width) {
    const ChannelCoefs<acc_t> k = coefs[n * s.C + c];
    for (int64_t r = rows.row_begin + t.ty; r < rows.row_end; r += t.height) {
      const int64_t idx = (n * s.HxW + r) * s.C + c;
      const acc_t dv = Op::kUsesGrad ? static_cast<acc_t>(dy[idx]) : acc_t(0);
      out[idx] = static_cast<scalar_t>(Op::apply(static_cast<acc_t>(x[idx]), dv, k));
    }
  }
}

// Merges the Welford stats of the 32 lanes in a fixed tree; the result is
// valid in lane 0.
template <typename acc_t>
__device__ WelfordStats<acc_t> warp_welford_merge(WelfordStats<acc_t> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    WelfordStats<acc_t> other;
    other.count = __shfl_down_sync(0xffffffffu, s.count, offset);
    other.mean = __shfl_down_sync(0xffffffffu, s.mean, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
    s = math::welford_combine(s, other);
  }
  return s;
}

// Forward statistics: one warp per (n, g). Lane l merges the group's partial
// sums l, l + 32, ... (over parts x channels) in order, the lanes merge in a
// fixed tree; then mean/rstd and the channels' scale/shift are written.
template <typename acc_t>
__global__ void forward_finalize_kernel(GroupNormShape s, PartPlan plan, acc_t eps,
                                        const Sum2<acc_t>* __restrict__ partial,
                                        const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                        ChannelCoefs<acc_t>* __restrict__ coefs, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ rstd) {
  const int64_t ng = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= s.N * s.G) return;  // uniform per warp
  const int64_t n = ng / s.G;
  const int64_t Cg = s.channels_per_group();
  const int64_t c_begin = ng % s.G * Cg;
  WelfordStats<acc_t> stats;
  for (int64_t item = lane; item < plan.parts * Cg; item += 32) {
    const int64_t part = item / Cg;
    const Sum2<acc_t> p = partial[(n * plan.parts + part) * s.C + c_begin + item % Cg];
    stats = math::welford_combine(stats, math::welford_from_sums(plan.count(part, s.HxW), p.a, p.b));
  }
  stats = warp_welford_merge(stats);
  // Broadcast lane 0's result.
  stats.count = __shfl_sync(0xffffffffu, stats.count, 0);
  stats.mean = __shfl_sync(0xffffffffu, stats.mean, 0);
  stats.m2 = __shfl_sync(0xffffffffu, stats.m2, 0);
  const acc_t pivot = coefs[n * s.C + c_begin].pivot;
  const acc_t r = math::rstd_from_stats(stats, eps);
  if (lane == 0) {
    mean[ng] = pivot + stats.mean;
    rstd[ng] = r;
  }
  for (int64_t c = c_begin + lane; c < c_begin + Cg; c += 32) {
    const auto affine = math::fold_affine(stats.mean, r, weight[c], bias[c]);
    coefs[n * s.C + c].scale = affine.scale;
    coefs[n * s.C + c].shift = affine.shift;
  }
}

// Backward: one warp per (n, g). Per channel the lanes sum the parts (kept
// for the parameter gradients); then the group's dx coefficients.
template <typename acc_t>
__global__ void backward_finalize_kernel(GroupNormShape s, PartPlan plan,
                                         const Sum2<acc_t>* __restrict__ partial,
                                         const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                         const acc_t* __restrict__ weight,
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
      const Sum2<acc_t> p = partial[(n * plan.parts + part) * s.C + c];
      total.a += p.a;
      total.b += p.b;
    }
    total.a = warp_sum(total.a);
    total.b = warp_sum(total.b);
    if (lane == 0) {
      channel_sums[n * s.C + c] = total;
      sum_gwx += weight[c] * total.a;
      sum_gw += weight[c] * total.b;
    }
  }
  const acc_t r = rstd[ng];
  const acc_t mean_shift = mean[ng] - coefs[n * s.C + c_begin].pivot;
  auto dx = math::input_grad_coefs(sum_gwx, sum_gw, mean_shift, r, s.group_size());
  dx.x_coef = __shfl_sync(0xffffffffu, dx.x_coef, 0);
  dx.bias_coef = __shfl_sync(0xffffffffu, dx.bias_coef, 0);
  for (int64_t c = c_begin + lane; c < c_begin + Cg; c += 32) {
    coefs[n * s.C + c].g_coef = r * weight[c];
    coefs[n * s.C + c].x_coef = dx.x_coef;
    coefs[n * s.C + c].bias_coef = dx.bias_coef;
  }
}

// dweight[c], dbias[c]: one thread per channel sums over samples in order.
template <typename acc_t>
__global__ void param_grad_kernel(GroupNormShape s, const Sum2<acc_t>* __restrict__ channel_sums,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                  const ChannelCoefs<acc_t>* __restrict__ coefs,
                                  acc_t* __restrict__ dweight, acc_t* __restrict__ dbias) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= s.C) return;
  const int64_t g = c / s.channels_per_group();
  acc_t dw = acc_t(0), db = acc_t(0);
  for (int64_t n = 0; n < s.N; ++n) {
    const Sum2<acc_t> sums = channel_sums[n * s.C + c];
    const int64_t ng = n * s.G + g;
    dw += math::weight_grad_term(sums.a, sums.b, mean[ng] - coefs[n * s.C + c].pivot, rstd[ng]);
    db += sums.b;
  }
  dweight[c] = dw;
  dbias[c] = db;
}

// ---- launch helpers -----------------------------------------------------------
// Grid size for `blocks` blocks (1D grids allow up to 2^31 - 1).
dim3 grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "gnflex.group_norm (CUDA): input too large (",
              blocks, " blocks needed)");
  return dim3(static_cast<unsigned int>(blocks));
}

// Grid with one thread per item.
dim3 blocks_for(int64_t items) { return grid((items + kThreads - 1) / kThreads); }

template <typename Op, typename scalar_t, typename acc_t>
void launch_partial_sums(const scalar_t* x, const scalar_t* dy, const GroupNormShape& s, Layout layout,
                         const PartPlan& plan, const ChannelCoefs<acc_t>* coefs, Sum2<acc_t>* partial,
                         cudaStream_t stream) {
  if (plan.parts == 0 || s.N * s.C == 0) return;
  if (layout == Layout::ChannelsFirst) {
    partial_sums_cf_kernel<Op><<<grid(s.N * s.C * plan.parts), kThreads, 0, stream>>>(x, dy, s, plan, coefs,
                                                                                 partial);
  } else {
    partial_sums_cl_kernel<Op><<<grid(s.N * plan.parts), kThreads, 0, stream>>>(x, dy, s, plan, coefs, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op, typename scalar_t, typename acc_t>
void launch_apply(const scalar_t* x, const scalar_t* dy, scalar_t* out, const GroupNormShape& s,
                  Layout layout, const PartPlan& plan, const ChannelCoefs<acc_t>* coefs,
                  cudaStream_t stream) {
  if (plan.parts == 0 || s.N * s.C == 0) return;
  if (layout == Layout::ChannelsFirst) {
    apply_cf_kernel<Op><<<grid(s.N * s.C * plan.parts), kThreads, 0, stream>>>(x, dy, out, s, plan, coefs);
  } else {
    apply_cl_kernel<Op><<<grid(s.N * plan.parts), kThreads, 0, stream>>>(x, dy, out, s, plan, coefs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor coef_table(int64_t planes, at::ScalarType acc_dtype, const at::Tensor& like) {
  // ChannelCoefs<acc_t> is six acc_t values.
  return at::empty({planes, 6}, like.options().dtype(acc_dtype));
}

// ---- ops -------------------------------------------------------------------------
TensorTriple group_norm_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                             c10::string_view activation) {
  c10::cuda::CUDAGuard device_guard(input.device());
  ForwardSetup f = setup_forward(input, weight, bias, num_groups, eps, activation);
  const GroupNormShape& s = f.shape;
  if (s.N * s.C == 0) return {f.y, f.mean, f.rstd};
  const auto acc_dtype = acc_dtype_for(f.x.scalar_type());
  const PartPlan plan = make_plan(s, f.layout);
  at::Tensor coefs = coef_table(s.N * s.C, acc_dtype, f.x);
  at::Tensor partial = at::empty({std::max<int64_t>(1, s.N * plan.parts * s.C), 2}, f.x.options().dtype(acc_dtype));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "gnflex_group_norm_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_ptr = f.x.const_data_ptr<scalar_t>();
    auto* coef_ptr = reinterpret_cast<ChannelCoefs<acc_t>*>(coefs.data_ptr<acc_t>());
    auto* partial_ptr = reinterpret_cast<Sum2<acc_t>*>(partial.data_ptr<acc_t>());
    const acc_t* w_ptr = f.weight.const_data_ptr<acc_t>();
    const acc_t* b_ptr = f.bias.const_data_ptr<acc_t>();

    channel_coefs_kernel<<<blocks_for(s.N * s.C), kThreads, 0, stream>>>(
        x_ptr, s, f.layout, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr), w_ptr,
        b_ptr, coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_partial_sums<StatsOp>(x_ptr, x_ptr, s, f.layout, plan, coef_ptr, partial_ptr, stream);
    forward_finalize_kernel<<<blocks_for(s.N * s.G * 32), kThreads, 0, stream>>>(
        s, plan, static_cast<acc_t>(eps), partial_ptr, w_ptr, b_ptr, coef_ptr, f.mean.data_ptr<acc_t>(),
        f.rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_activation(f.activation, [&](auto a) {
      launch_apply<ForwardOp<decltype(a)::value>>(x_ptr, x_ptr, f.y.data_ptr<scalar_t>(), s, f.layout,
                                                  plan, coef_ptr, stream);
    });
  });
  return {f.y, f.mean, f.rstd};
}

TensorTriple group_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                      c10::string_view activation, std::array<bool, 3> output_mask) {
  c10::cuda::CUDAGuard device_guard(input.device());
  BackwardSetup bs = setup_backward(grad_out, input, mean, rstd, weight, bias, num_groups, activation,
                                    output_mask);
  const GroupNormShape& s = bs.shape;
  if (s.N * s.C == 0) return backward_result(bs, weight, input, output_mask);
  const auto acc_dtype = acc_dtype_for(bs.x.scalar_type());
  const PartPlan plan = make_plan(s, bs.layout);
  at::Tensor coefs = coef_table(s.N * s.C, acc_dtype, bs.x);
  at::Tensor partial = at::empty({std::max<int64_t>(1, s.N * plan.parts * s.C), 2}, bs.x.options().dtype(acc_dtype));
  at::Tensor channel_sums = at::empty({s.N * s.C, 2}, bs.x.options().dtype(acc_dtype));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs.x.scalar_type(), "gnflex_group_norm_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_ptr = bs.x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = bs.dy.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = bs.mean.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = bs.rstd.const_data_ptr<acc_t>();
    const acc_t* w_ptr = bs.weight.const_data_ptr<acc_t>();
    auto* coef_ptr = reinterpret_cast<ChannelCoefs<acc_t>*>(coefs.data_ptr<acc_t>());
    auto* partial_ptr = reinterpret_cast<Sum2<acc_t>*>(partial.data_ptr<acc_t>());
    auto* sums_ptr = reinterpret_cast<Sum2<acc_t>*>(channel_sums.data_ptr<acc_t>());

    channel_coefs_kernel<<<blocks_for(s.N * s.C), kThreads, 0, stream>>>(
        x_ptr, s, bs.layout, mean_ptr, rstd_ptr, w_ptr, bs.bias.const_data_ptr<acc_t>(), coef_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_activation(bs.activation, [&](auto a) {
      launch_partial_sums<GradSumsOp<decltype(a)::value>>(x_ptr, dy_ptr, s, bs.layout, plan, coef_ptr,
                                                          partial_ptr, stream);
    });
    backward_finalize_kernel<<<blocks_for(s.N * s.G * 32), kThreads, 0, stream>>>(
        s, plan, partial_ptr, mean_ptr, rstd_ptr, w_ptr, coef_ptr, sums_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (output_mask[1] || output_mask[2]) {
      param_grad_kernel<<<blocks_for(s.C), kThreads, 0, stream>>>(
          s, sums_ptr, mean_ptr, rstd_ptr, coef_ptr, bs.dweight.data_ptr<acc_t>(), bs.dbias.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[0]) {
      dispatch_activation(bs.activation, [&](auto a) {
        launch_apply<InputGradOp<decltype(a)::value>>(x_ptr, dy_ptr, bs.dx.data_ptr<scalar_t>(), s,
                                                      bs.layout, plan, coef_ptr, stream);
      });
    }
  });
  return backward_result(bs, weight, input, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(GNFLEX_OP_NAMESPACE, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace gnflex
