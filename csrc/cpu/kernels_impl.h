// CPU GroupNorm kernels, compiled once per CPU capability (DEFAULT, AVX2):
// group_norm_kernels.cpp and group_norm_kernels_avx2.cpp define
// CPU_CAPABILITY and include this file, so each copy of at::vec::Vectorized
// (namespace at::vec::CPU_CAPABILITY) and of these kernels (namespace
// gnflex::cpu::CPU_CAPABILITY) is distinct. group_norm_cpu.cpp picks one at run
// time from ATen's CPU capability.
//
// Data flow (both layouts; the numerical scheme is described in gn_math.h):
//   forward:  exact per-chunk stats (chunk mean, then sums about it), merged
//             per group -> mean P (rounded), rstd -> per-(n, c) scale/shift
//             -> y = act((x - P) * scale + shift)
//   backward: per-(n, c) sums of g and g * (x - P), g = dy * act'(z), P the
//             saved mean -> dweight, dbias and per-group dx coefficients
//             -> dx = a * g + x_coef * (x - P) + bias_coef
// Work is cut into fixed-size chunks (independent of the thread count) whose
// partial results are combined in index order, so every result is bitwise
// identical whatever at::get_num_threads() is.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/kernels_impl.h"
#endif

#include "vec_math.h"  // must precede gn_math.h (see there)

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "group_norm_kernels.h"

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using math::WelfordStats;

// Values per work item. Fixed so chunking never depends on the thread count.
constexpr int64_t kChunk = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the vectorized loop driver ------------------------------------------
// A step of the loop handles `count` values of type V: whole SIMD vectors of
// the accumulate type in the body, one scalar in the tail.
template <typename V>
constexpr int64_t lanes_of() {
  if constexpr (std::is_arithmetic_v<V>) {
    return 1;
  } else {
    return V::size();
  }
}

template <typename V, int Count>
struct Step {
  using type = V;
  static constexpr int count = Count;
  static constexpr int64_t lanes = lanes_of<V>();
};

// Runs body(i, Step) over [0, n): SIMD steps, then the scalar tail. The body
// is written once, generically in V. Every pass over a run (statistics,
// gradient sums, outputs) takes the same path for the same value, and kChunk
// is a multiple of the SIMD step, so cutting a run into chunks does not move
// the tail: SIMD and scalar math may round differently, and results must not
// depend on the schedule.
template <typename scalar_t, typename Body>
inline void simd_for(int64_t n, const Body& body) {
  using IO = VecIO<scalar_t>;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) body(i, Step<typename IO::Vec, IO::kVecs>{});
  for (; i < n; ++i) body(i, Step<typename IO::acc_t, 1>{});
}

template <typename scalar_t, typename V, int K>
inline void load_values(const scalar_t* p, V (&v)[K]) {
  if constexpr (std::is_arithmetic_v<V>) {
    v[0] = static_cast<V>(*p);
  } else {
    VecIO<scalar_t>::load(p, v);
  }
}

// stream: a non-temporal store where the vector is aligned (see stream_vector).
template <typename scalar_t, typename V, int K>
inline void store_values(scalar_t* p, const V (&v)[K], bool stream = false) {
  if constexpr (std::is_arithmetic_v<V>) {
    *p = static_cast<scalar_t>(v[0]);
  } else if (stream) {
    VecIO<scalar_t>::stream(p, v);
  } else {
    VecIO<scalar_t>::store(p, v);
  }
}

template <typename V, typename T>
inline void store_as(T* p, const V& v) {
  if constexpr (std::is_same_v<V, T>) {
    *p = v;
  } else {
    v.store(p);
  }
}

template <typename T>
inline T horizontal_sum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (T lane : lanes) s += lane;
  return s;
}

// Sums over [0, n) of two quantities produced by
// body(i, Step, sum_a, sum_b) (the body adds into V-typed accumulators).
// Four independent accumulator pairs in the main loop, so the adds do not
// wait on each other (one chain is bound by add latency, not bandwidth).
template <typename scalar_t, typename Body>
inline std::pair<acc_type<scalar_t>, acc_type<scalar_t>> simd_sum2(int64_t n, const Body& body) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using VecStep = Step<Vec, IO::kVecs>;
  constexpr int64_t kStep = IO::kStep;
  Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
  Vec b0(acc_t(0)), b1(acc_t(0)), b2(acc_t(0)), b3(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * kStep <= n; i += 4 * kStep) {
    body(i, VecStep{}, a0, b0);
    body(i + kStep, VecStep{}, a1, b1);
    body(i + 2 * kStep, VecStep{}, a2, b2);
    body(i + 3 * kStep, VecStep{}, a3, b3);
  }
  for (; i + kStep <= n; i += kStep) body(i, VecStep{}, a0, b0);
  acc_t sa = 0, sb = 0;
  for (; i < n; ++i) body(i, Step<acc_t, 1>{}, sa, sb);
  return {horizontal_sum((a0 + a1) + (a2 + a3)) + sa, horizontal_sum((b0 + b1) + (b2 + b3)) + sb};
}

// Per-channel accumulation of two quantities over one row of C channels:
// sum_a[c] += a(c), sum_b[c] += b(c), with body(i, Step) -> pair of V arrays.
template <typename scalar_t, typename Body>
inline void simd_accumulate_row(int64_t C, acc_type<scalar_t>* sum_a, acc_type<scalar_t>* sum_b,
                                const Body& body) {
  simd_for<scalar_t>(C, [&](int64_t i, auto step) {
    using S = decltype(step);
    using V = typename S::type;
    V a[S::count], b[S::count];
    body(i, step, a, b);
    for (int k = 0; k < S::count; ++k) {
      const int64_t j = i + k * S::lanes;
      store_as<V>(sum_a + j, load_as<V>(sum_a + j) + a[k]);
      store_as<V>(sum_b + j, load_as<V>(sum_b + j) + b[k]);
    }
  });
}

// ---- schedules ---------------------------------------------------------------
// Two schedules compute the same numbers (the same chunks, merged in the same
// order), so choosing between them never changes a result bit:
//   fused     one work item per group (channels-first) or per sample
//             (channels-last) computes its statistics and then its outputs
//             while its values are still in cache, so x (and dy) come from
//             memory once, as ATen does for NCHW;
//   two-pass  statistics over all chunks in parallel, then the elementwise
//             pass; for items too big for the cache or too few to keep every
//             thread busy (e.g. N = 1 with a handful of groups).
// The budgets (input bytes one fused item may touch: x, or x and dy in the
// backward; the streaming threshold) come from the machine's caches
// (cpu_tuning.cpp); GNFLEX_CPU_SCHEDULE can force either schedule.

// Whether to stream an output: big enough, and every run (a plane or a row)
// covering whole cache lines. A line written partly by streaming and partly
// by normal stores (a run boundary inside it) is far slower than either.
bool stream_output(const void* out, const GroupNormShape& s, Layout layout, int64_t elem_bytes,
                   const CpuTuning& tuning) {
  constexpr int64_t kLine = 64;
  const int64_t run = layout == Layout::ChannelsFirst ? s.HxW : s.C;
  return s.numel() * elem_bytes >= tuning.stream_output_bytes && run * elem_bytes % kLine == 0 &&
         reinterpret_cast<uintptr_t>(out) % kLine == 0;
}

// Fused when forced, or when the item fits the budget and there are enough
// items for every thread.
bool use_fused(int64_t items, int64_t item_bytes, int64_t budget, Schedule schedule) {
  if (schedule != Schedule::Auto) return schedule == Schedule::Fused;
  return item_bytes <= budget && items >= at::get_num_threads();
}

// Rows (spatial positions) of about kChunk values: the grain of channels-last
// elementwise passes.
int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1)); }

// Channels-last statistics and gradient sums accumulate per channel over
// blocks of rows, then sum the blocks pairwise. Blocks of up to ~16K values
// (the per-block work on C-sized arrays stays small next to the block's own)
// and of at most 64 rows: a channel's sums run down the rows one add after
// another, and a long chain after a spike loses its small terms (682 rows:
// 1e-6 of M2).
int64_t sum_rows_per_block(int64_t C) {
  return std::clamp<int64_t>(4 * kChunk / std::max<int64_t>(C, 1), 1, 64);
}

// ---- pivots -----------------------------------------------------------------
// Outputs are computed about each group's rounded mean P (the pivot): the
// (N * C) table of it per channel, from the (N * G) means.
template <typename T>
void fill_sample_pivots(const T* mean, const GroupNormShape& s, int64_t n, T* out) {
  const int64_t Cg = s.channels_per_group();
  for (int64_t c = 0; c < s.C; ++c) out[c] = mean[n * s.G + c / Cg];
}

template <typename T>
std::vector<T> channel_pivots(const T* mean, const GroupNormShape& s) {
  std::vector<T> pivots(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) fill_sample_pivots(mean, s, n, pivots.data() + n * s.C);
  return pivots;
}

// ---- statistics ------------------------------------------------------------
// The center of a chunk of n values is the mean of its first center_count(n):
// a quarter keeps M2's rounding within ~5 units for any data (see
// math::chunk_center) at a quarter of the first pass's cost, and those values
// are in L1 for the second pass anyway.
int64_t center_count(int64_t n) { return (n + 3) / 4; }

// Exact Welford stats of len contiguous values (one chunk, in L1 for the
// second pass): a center from its first values, then the sums of
// d = x - center and d^2.
template <typename scalar_t>
WelfordStats<acc_type<scalar_t>> chunk_stats(const scalar_t* p, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = center_count(len);
  const acc_t sum = simd_sum2<scalar_t>(m, [&](int64_t i, auto step, auto& a, auto& /*b*/) {
                      using S = decltype(step);
                      typename S::type v[S::count];
                      load_values(p + i, v);
                      for (int k = 0; k < S::count; ++k) a = a + v[k];
                    }).first;
  const acc_t center = math::chunk_center(m, sum);
  auto [sum_d, sum_d2] = simd_sum2<scalar_t>(len, [&](int64_t i, auto step, auto& a, auto& b) {
    using S = decltype(step);
    using V = typename S::type;
    V v[S::count];
    load_values(p + i, v);
    for (int k = 0; k < S::count; ++k) {
      const V d = v[k] - V(center);
      a = a + d;
      b = b + d * d;
    }
  });
  return math::welford_from_centered_sums(len, center, sum_d, sum_d2);
}

// Merges the stats of consecutive chunks, pushed in index order, as a
// balanced binary tree (pairwise summation): rounding grows with the log of
// the number of chunks instead of the number. A sequential merge of the
// 2^19 chunks of a 2^31-value group was off by 1e-4 relative in fp32. The
// tree's shape depends only on the count, so results stay reproducible.
template <typename T>
class PairwiseMerge {
 public:
  void push(WelfordStats<T> stats) {
    int level = 0;
    for (uint64_t n = pushed_; n & 1; n >>= 1, ++level) {
      stats = math::welford_combine(levels_[level], stats);  // levels_[level] holds earlier chunks
    }
    levels_[level] = stats;
    ++pushed_;
  }
  WelfordStats<T> result() const {
    WelfordStats<T> acc;
    for (int level = 0; level < 64; ++level) {
      if (pushed_ >> level & 1) acc = math::welford_combine(levels_[level], acc);
    }
    return acc;
  }

 private:
  WelfordStats<T> levels_[64];  // levels_[i]: merged run of 2^i chunks (if bit i of pushed_)
  uint64_t pushed_ = 0;
};

// A channels-first group: D contiguous values, chunk by chunk.
template <typename scalar_t>
WelfordStats<acc_type<scalar_t>> span_stats(const scalar_t* p, int64_t D) {
  PairwiseMerge<acc_type<scalar_t>> merge;
  for (int64_t start = 0; start < D; start += kChunk) {
    merge.push(chunk_stats(p + start, std::min(kChunk, D - start)));
  }
  return merge.result();
}

// Sums of arrays of `width` values pushed in index order, as a balanced
// binary tree (as PairwiseMerge): accurate over many row blocks, and the
// result depends only on the count.
template <typename T>
class PairwiseArraySum {
 public:
  explicit PairwiseArraySum(int64_t width) : width_(width), carry_(width) {}
  void push(const T* values) {
    if ((pushed_ & 1) == 0) {  // level 0 is free: no sum yet
      store(0, values);
      ++pushed_;
      return;
    }
    const T* first = levels_.data();
    for (int64_t i = 0; i < width_; ++i) carry_[i] = first[i] + values[i];
    int64_t level = 1;
    for (uint64_t n = pushed_ >> 1; n & 1; n >>= 1, ++level) {
      const T* earlier = levels_.data() + level * width_;
      for (int64_t i = 0; i < width_; ++i) carry_[i] = earlier[i] + carry_[i];
    }
    store(level, carry_.data());
    ++pushed_;
  }
  // The pairwise sum of `count` consecutive arrays of `width` values.
  static void sum_of(const T* parts, int64_t count, int64_t width, T* out) {
    PairwiseArraySum sum(width);
    for (int64_t i = 0; i < count; ++i) sum.push(parts + i * width);
    sum.result(out);
  }
  void result(T* out) const {
    std::fill(out, out + width_, T(0));
    for (int64_t level = 0; (pushed_ >> level) != 0; ++level) {
      if ((pushed_ >> level & 1) == 0) continue;
      const T* sum = levels_.data() + level * width_;
      for (int64_t i = 0; i < width_; ++i) out[i] = sum[i] + out[i];
    }
  }

 private:
  void store(int64_t level, const T* values) {
    if (static_cast<int64_t>(levels_.size()) < (level + 1) * width_) levels_.resize((level + 1) * width_);
    std::copy(values, values + width_, levels_.begin() + level * width_);
  }

  int64_t width_;
  std::vector<T> carry_;
  std::vector<T> levels_;  // level i: the sum of 2^i arrays (if bit i of pushed_)
  uint64_t pushed_ = 0;
};

// Channels-last: per-channel sums over rows [row0, row0 + rows) of one
// sample: of x (center == nullptr; out: C values), or of d = x - center[c]
// and d^2 (out: 2 * C values, the d sums first).
template <typename scalar_t>
void cl_block_sums(const scalar_t* sample, int64_t row0, int64_t rows, int64_t C,
                   const acc_type<scalar_t>* center, acc_type<scalar_t>* out) {
  using acc_t = acc_type<scalar_t>;
  if (center == nullptr) {
    std::fill(out, out + C, acc_t(0));
    for (int64_t r = row0; r < row0 + rows; ++r) {
      const scalar_t* row = sample + r * C;
      simd_for<scalar_t>(C, [&](int64_t i, auto step) {
        using S = decltype(step);
        using V = typename S::type;
        V v[S::count];
        load_values(row + i, v);
        for (int k = 0; k < S::count; ++k) {
          store_as<V>(out + i + k * S::lanes, load_as<V>(out + i + k * S::lanes) + v[k]);
        }
      });
    }
    return;
  }
  std::fill(out, out + 2 * C, acc_t(0));
  for (int64_t r = row0; r < row0 + rows; ++r) {
    const scalar_t* row = sample + r * C;
    simd_accumulate_row<scalar_t>(C, out, out + C, [&](int64_t i, auto step, auto& a, auto& b) {
      using S = decltype(step);
      using V = typename S::type;
      load_values(row + i, a);
      for (int k = 0; k < S::count; ++k) {
        a[k] = a[k] - load_as<V>(center + i + k * S::lanes);
        b[k] = a[k] * a[k];
      }
    });
  }
}

// Channels-last statistics of a sample, in two phases over row blocks:
//   centers  per-channel mean of the first center_count(HxW) rows (a subset
//            bounds M2's rounding as a whole-chunk mean would: see
//            math::chunk_center);
//   sums     per-channel sums of d = x - center and d^2 over all rows;
// block results are summed pairwise in row order, then each group's channels
// merge as equal parts (channels at different levels cost no accuracy). The
// fused schedule runs the blocks of a sample in order, the two-pass schedule
// in parallel; both sum the same blocks in the same order.
struct ClStatsPlan {
  int64_t block_rows, center_rows, center_blocks, blocks;
  int64_t rows_of(int64_t block, int64_t total_rows) const {
    return std::min(block_rows, total_rows - block * block_rows);
  }
};

ClStatsPlan cl_stats_plan(const GroupNormShape& s) {
  const int64_t block_rows = sum_rows_per_block(s.C);
  const int64_t center_rows = center_count(s.HxW);
  return {block_rows, center_rows, ceil_div(center_rows, block_rows), ceil_div(s.HxW, block_rows)};
}

// Scratch values per channel sample_stats needs.
constexpr int64_t kSampleStatsScratch = 5;

template <typename T>
void cl_stats_from_sums(const GroupNormShape& s, const T* center, const T* sums, WelfordStats<T>* out) {
  const int64_t Cg = s.channels_per_group();
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t c0 = g * Cg;
    out[g] = math::welford_from_equal_parts(Cg, s.HxW, center + c0, sums + c0, sums + s.C + c0);
  }
}

// Stats of every group of one channels-last sample (out[G]).
// scratch: kSampleStatsScratch * C values.
template <typename scalar_t>
void sample_stats(const scalar_t* sample, const GroupNormShape& s, acc_type<scalar_t>* scratch,
                  WelfordStats<acc_type<scalar_t>>* out) {
  using acc_t = acc_type<scalar_t>;
  const ClStatsPlan plan = cl_stats_plan(s);
  acc_t* center = scratch;
  acc_t* block = scratch + s.C;     // 2 * C
  acc_t* sums = scratch + 3 * s.C;  // 2 * C
  PairwiseArraySum<acc_t> center_sum(s.C);
  for (int64_t b = 0; b < plan.center_blocks; ++b) {
    cl_block_sums(sample, b * plan.block_rows, plan.rows_of(b, plan.center_rows), s.C,
                  static_cast<const acc_t*>(nullptr), block);
    center_sum.push(block);
  }
  center_sum.result(center);
  for (int64_t c = 0; c < s.C; ++c) center[c] = math::chunk_center(plan.center_rows, center[c]);
  PairwiseArraySum<acc_t> total(2 * s.C);
  for (int64_t b = 0; b < plan.blocks; ++b) {
    cl_block_sums(sample, b * plan.block_rows, plan.rows_of(b, s.HxW), s.C, center, block);
    total.push(block);
  }
  total.result(sums);
  cl_stats_from_sums(s, center, sums, out);
}

// Two-pass statistics: every chunk / row block in parallel, then merged
// pairwise in index order (as span_stats / sample_stats do).
template <typename scalar_t>
std::vector<WelfordStats<acc_type<scalar_t>>> group_stats(const scalar_t* x,
                                                          const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  using Stats = WelfordStats<acc_t>;
  const int64_t groups = s.N * s.G;
  std::vector<Stats> result(groups);
  if (s.HxW == 0 || groups == 0) return result;

  if (layout == Layout::ChannelsFirst) {
    const int64_t D = s.group_size();
    const int64_t chunks = ceil_div(D, kChunk);
    std::vector<Stats> partial(groups * chunks);
    at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t group = item / chunks;
        const int64_t start = item % chunks * kChunk;
        partial[item] = chunk_stats(x + group * D + start, std::min(kChunk, D - start));
      }
    });
    for (int64_t group = 0; group < groups; ++group) {
      PairwiseMerge<acc_t> merge;
      for (int64_t k = 0; k < chunks; ++k) merge.push(partial[group * chunks + k]);
      result[group] = merge.result();
    }
    return result;
  }

  const ClStatsPlan plan = cl_stats_plan(s);
  const int64_t C = s.C;
  // Phase 1: the first rows' per-channel sums, block by block, in parallel.
  std::vector<acc_t> center_parts(s.N * plan.center_blocks * C);
  at::parallel_for(0, s.N * plan.center_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item % plan.center_blocks;
      cl_block_sums(x + item / plan.center_blocks * s.HxW * C, b * plan.block_rows,
                    plan.rows_of(b, plan.center_rows), C, static_cast<const acc_t*>(nullptr),
                    center_parts.data() + item * C);
    }
  });
  std::vector<acc_t> centers(s.N * C);
  for (int64_t n = 0; n < s.N; ++n) {
    PairwiseArraySum<acc_t>::sum_of(center_parts.data() + n * plan.center_blocks * C, plan.center_blocks, C,
                                    centers.data() + n * C);
    for (int64_t c = 0; c < C; ++c) centers[n * C + c] = math::chunk_center(plan.center_rows, centers[n * C + c]);
  }
  // Phase 2: sums about the centers over every row block, in parallel.
  std::vector<acc_t> partial(s.N * plan.blocks * 2 * C);
  at::parallel_for(0, s.N * plan.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / plan.blocks;
      const int64_t b = item % plan.blocks;
      cl_block_sums(x + n * s.HxW * C, b * plan.block_rows, plan.rows_of(b, s.HxW), C,
                    centers.data() + n * C, partial.data() + item * 2 * C);
    }
  });
  std::vector<acc_t> sums(2 * C);
  for (int64_t n = 0; n < s.N; ++n) {
    PairwiseArraySum<acc_t>::sum_of(partial.data() + n * plan.blocks * 2 * C, plan.blocks, 2 * C, sums.data());
    cl_stats_from_sums(s, centers.data() + n * C, sums.data(), result.data() + n * s.G);
  }
  return result;
}

// ---- coefficients -------------------------------------------------------------
// Per-(n, c) coefficient tables: the forward's y = act((x - pivot) * scale + shift)
template <typename T>
struct AffineTables {
  const T* pivot;
  const T* scale;
  const T* shift;
};

// and the backward's dx = g_coef * g + x_coef * (x - pivot) + bias_coef.
template <typename T>
struct InputGradTables {
  const T* g_coef;
  const T* x_coef;
  const T* bias_coef;
};

// mean and rstd of one group and the pivot/scale/shift of its Cg channels
// (w, b, pivot, scale, shift point at the group's first channel): the pivot
// is the rounded mean, its residual goes into the shift.
template <typename T>
void group_forward_coefs(const WelfordStats<T>& stats, T eps, const T* w, const T* b, int64_t Cg,
                         T* mean, T* rstd, T* pivot, T* scale, T* shift) {
  *mean = math::rounded_mean(stats);
  *rstd = math::rstd_from_stats(stats, eps);
  const T residual = math::mean_residual(stats, *mean);
  for (int64_t c = 0; c < Cg; ++c) {
    const auto affine = math::fold_affine(residual, *rstd, w[c], b[c]);
    pivot[c] = *mean;
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
}

// The backward rebuilds the forward coefficients of one group from the
// residual mean - pivot (to recompute z for the activation, and for dx).
template <typename T>
void group_backward_tables(T mean_shift, T rstd, const T* w, const T* b, int64_t Cg, T* scale,
                           T* shift) {
  for (int64_t c = 0; c < Cg; ++c) {
    const auto affine = math::fold_affine(mean_shift, rstd, w[c], b[c]);
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
}

// The dx coefficients of one group's Cg channels, from their sums of
// g * (x - pivot) and g.
template <typename T>
void group_input_grad_coefs(const T* sum_gx, const T* sum_g, const T* w, int64_t Cg, T mean_shift,
                            T rstd, int64_t group_size, T* g_coef, T* x_coef, T* bias_coef) {
  T sum_gwx = 0, sum_gw = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    sum_gwx += w[c] * sum_gx[c];
    sum_gw += w[c] * sum_g[c];
  }
  const auto coefs = math::input_grad_coefs(sum_gwx, sum_gw, mean_shift, rstd, group_size);
  for (int64_t c = 0; c < Cg; ++c) {
    g_coef[c] = rstd * w[c];
    x_coef[c] = coefs.x_coef;
    bias_coef[c] = coefs.bias_coef;
  }
}

// ---- elementwise runs --------------------------------------------------------
// A run is a stretch of contiguous values sharing a coefficient layout:
//   channels-first: (part of) one (n, c) plane; its coefficients are scalars,
//                   copied out of the tables (PerRun), so the loop keeps them
//                   in registers;
//   channels-last:  one row of C channels; its coefficients are the tables'
//                   arrays from the row's sample on (PerChannel).
using PerChannel = std::true_type;
using PerRun = std::false_type;

template <typename T>
struct Broadcast {
  T value;
  template <typename V>
  V get(int64_t /*j*/) const { return V(value); }
};

template <typename T>
struct ChannelArray {
  const T* values;
  template <typename V>
  V get(int64_t j) const { return load_as<V>(values + j); }
};

// Entry ci of a table as a run coefficient.
template <typename T, typename P>
inline auto run_coef(const T* table, int64_t ci, P /*per_channel*/) {
  if constexpr (P::value) {
    return ChannelArray<T>{table + ci};
  } else {
    return Broadcast<T>{table[ci]};
  }
}

template <typename Coef>
struct RunAffine {
  Coef pivot, scale, shift;
};

template <typename Coef>
struct RunInputGrad {
  Coef g_coef, x_coef, bias_coef;
};

template <typename T, typename P>
inline auto run_affine(const AffineTables<T>& t, int64_t ci, P pc) {
  using Coef = decltype(run_coef(t.pivot, ci, pc));
  return RunAffine<Coef>{run_coef(t.pivot, ci, pc), run_coef(t.scale, ci, pc),
                         run_coef(t.shift, ci, pc)};
}

template <typename T, typename P>
inline auto run_input_grad(const InputGradTables<T>& t, int64_t ci, P pc) {
  using Coef = decltype(run_coef(t.g_coef, ci, pc));
  return RunInputGrad<Coef>{run_coef(t.g_coef, ci, pc), run_coef(t.x_coef, ci, pc),
                            run_coef(t.bias_coef, ci, pc)};
}

// For the values at offset j of a run: x - pivot, and the pre-activation
// output z = (x - pivot) * scale + shift.
template <typename V, typename Coef>
inline V centered(V x, const RunAffine<Coef>& a, int64_t j) {
  return x - a.pivot.template get<V>(j);
}

template <typename V, typename Coef>
inline V pre_activation(V x_centered, const RunAffine<Coef>& a, int64_t j) {
  return x_centered * a.scale.template get<V>(j) + a.shift.template get<V>(j);
}

// d = x - pivot and g = dy * act'(z), z recomputed from x.
template <Activation A, typename V, typename Coef>
inline std::pair<V, V> centered_and_grad(V x, V dy, const RunAffine<Coef>& a, int64_t j) {
  const V d = centered(x, a, j);
  if constexpr (A == Activation::None) {
    return {d, dy};
  } else {
    return {d, dy * math::activate_grad<A>(pre_activation(d, a, j))};
  }
}

// How a run writes its output: `stream` selects non-temporal stores (big
// outputs); `next`, when not null, is where the same run of the next work item
// starts in each input, fetched into L2 while this run writes, so the fused
// schedules read their next item from memory while writing the current one.
template <typename scalar_t, int Inputs>
struct RunWrite {
  bool stream = false;
  const scalar_t* next[Inputs] = {};
};

template <typename scalar_t, int Inputs>
inline void prefetch_next(const RunWrite<scalar_t, Inputs>& w, int64_t i) {
  for (const scalar_t* p : w.next) {
    if (p != nullptr) __builtin_prefetch(p + i, 0, 2);
  }
}

template <typename scalar_t, Activation A, typename Coef>
inline void forward_run(const scalar_t* x, scalar_t* y, int64_t len, const RunAffine<Coef> a,
                        const RunWrite<scalar_t, 1>& w) {
  simd_for<scalar_t>(len, [&](int64_t i, auto step) {
    using S = decltype(step);
    using V = typename S::type;
    V v[S::count];
    if constexpr (!std::is_arithmetic_v<V>) prefetch_next(w, i);
    load_values(x + i, v);
    for (int k = 0; k < S::count; ++k) {
      const int64_t j = i + k * S::lanes;
      v[k] = math::activate<A>(pre_activation(centered(v[k], a, j), a, j));
    }
    store_values(y + i, v, w.stream);
  });
}

// The loop body adding g * (x - pivot) and g of a run into two accumulators:
// V-typed scalars (simd_sum2) or arrays (simd_accumulate_row). With an
// activation, the fused schedules pass g_out to keep g for the dx pass, which
// then skips recomputing act'(z) (exp and a reciprocal per value for SiLU).
template <typename scalar_t, Activation A, typename Coef>
inline auto grad_sums_body(const scalar_t* dy, const scalar_t* x, const RunAffine<Coef> a,
                           acc_type<scalar_t>* g_out = nullptr) {
  return [=](int64_t i, auto step, auto& sum_gx, auto& sum_g) {
    using S = decltype(step);
    using V = typename S::type;
    V xv[S::count], dv[S::count];
    load_values(x + i, xv);
    load_values(dy + i, dv);
    for (int k = 0; k < S::count; ++k) {
      const auto [d, g] = centered_and_grad<A>(xv[k], dv[k], a, i + k * S::lanes);
      if (A != Activation::None && g_out != nullptr) store_as<V>(g_out + i + k * S::lanes, g);
      if constexpr (std::is_array_v<std::remove_reference_t<decltype(sum_gx)>>) {
        sum_gx[k] = g * d;
        sum_g[k] = g;
      } else {
        sum_gx = sum_gx + g * d;
        sum_g = sum_g + g;
      }
    }
  };
}

// Sums of g * (x - pivot) and g over one channels-first plane, chunk by chunk.
template <typename scalar_t, Activation A>
std::pair<acc_type<scalar_t>, acc_type<scalar_t>> plane_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t HxW, const AffineTables<acc_type<scalar_t>>& t,
    int64_t ci, acc_type<scalar_t>* g_out) {
  acc_type<scalar_t> sum_gx = 0, sum_g = 0;
  const auto a = run_affine(t, ci, PerRun{});
  for (int64_t start = 0; start < HxW; start += kChunk) {
    const auto part = simd_sum2<scalar_t>(std::min(kChunk, HxW - start),
                                          grad_sums_body<scalar_t, A>(dy + start, x + start, a,
                                                                      g_out ? g_out + start : nullptr));
    sum_gx += part.first;
    sum_g += part.second;
  }
  return {sum_gx, sum_g};
}

// Channels-last: per-channel sums of g * (x - pivot) and g over rows
// [row0, row0 + rows) of one sample into block_gx, block_g (C values each).
template <typename scalar_t, Activation A>
void cl_block_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t row0, int64_t rows,
                        int64_t C, const AffineTables<acc_type<scalar_t>>& t,
                        acc_type<scalar_t>* block_gx, acc_type<scalar_t>* block_g,
                        acc_type<scalar_t>* g_out = nullptr) {
  std::fill(block_gx, block_gx + C, acc_type<scalar_t>(0));
  std::fill(block_g, block_g + C, acc_type<scalar_t>(0));
  const auto a = run_affine(t, 0, PerChannel{});
  for (int64_t r = row0; r < row0 + rows; ++r) {
    simd_accumulate_row<scalar_t>(C, block_gx, block_g,
                                  grad_sums_body<scalar_t, A>(dy + r * C, x + r * C, a,
                                                              g_out ? g_out + r * C : nullptr));
  }
}

template <typename scalar_t, Activation A, typename Coef>
inline void input_grad_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                           const RunAffine<Coef> a, const RunInputGrad<Coef> ig,
                           const RunWrite<scalar_t, 2>& w,
                           const acc_type<scalar_t>* g_saved = nullptr) {
  simd_for<scalar_t>(len, [&](int64_t i, auto step) {
    using S = decltype(step);
    using V = typename S::type;
    V xv[S::count], dv[S::count];
    if constexpr (!std::is_arithmetic_v<V>) prefetch_next(w, i);
    load_values(x + i, xv);
    load_values(dy + i, dv);
    for (int k = 0; k < S::count; ++k) {
      const int64_t j = i + k * S::lanes;
      const auto [d, g] = g_saved != nullptr
                              ? std::pair<V, V>{centered(xv[k], a, j), load_as<V>(g_saved + j)}
                              : centered_and_grad<A>(xv[k], dv[k], a, j);
      dv[k] = ig.g_coef.template get<V>(j) * g + ig.x_coef.template get<V>(j) * d +
              ig.bias_coef.template get<V>(j);
    }
    store_values(dx + i, dv, w.stream);
  });
}

// Two-pass elementwise passes: fn(base, len, ci, per_channel) for every run,
// in parallel, with coefficients in (N * C) tables.
template <typename Fn>
void for_each_run(const GroupNormShape& s, Layout layout, const Fn& fn) {
  if (layout == Layout::ChannelsFirst) {
    const int64_t chunks = ceil_div(s.HxW, kChunk);
    at::parallel_for(0, s.N * s.C * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / chunks;
        const int64_t start = item % chunks * kChunk;
        fn(plane * s.HxW + start, std::min(kChunk, s.HxW - start), plane, PerRun{});
      }
      stream_fence();
    });
  } else {
    at::parallel_for(0, s.N * s.HxW, rows_per_block(s.C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) fn(row * s.C, s.C, row / s.HxW * s.C, PerChannel{});
      stream_fence();
    });
  }
}

// ---- forward -------------------------------------------------------------------
template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  const acc_t* w;
  const acc_t* b;
  acc_t eps;
  acc_t* mean;
  acc_t* rstd;
  bool stream;  // non-temporal stores for y
};

// Channels-first, one group per work item.
template <typename scalar_t, Activation A>
void forward_fused_groups(const ForwardArgs<scalar_t>& a, const GroupNormShape& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t D = s.group_size();
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> table(3 * Cg);
    acc_t* pivot = table.data();
    acc_t* scale = pivot + Cg;
    acc_t* shift = scale + Cg;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = ng % s.G * Cg;
      const scalar_t* gx = a.x + ng * D;
      group_forward_coefs(span_stats(gx, D), a.eps, a.w + c0, a.b + c0, Cg, a.mean + ng,
                          a.rstd + ng, pivot, scale, shift);
      const AffineTables<acc_t> t{pivot, scale, shift};
      for (int64_t c = 0; c < Cg; ++c) {
        const RunWrite<scalar_t, 1> w{a.stream, {ng + 1 < end ? gx + D + c * s.HxW : nullptr}};
        forward_run<scalar_t, A>(gx + c * s.HxW, a.y + ng * D + c * s.HxW, s.HxW,
                                 run_affine(t, c, PerRun{}), w);
      }
    }
    stream_fence();
  });
}

// Channels-last, one sample per work item.
template <typename scalar_t, Activation A>
void forward_fused_samples(const ForwardArgs<scalar_t>& a, const GroupNormShape& s) {
  using acc_t = acc_type<scalar_t>;
  using Stats = WelfordStats<acc_t>;
  const int64_t Cg = s.channels_per_group();
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> table((3 + kSampleStatsScratch) * s.C);
    acc_t* pivot = table.data();
    acc_t* scale = pivot + s.C;
    acc_t* shift = scale + s.C;
    acc_t* scratch = shift + s.C;
    std::vector<Stats> stats(s.G);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xs = a.x + n * s.HxW * s.C;
      sample_stats(xs, s, scratch, stats.data());
      for (int64_t g = 0; g < s.G; ++g) {
        group_forward_coefs(stats[g], a.eps, a.w + g * Cg, a.b + g * Cg, Cg, a.mean + n * s.G + g,
                            a.rstd + n * s.G + g, pivot + g * Cg, scale + g * Cg, shift + g * Cg);
      }
      const auto row_affine = run_affine(AffineTables<acc_t>{pivot, scale, shift}, 0, PerChannel{});
      for (int64_t r = 0; r < s.HxW; ++r) {
        const RunWrite<scalar_t, 1> w{a.stream, {n + 1 < end ? xs + (s.HxW + r) * s.C : nullptr}};
        forward_run<scalar_t, A>(xs + r * s.C, a.y + (n * s.HxW + r) * s.C, s.C, row_affine, w);
      }
    }
    stream_fence();
  });
}

template <typename scalar_t, Activation A>
void forward_two_pass(const ForwardArgs<scalar_t>& a, const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const auto stats = group_stats(a.x, s, layout);
  std::vector<acc_t> pivots(s.N * s.C), scale(s.N * s.C), shift(s.N * s.C);
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const int64_t c0 = ng % s.G * Cg;
    group_forward_coefs(stats[ng], a.eps, a.w + c0, a.b + c0, Cg, a.mean + ng, a.rstd + ng,
                        pivots.data() + ng * Cg, scale.data() + ng * Cg, shift.data() + ng * Cg);
  }
  const AffineTables<acc_t> t{pivots.data(), scale.data(), shift.data()};
  for_each_run(s, layout, [&](int64_t base, int64_t len, int64_t ci, auto per_channel) {
    forward_run<scalar_t, A>(a.x + base, a.y + base, len, run_affine(t, ci, per_channel),
                             RunWrite<scalar_t, 1>{a.stream, {}});
  });
}

// ---- backward ------------------------------------------------------------------
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;  // null: only parameter gradients
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* w;
  const acc_t* b;
  // Outputs for the parameter gradients: per-(n, c) sums of g * (x - pivot)
  // and g, and per-group mean - pivot (the pivot is the saved mean).
  acc_t* sum_gx;
  acc_t* sum_g;
  acc_t* mean_shift;
  bool stream;  // non-temporal stores for dx
  // Groups whose mean - pivot was recomputed from x (see exact_mean_shifts).
  const char* has_exact_shift;
  const acc_t* exact_shift;

  acc_t group_mean_shift(int64_t ng) const { return has_exact_shift[ng] ? exact_shift[ng] : acc_t(0); }
};

// Whether the fused schedules keep g = dy * act'(z) between their two passes:
// with an activation and when dx is wanted.
template <Activation A, typename Args>
bool keeps_grad(const Args& a) {
  return A != Activation::None && a.dx != nullptr;
}

// Channels-first, one group per work item: sums, then dx from cache.
template <typename scalar_t, Activation A>
void backward_fused_groups(const BackwardArgs<scalar_t>& a, const GroupNormShape& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t D = s.group_size();
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> table(6 * Cg);
    acc_t* pivot = table.data();
    acc_t* scale = pivot + Cg;
    acc_t* shift = scale + Cg;
    acc_t* g_coef = shift + Cg;
    acc_t* x_coef = g_coef + Cg;
    acc_t* bias_coef = x_coef + Cg;
    // g = dy * act'(z) of the current group, kept for its dx pass.
    std::vector<acc_t> g_saved(keeps_grad<A>(a) ? D : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = ng % s.G * Cg;
      const scalar_t* gx = a.x + ng * D;
      const scalar_t* gdy = a.dy + ng * D;
      a.mean_shift[ng] = a.group_mean_shift(ng);
      group_backward_tables(a.mean_shift[ng], a.rstd[ng], a.w + c0, a.b + c0, Cg, scale, shift);
      std::fill(pivot, pivot + Cg, a.mean[ng]);
      const AffineTables<acc_t> t{pivot, scale, shift};
      for (int64_t c = 0; c < Cg; ++c) {
        std::tie(a.sum_gx[ng * Cg + c], a.sum_g[ng * Cg + c]) =
            plane_grad_sums<scalar_t, A>(gdy + c * s.HxW, gx + c * s.HxW, s.HxW, t, c,
                                         g_saved.empty() ? nullptr : g_saved.data() + c * s.HxW);
      }
      if (a.dx == nullptr) continue;
      group_input_grad_coefs(a.sum_gx + ng * Cg, a.sum_g + ng * Cg, a.w + c0, Cg, a.mean_shift[ng],
                             a.rstd[ng], D, g_coef, x_coef, bias_coef);
      const InputGradTables<acc_t> gt{g_coef, x_coef, bias_coef};
      for (int64_t c = 0; c < Cg; ++c) {
        const bool more = ng + 1 < end;
        const RunWrite<scalar_t, 2> w{a.stream, {more ? gx + D + c * s.HxW : nullptr,
                                                 more ? gdy + D + c * s.HxW : nullptr}};
        input_grad_run<scalar_t, A>(gdy + c * s.HxW, gx + c * s.HxW, a.dx + ng * D + c * s.HxW,
                                    s.HxW, run_affine(t, c, PerRun{}),
                                    run_input_grad(gt, c, PerRun{}), w,
                                    g_saved.empty() ? nullptr : g_saved.data() + c * s.HxW);
      }
    }
    stream_fence();
  });
}

// Channels-last, one sample per work item.
template <typename scalar_t, Activation A>
void backward_fused_samples(const BackwardArgs<scalar_t>& a, const GroupNormShape& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t block_rows = sum_rows_per_block(s.C);
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> table(8 * s.C);
    acc_t* pivot = table.data();
    acc_t* scale = pivot + s.C;
    acc_t* shift = scale + s.C;
    acc_t* g_coef = shift + s.C;
    acc_t* x_coef = g_coef + s.C;
    acc_t* bias_coef = x_coef + s.C;
    acc_t* block_gx = bias_coef + s.C;
    acc_t* block_g = block_gx + s.C;
    // g = dy * act'(z) of the current sample, kept for its dx pass.
    std::vector<acc_t> g_saved(keeps_grad<A>(a) ? s.HxW * s.C : 0);
    acc_t* g_out = g_saved.empty() ? nullptr : g_saved.data();
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = n * s.HxW * s.C;
      fill_sample_pivots(a.mean, s, n, pivot);
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t ng = n * s.G + g;
        a.mean_shift[ng] = a.group_mean_shift(ng);
        group_backward_tables(a.mean_shift[ng], a.rstd[ng], a.w + g * Cg, a.b + g * Cg, Cg,
                              scale + g * Cg, shift + g * Cg);
      }
      const AffineTables<acc_t> t{pivot, scale, shift};
      acc_t* sum_gx = a.sum_gx + n * s.C;
      acc_t* sum_g = a.sum_g + n * s.C;
      PairwiseArraySum<acc_t> total(2 * s.C);  // block_gx, block_g are adjacent
      for (int64_t row0 = 0; row0 < s.HxW; row0 += block_rows) {
        cl_block_grad_sums<scalar_t, A>(a.dy + offset, a.x + offset, row0,
                                        std::min(block_rows, s.HxW - row0), s.C, t, block_gx, block_g,
                                        g_out);
        total.push(block_gx);
      }
      total.result(block_gx);
      std::copy(block_gx, block_gx + s.C, sum_gx);
      std::copy(block_g, block_g + s.C, sum_g);
      if (a.dx == nullptr) continue;
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t ng = n * s.G + g;
        group_input_grad_coefs(sum_gx + g * Cg, sum_g + g * Cg, a.w + g * Cg, Cg, a.mean_shift[ng],
                               a.rstd[ng], s.group_size(), g_coef + g * Cg, x_coef + g * Cg,
                               bias_coef + g * Cg);
      }
      const auto row_affine = run_affine(t, 0, PerChannel{});
      const auto row_input_grad =
          run_input_grad(InputGradTables<acc_t>{g_coef, x_coef, bias_coef}, 0, PerChannel{});
      for (int64_t r = 0; r < s.HxW; ++r) {
        const int64_t next = offset + (s.HxW + r) * s.C;
        const RunWrite<scalar_t, 2> w{a.stream, {n + 1 < end ? a.x + next : nullptr,
                                                 n + 1 < end ? a.dy + next : nullptr}};
        input_grad_run<scalar_t, A>(a.dy + offset + r * s.C, a.x + offset + r * s.C,
                                    a.dx + offset + r * s.C, s.C, row_affine, row_input_grad, w,
                                    g_out ? g_out + r * s.C : nullptr);
      }
    }
    stream_fence();
  });
}

template <typename scalar_t, Activation A>
void backward_two_pass(const BackwardArgs<scalar_t>& a, const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  const int64_t planes = s.N * s.C;
  const int64_t Cg = s.channels_per_group();
  const auto pivots = channel_pivots(a.mean, s);
  std::vector<acc_t> scale(planes), shift(planes);
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const int64_t c0 = ng % s.G * Cg;
    a.mean_shift[ng] = a.group_mean_shift(ng);
    group_backward_tables(a.mean_shift[ng], a.rstd[ng], a.w + c0, a.b + c0, Cg,
                          scale.data() + ng * Cg, shift.data() + ng * Cg);
  }
  const AffineTables<acc_t> t{pivots.data(), scale.data(), shift.data()};

  // Pass 1: per-(n, c) sums, chunks / row blocks in parallel, merged in order.
  std::fill(a.sum_gx, a.sum_gx + planes, acc_t(0));
  std::fill(a.sum_g, a.sum_g + planes, acc_t(0));
  if (s.HxW > 0 && layout == Layout::ChannelsFirst) {
    const int64_t chunks = ceil_div(s.HxW, kChunk);
    std::vector<std::pair<acc_t, acc_t>> partial(planes * chunks);
    at::parallel_for(0, planes * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / chunks;
        const int64_t start = item % chunks * kChunk;
        const int64_t base = plane * s.HxW + start;
        partial[item] = simd_sum2<scalar_t>(
            std::min(kChunk, s.HxW - start),
            grad_sums_body<scalar_t, A>(a.dy + base, a.x + base, run_affine(t, plane, PerRun{})));
      }
    });
    for (int64_t plane = 0; plane < planes; ++plane) {
      for (int64_t k = 0; k < chunks; ++k) {
        a.sum_gx[plane] += partial[plane * chunks + k].first;
        a.sum_g[plane] += partial[plane * chunks + k].second;
      }
    }
  } else if (s.HxW > 0) {
    const int64_t block_rows = sum_rows_per_block(s.C);
    const int64_t blocks = ceil_div(s.HxW, block_rows);
    std::vector<acc_t> partial(s.N * blocks * 2 * s.C);
    at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / blocks;
        const int64_t row0 = item % blocks * block_rows;
        const int64_t offset = n * s.HxW * s.C;
        acc_t* block_gx = partial.data() + item * 2 * s.C;
        const AffineTables<acc_t> sample_t{t.pivot + n * s.C, t.scale + n * s.C, t.shift + n * s.C};
        cl_block_grad_sums<scalar_t, A>(a.dy + offset, a.x + offset, row0,
                                        std::min(block_rows, s.HxW - row0), s.C, sample_t, block_gx,
                                        block_gx + s.C);
      }
    });
    std::vector<acc_t> sums(2 * s.C);
    for (int64_t n = 0; n < s.N; ++n) {
      PairwiseArraySum<acc_t>::sum_of(partial.data() + n * blocks * 2 * s.C, blocks, 2 * s.C, sums.data());
      std::copy(sums.begin(), sums.begin() + s.C, a.sum_gx + n * s.C);
      std::copy(sums.begin() + s.C, sums.end(), a.sum_g + n * s.C);
    }
  }
  if (a.dx == nullptr) return;

  // Pass 2: dx.
  std::vector<acc_t> g_coef(planes), x_coef(planes), bias_coef(planes);
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const int64_t i = ng * Cg;
    group_input_grad_coefs(a.sum_gx + i, a.sum_g + i, a.w + ng % s.G * Cg, Cg, a.mean_shift[ng],
                           a.rstd[ng], s.group_size(), g_coef.data() + i, x_coef.data() + i,
                           bias_coef.data() + i);
  }
  const InputGradTables<acc_t> gt{g_coef.data(), x_coef.data(), bias_coef.data()};
  for_each_run(s, layout, [&](int64_t base, int64_t len, int64_t ci, auto per_channel) {
    input_grad_run<scalar_t, A>(a.dy + base, a.x + base, a.dx + base, len,
                                run_affine(t, ci, per_channel), run_input_grad(gt, ci, per_channel),
                                RunWrite<scalar_t, 2>{a.stream, {}});
  });
}

// ---- typed drivers -------------------------------------------------------------
template <typename scalar_t>
void forward_typed(const ForwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const int64_t bytes = static_cast<int64_t>(sizeof(scalar_t));
  const ForwardArgs<scalar_t> args{static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.y),
                                   static_cast<const acc_t*>(p.weight),
                                   static_cast<const acc_t*>(p.bias), static_cast<acc_t>(p.eps),
                                   static_cast<acc_t*>(p.mean), static_cast<acc_t*>(p.rstd),
                                   stream_output(p.y, s, p.layout, bytes, p.tuning)};
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (p.layout == Layout::ChannelsFirst) {
      if (use_fused(s.N * s.G, s.group_size() * bytes, p.tuning.fused_group_bytes, p.tuning.schedule)) {
        return forward_fused_groups<scalar_t, A>(args, s);
      }
    } else if (use_fused(s.N, s.HxW * s.C * bytes, p.tuning.fused_sample_bytes, p.tuning.schedule)) {
      return forward_fused_samples<scalar_t, A>(args, s);
    }
    forward_two_pass<scalar_t, A>(args, s, p.layout);
  });
}

// The saved mean P is the mean rounded to the accumulate type; the backward
// computes about it and drops the residual mean - P, except for groups whose
// |P| * rstd is large (math::needs_exact_residual): those recompute the
// statistics from x with the forward's own code (bitwise the forward's) and
// take the exact residual. Typical data never needs it, so it costs nothing
// there.
template <typename scalar_t>
void exact_mean_shifts(const scalar_t* x, const acc_type<scalar_t>* mean,
                       const acc_type<scalar_t>* rstd, const GroupNormShape& s, Layout layout,
                       std::vector<char>& has_exact, std::vector<acc_type<scalar_t>>& shift) {
  using acc_t = acc_type<scalar_t>;
  using Stats = WelfordStats<acc_t>;
  const int64_t groups = s.N * s.G;
  bool any = false;
  for (int64_t ng = 0; ng < groups; ++ng) {
    has_exact[ng] = math::needs_exact_residual(mean[ng], rstd[ng]);
    any = any || has_exact[ng];
  }
  if (!any) return;
  if (layout == Layout::ChannelsFirst) {
    const int64_t D = s.group_size();
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        if (has_exact[ng]) shift[ng] = math::mean_residual(span_stats(x + ng * D, D), mean[ng]);
      }
    });
    return;
  }
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kSampleStatsScratch * s.C);
    std::vector<Stats> stats(s.G);
    for (int64_t n = begin; n < end; ++n) {
      if (!std::any_of(has_exact.begin() + n * s.G, has_exact.begin() + (n + 1) * s.G,
                       [](char f) { return f != 0; })) {
        continue;
      }
      sample_stats(x + n * s.HxW * s.C, s, scratch.data(), stats.data());
      for (int64_t g = 0; g < s.G; ++g) {
        shift[n * s.G + g] = math::mean_residual(stats[g], mean[n * s.G + g]);
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const BackwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const int64_t planes = s.N * s.C;
  std::vector<acc_t> sum_gx(planes), sum_g(planes), mean_shift(s.N * s.G);
  std::vector<char> has_exact(s.N * s.G, 0);
  std::vector<acc_t> exact_shift(s.N * s.G);
  exact_mean_shifts(static_cast<const scalar_t*>(p.x), static_cast<const acc_t*>(p.mean),
                    static_cast<const acc_t*>(p.rstd), s, p.layout, has_exact, exact_shift);
  const BackwardArgs<scalar_t> args{
      static_cast<const scalar_t*>(p.dy), static_cast<const scalar_t*>(p.x),
      static_cast<scalar_t*>(p.dx),       static_cast<const acc_t*>(p.mean),
      static_cast<const acc_t*>(p.rstd),  static_cast<const acc_t*>(p.weight),
      static_cast<const acc_t*>(p.bias),  sum_gx.data(),
      sum_g.data(),                       mean_shift.data(),
      stream_output(p.dx, s, p.layout, sizeof(scalar_t), p.tuning),
      has_exact.data(),                   exact_shift.data()};
  // x and dy are both read twice.
  const int64_t bytes = 2 * static_cast<int64_t>(sizeof(scalar_t));
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (p.layout == Layout::ChannelsFirst) {
      if (use_fused(s.N * s.G, s.group_size() * bytes, p.tuning.fused_group_bytes, p.tuning.schedule)) {
        return backward_fused_groups<scalar_t, A>(args, s);
      }
    } else if (use_fused(s.N, s.HxW * s.C * bytes, p.tuning.fused_sample_bytes, p.tuning.schedule)) {
      return backward_fused_samples<scalar_t, A>(args, s);
    }
    backward_two_pass<scalar_t, A>(args, s, p.layout);
  });

  // Parameter gradients: sums over samples in a fixed order.
  acc_t* dweight = static_cast<acc_t*>(p.dweight);
  acc_t* dbias = static_cast<acc_t*>(p.dbias);
  std::fill(dweight, dweight + s.C, acc_t(0));
  std::fill(dbias, dbias + s.C, acc_t(0));
  const int64_t Cg = s.channels_per_group();
  for (int64_t i = 0; i < planes; ++i) {
    const int64_t ng = i / Cg;  // planes of a group are consecutive: i = (n * G + g) * Cg + c % Cg
    dweight[i % s.C] += math::weight_grad_term(args.sum_gx[i], args.sum_g[i], mean_shift[ng],
                                               args.rstd[ng]);
    dbias[i % s.C] += sum_g[i];
  }
}

// Calls f(scalar_t{}) for the four supported dtypes (checked by the caller).
template <typename F>
void dispatch_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Double:
      return f(double{});
    case c10::ScalarType::Half:
      return f(c10::Half{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    case c10::ScalarType::Float:
    default:
      return f(float{});
  }
}

}  // namespace

void group_norm_forward_kernel(const ForwardParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward_typed<decltype(tag)>(params); });
}

void group_norm_backward_kernel(const BackwardParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { backward_typed<decltype(tag)>(params); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
