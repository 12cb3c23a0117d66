// CPU GroupNorm kernels, part 1: constants and the vectorized loop helpers.
// Part of group_norm_kernels_impl.h, which includes the parts in order inside one
// translation unit per CPU capability.
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using math::CenteredStats;

// Values per work item. Fixed so chunking never depends on the thread count.
constexpr int64_t kChunk = 4096;

// Bytes per cache line (x86): the unit of streaming stores and prefetches.
constexpr int64_t kCacheLine = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work items per thread at least, for at::parallel_for: about ATen's grain of
// 32K values, so small tensors run on the calling thread instead of paying for
// a parallel region (about 5 us, a third of a tiny call's time). Results never
// depend on how items are split among threads.
int64_t grain_of(int64_t item_values) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(item_values, 1)); }

// The forward's fused schedule sets small groups up in batches: the
// statistics, then the coefficients, of up to kMaxBatch groups of up to
// kBatchValues values in all before their outputs. A small group's set-up is
// a chain of dependent horizontal sums, divisions and a square root that
// costs more than its values; the chains of independent groups overlap.
// Groups too large for a batch of four go one at a time (batches of two and
// three measured slower).
constexpr int64_t kMaxBatch = 16;
constexpr int64_t kBatchValues = kChunk;
int64_t groups_per_batch(int64_t group_values) {
  const int64_t fit = kBatchValues / std::max<int64_t>(group_values, 1);
  return fit < 4 ? 1 : std::min(fit, kMaxBatch);
}

// The backward's fused schedule batches groups of short planes, at least two
// to a batch of up to kBackwardBatchValues values (backward_fused_group_batches).
// Larger batches were slower where their groups were larger: x, dy and dx of
// a batch then no longer stay in L1 between the sums and the dx pass
// (docs/performance.md).
constexpr int64_t kBackwardBatchValues = 1024;
int64_t backward_groups_per_batch(int64_t group_values) {
  return kBackwardBatchValues / std::max<int64_t>(group_values, 1);
}

// fn(item, ahead) for the items [begin, end) first to last, or last to first
// where `backward` (an elementwise pass after a walk over the same values:
// see walks_back). ahead: in a backward walk the item walked next, for fn to
// fetch (the hardware prefetchers follow forward walks but lag on backward
// ones); -1 otherwise.
template <typename Fn>
inline void for_each_item(int64_t begin, int64_t end, bool backward, const Fn& fn) {
  if (backward) {
    for (int64_t item = end; item-- > begin;) fn(item, item > begin ? item - 1 : int64_t(-1));
  } else {
    for (int64_t item = begin; item < end; ++item) fn(item, int64_t(-1));
  }
}

// Named arrays laid out one after another from `base`: carve(base, {n0, n1})
// gives pointers to an array of n0 values and one of n1 after it.
template <typename T, size_t K>
std::array<T*, K> carve(T* base, const std::array<int64_t, K>& sizes) {
  std::array<T*, K> arrays;
  for (size_t k = 0; k < K; ++k) {
    arrays[k] = base;
    base += sizes[k];
  }
  return arrays;
}

// A work item's scratch: one allocation carved into K named arrays, e.g.
//   Scratch<acc_t, 3> table({C, C, C});
//   auto [pivot, scale, shift] = table.arrays;
template <typename T, size_t K>
struct Scratch {
  explicit Scratch(const std::array<int64_t, K>& sizes)
      : storage(std::accumulate(sizes.begin(), sizes.end(), int64_t(0))), arrays(carve(storage.data(), sizes)) {}
  std::vector<T> storage;
  std::array<T*, K> arrays;
};

// ---- per-channel vectors ------------------------------------------------------
// A group's per-channel values (coefficient tables, sums) are handled a
// vector of channels at a time, the last one masked. Tables are written so
// because the elementwise pass that follows loads them as vectors, and vector
// loads of values just stored one scalar at a time stall until those stores
// complete. Sums over a group's channels add lanes, then across lanes
// (horizontal_sum): a fixed order, the same in every schedule.
template <typename T>
using TableVec = at::vec::Vectorized<T>;

// fn(c, n) for the vectors [c, c + n) of Cg channels.
template <typename T, typename Fn>
void for_each_table_vector(int64_t Cg, const Fn& fn) {
  constexpr int64_t L = TableVec<T>::size();
  for (int64_t c = 0; c < Cg; c += L) fn(c, std::min(L, Cg - c));
}

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

// A step of one vector where a full step is two (fp16 / bf16: 16 values of
// AVX-512's 32), taken at most once after the full steps, so a run's scalar
// tail is shorter than one vector.
template <typename IO>
using HalfStep = Step<typename IO::Vec, 1>;

// Runs f(i, HalfStep) where a half step fits at i of n, and moves i past it.
template <typename IO, typename F>
inline void half_step(int64_t& i, int64_t n, const F& f) {
  if constexpr (IO::kVecs == 2) {
    if (i + HalfStep<IO>::lanes <= n) {
      f(i, HalfStep<IO>{});
      i += HalfStep<IO>::lanes;
    }
  }
}

// The tail of a run (fewer values than a vector, after its SIMD steps) is
// one more vector step ending at the run's end (a TailStep at n - lanes),
// which redoes values the steps before it did: lanes compute independently,
// so those come out bit for bit the same (an output or a per-channel sum is
// written again with its own value; simd_sum2 masks them out of its sums).
// Scalar instead for tails of under kMinVectorTail values (a vector step
// costs more than one to three scalar ones with an activation), and where
// that step would reach before the run or into an earlier chunk of kChunk
// values: a schedule may cut the run there, and a value must take the same
// path in every schedule. Decided from n alone, so every pass agrees.
template <typename IO>
using TailStep = Step<typename IO::Vec, 1>;

constexpr int64_t kMinVectorTail = 4;

template <typename IO>
inline bool tail_as_vector(int64_t n) {
  const int64_t in_last_chunk = (n - 1) % kChunk + 1;
  return n % TailStep<IO>::lanes >= kMinVectorTail && in_last_chunk >= TailStep<IO>::lanes;
}

// Runs body(i, Step) over [0, n): SIMD steps (full, then at most one half
// step), then the tail (tail_as_vector: one overlapping vector step, or
// scalar steps). The body is written once, generically in V. Every pass over
// a run (statistics, gradient sums, outputs) takes the same path for the same
// value, and kChunk is a multiple of the SIMD step, so cutting a run into
// chunks does not move the tail: SIMD and scalar math may round differently,
// and results must not depend on the schedule.
template <typename scalar_t, typename Body>
inline void simd_for(int64_t n, const Body& body) {
  using IO = VecIO<scalar_t>;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) body(i, Step<typename IO::Vec, IO::kVecs>{});
  half_step<IO>(i, n, body);
  if (i < n && tail_as_vector<IO>(n)) return body(n - TailStep<IO>::lanes, TailStep<IO>{});
  for (; i < n; ++i) body(i, Step<typename IO::acc_t, 1>{});
}

template <typename scalar_t, typename V, int K>
inline void load_values(const scalar_t* p, V (&v)[K]) {
  using IO = VecIO<scalar_t>;
  if constexpr (std::is_arithmetic_v<V>) {
    v[0] = static_cast<V>(*p);
  } else if constexpr (K == IO::kVecs) {
    IO::load(p, v);
  } else {
    IO::load_half(p, v[0]);
  }
}

// stream: a non-temporal store where the vector is aligned (see
// stream_vector); a half step stores normally (it only occurs in runs that
// are not streamed: see stream_output).
template <typename scalar_t, typename V, int K>
inline void store_values(scalar_t* p, const V (&v)[K], bool stream = false) {
  using IO = VecIO<scalar_t>;
  if constexpr (std::is_arithmetic_v<V>) {
    *p = static_cast<scalar_t>(v[0]);
  } else if constexpr (K != IO::kVecs) {
    IO::store_half(p, v[0]);
  } else if (stream) {
    IO::stream(p, v);
  } else {
    IO::store(p, v);
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

// The lanes' sum as a balanced tree (lane i + lane i + L/2, halving): a fixed
// order, so results stay reproducible, and log2(L) dependent adds instead of
// L (a lane-by-lane chain cost more than the loads of a short plane).
// AVX2 / AVX-512: the same tree in registers (upper half onto lower half),
// bit for bit; a tree through memory cost a store and a reload per level.
template <typename T>
inline T horizontal_sum(const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
    const __m256 h8 = v;
#endif
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
  }
  if constexpr (std::is_same_v<T, double>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256d h4 = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
#else
    const __m256d h4 = v;
#endif
    const __m128d h2 = _mm_add_pd(_mm256_castpd256_pd128(h4), _mm256_extractf128_pd(h4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h2, _mm_unpackhi_pd(h2, h2)));
  }
#endif
  constexpr int kLanes = at::vec::Vectorized<T>::size();
  T lanes[kLanes];
  v.store(lanes);
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int i = 0; i < half; ++i) lanes[i] = lanes[i] + lanes[i + half];
  }
  return lanes[0];
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
  half_step<IO>(i, n, [&](int64_t j, auto step) { body(j, step, a0, b0); });
  if (i < n && tail_as_vector<IO>(n)) {
    // Only the lanes past the values already summed count.
    constexpr int64_t lanes = TailStep<IO>::lanes;
    Vec ta(acc_t(0)), tb(acc_t(0));
    body(n - lanes, TailStep<IO>{}, ta, tb);
    const Vec fresh = Vec::arange(acc_t(0), acc_t(1)) >= Vec(static_cast<acc_t>(lanes - (n - i)));
    a0 = a0 + Vec::blendv(Vec(acc_t(0)), ta, fresh);
    b0 = b0 + Vec::blendv(Vec(acc_t(0)), tb, fresh);
    i = n;
  }
  acc_t sa = 0, sb = 0;
  for (; i < n; ++i) body(i, Step<acc_t, 1>{}, sa, sb);
  return {horizontal_sum((a0 + a1) + (a2 + a3)) + sa, horizontal_sum((b0 + b1) + (b2 + b3)) + sb};
}

// The array {f(0), ..., f(K - 1)}, built without default-constructing its
// elements (g++ leaves Vectorized's default constructor out of line in the
// SIMD variants: a call per vector).
template <typename F, int... I>
inline auto array_of_impl(const F& f, std::integer_sequence<int, I...>) {
  return std::array<decltype(f(0)), sizeof...(I)>{f(I)...};
}
template <int K, typename F>
inline auto array_of(const F& f) {
  return array_of_impl(f, std::make_integer_sequence<int, K>{});
}

// ---- channels-last blocks, column tile by column tile ----------------------
// Loops over a block of `rows` channels-last rows of C channels one column
// tile (up to four SIMD vectors of channels, then a half step) at a time, so per-channel values
// (sums, coefficients) stay in registers while the loop runs down the rows; a
// row-at-a-time loop loads (and for sums stores) them once per row, which
// costs more than the work itself. For the channels [i, i + Step):
//   state = op.start(i, Step); op.row(state, r, i, Step) for r = 0, 1, ...;
//   op.finish(state, i, Step).
// The same channels take the SIMD and the scalar path as in a simd_for over a
// row, and each channel sees its rows in order, so results match a row-wise
// loop bit for bit.
template <typename scalar_t, typename Op>
inline void simd_for_columns(int64_t C, int64_t rows, const Op op) {
  using IO = VecIO<scalar_t>;
  using VecStep = Step<typename IO::Vec, IO::kVecs>;
  using ScalarStep = Step<typename IO::acc_t, 1>;
  auto tile = [&](int64_t i, auto steps, auto step) {
    constexpr int T = decltype(steps)::value;
    constexpr int64_t width = decltype(step)::count * decltype(step)::lanes;
    auto state = array_of<T>([&](int t) { return op.start(i + t * width, step); });
    for (int64_t r = 0; r < rows; ++r) {
      for (int t = 0; t < T; ++t) op.row(state[t], r, i + t * width, step);
    }
    for (int t = 0; t < T; ++t) op.finish(state[t], i + t * width, step);
  };
  constexpr int kTileSteps = IO::kVecs >= 4 ? 1 : 4 / IO::kVecs;
  int64_t i = 0;
  for (; i + kTileSteps * IO::kStep <= C; i += kTileSteps * IO::kStep) {
    tile(i, std::integral_constant<int, kTileSteps>{}, VecStep{});
  }
  // Whole steps left over (fewer than a tile's) go as one narrower tile, so
  // each row's values are read together rather than in one walk per step.
  if constexpr (kTileSteps == 4) {
    const int64_t left = (C - i) / IO::kStep;
    if (left == 3) tile(i, std::integral_constant<int, 3>{}, VecStep{});
    if (left == 2) tile(i, std::integral_constant<int, 2>{}, VecStep{});
    if (left >= 2) i += left * IO::kStep;
  }
  for (; i + IO::kStep <= C; i += IO::kStep) tile(i, std::integral_constant<int, 1>{}, VecStep{});
  half_step<IO>(i, C, [&](int64_t j, auto step) { tile(j, std::integral_constant<int, 1>{}, step); });
  if (i < C && tail_as_vector<IO>(C))
    return tile(C - TailStep<IO>::lanes, std::integral_constant<int, 1>{}, TailStep<IO>{});
  for (; i < C; ++i) tile(i, std::integral_constant<int, 1>{}, ScalarStep{});
}

// Per-channel sums down the rows of a channels-last block: sum_a[c] (and
// sum_b[c] when Sums == 2) over r in [0, rows) of the terms that
// row_body(r)(i, Step, a, b) puts into the arrays a, b for channels
// [i, i + Step) of row r. Each sum adds its rows in order, from zero.
template <typename V, int K>
struct ColumnSums {
  std::array<V, K> a, b;
};

template <typename scalar_t, int Sums, typename RowBody>
struct ColumnSumsOp {
  static_assert(Sums == 1 || Sums == 2, "one or two sums");
  acc_type<scalar_t>* sum_a;
  acc_type<scalar_t>* sum_b;
  const RowBody& row_body;

  template <typename S>
  ColumnSums<typename S::type, S::count> start(int64_t /*i*/, S /*step*/) const {
    const auto zeros = [](int) { return typename S::type(0); };
    return {array_of<S::count>(zeros), array_of<S::count>(zeros)};
  }
  template <typename State, typename S>
  void row(State& sums, int64_t r, int64_t i, S step) const {
    typename S::type ta[S::count], tb[S::count];
    row_body(r)(i, step, ta, tb);
    for (int k = 0; k < S::count; ++k) {
      sums.a[k] = sums.a[k] + ta[k];
      if constexpr (Sums == 2) sums.b[k] = sums.b[k] + tb[k];
    }
  }
  template <typename State, typename S>
  void finish(const State& sums, int64_t i, S /*step*/) const {
    for (int k = 0; k < S::count; ++k) {
      store_as<typename S::type>(sum_a + i + k * S::lanes, sums.a[k]);
      if constexpr (Sums == 2) store_as<typename S::type>(sum_b + i + k * S::lanes, sums.b[k]);
    }
  }
};

template <typename scalar_t, int Sums, typename RowBody>
inline void simd_column_sums(int64_t C, int64_t rows, acc_type<scalar_t>* sum_a, acc_type<scalar_t>* sum_b,
                             const RowBody& row_body) {
  simd_for_columns<scalar_t>(C, rows, ColumnSumsOp<scalar_t, Sums, RowBody>{sum_a, sum_b, row_body});
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
