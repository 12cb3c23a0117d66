// CPU GroupNorm kernels, part 2: schedule choice and the statistics
// of chunks, groups and samples. Part of group_norm_kernels_impl.h, which includes the
// parts in order inside one translation unit per CPU capability.
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

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
  const int64_t run = layout == Layout::ChannelsFirst ? s.HxW : s.C;
  return s.numel() * elem_bytes >= tuning.stream_output_bytes && run * elem_bytes % kCacheLine == 0 &&
         reinterpret_cast<uintptr_t>(out) % kCacheLine == 0;
}

// Values of one fused item: a channels-first group, a channels-last sample.
int64_t fused_item_values(const GroupNormShape& s, Layout layout) {
  return layout == Layout::ChannelsFirst ? s.group_size() : s.HxW * s.C;
}

// The schedule of one call, when not forced: fused where an item (a
// channels-first group, a channels-last sample; input_bytes per value: x, or
// x and dy) fits its budget and there is an item for every thread, else
// two-pass.
Schedule choose_schedule(const GroupNormShape& s, Layout layout, int64_t input_bytes, const CpuTuning& t) {
  if (t.schedule != Schedule::Auto) return t.schedule;
  const bool channels_first = layout == Layout::ChannelsFirst;
  const int64_t items = channels_first ? s.N * s.G : s.N;
  const int64_t budget = channels_first ? t.fused_group_bytes : t.fused_sample_bytes;
  return fused_item_values(s, layout) * input_bytes <= budget && items >= at::get_num_threads() ? Schedule::Fused
                                                                                                : Schedule::TwoPass;
}

// Whether a fused schedule fetches its next item into L2 while it writes the
// current one: only where everything that is then live fits the L2 budget
// (the current item's inputs and output, the next item's inputs: `copies`
// times the item's input bytes). Past that the prefetch evicts the current
// item's values before its output pass reads them.
bool prefetch_fits(int64_t item_bytes, int copies, const CpuTuning& tuning) {
  return copies * item_bytes <= tuning.fused_group_bytes;
}

// Whether an elementwise pass walks its items last to first: where the pass
// before it (statistics, gradient sums) read more on one thread
// (thread_bytes) than that thread's L2 holds, up to a few L2s (see
// cpu_tuning.cpp). That pass walked the same items first to last on the same
// thread (a fused item; at::parallel_for splits a range the same way each
// time), so a backward walk starts on the values still in L2, while a forward
// one would miss on every value, each evicted just before it is read again.
// Within the L2 the forward walk is faster: the hardware prefetchers run
// ahead of its stores.
bool walks_back(int64_t thread_bytes, const CpuTuning& t) {
  return thread_bytes > t.walk_back_bytes && thread_bytes <= t.walk_back_max_bytes;
}

// The bytes one thread reads in the pass before an elementwise pass: a fused
// item's inputs, or its share of the whole tensor's (input_bytes per value).
int64_t read_per_thread(const GroupNormShape& s, Layout layout, Schedule schedule, int64_t input_bytes) {
  if (schedule == Schedule::Fused) return fused_item_values(s, layout) * input_bytes;
  return ceil_div(s.numel() * input_bytes, std::max(at::get_num_threads(), 1));
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
int64_t sum_rows_per_block(int64_t C) { return std::clamp<int64_t>(4 * kChunk / std::max<int64_t>(C, 1), 1, 64); }

// ---- statistics ------------------------------------------------------------
// The center of a chunk of n values is the mean of its first center_count(n):
// a quarter keeps M2's rounding within ~5 units for any data (see
// math::chunk_center) at a quarter of the first pass's cost, and those values
// are in L1 for the second pass anyway.
int64_t center_count(int64_t n) { return (n + 3) / 4; }

// Exact statistics of len contiguous values (one chunk, in L1 for the
// second pass): a center from its first values, then the sums of
// d = x - center and d^2.
template <typename scalar_t>
CenteredStats<acc_type<scalar_t>> chunk_stats(const scalar_t* p, int64_t len) {
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
  return math::stats_from_centered_sums(len, center, sum_d, sum_d2);
}

// Merges the stats of consecutive chunks, pushed in index order, as a
// balanced binary tree (pairwise summation): rounding grows with the log of
// the number of chunks instead of the number. A sequential merge of the
// 2^19 chunks of a 2^31-value group was off by 1e-4 relative in fp32. The
// tree's shape depends only on the count, so results stay reproducible.
template <typename T>
class PairwiseMerge {
 public:
  void push(CenteredStats<T> stats) {
    int level = 0;
    for (uint64_t n = pushed_; n & 1; n >>= 1, ++level) {
      stats = math::chan_merge(levels_[level].stats, stats);  // levels_[level] holds earlier chunks
    }
    levels_[level].stats = stats;
    ++pushed_;
  }
  CenteredStats<T> result() const {
    CenteredStats<T> acc;
    for (int level = 0; (pushed_ >> level) != 0; ++level) {
      if (pushed_ >> level & 1) acc = math::chan_merge(levels_[level].stats, acc);
    }
    return acc;
  }

 private:
  // Left uninitialized: a level is read only after a push wrote it, and
  // zeroing all 64 (1.5 KiB) cost more than a small group's statistics.
  union Level {
    Level() {}
    CenteredStats<T> stats;
  };
  Level levels_[64];  // levels_[i]: merged run of 2^i chunks (if bit i of pushed_)
  uint64_t pushed_ = 0;
};

// A channels-first group: D contiguous values, chunk by chunk.
template <typename scalar_t>
CenteredStats<acc_type<scalar_t>> span_stats(const scalar_t* p, int64_t D) {
  PairwiseMerge<acc_type<scalar_t>> merge;
  for (int64_t start = 0; start < D; start += kChunk) {
    merge.push(chunk_stats(p + start, std::min(kChunk, D - start)));
  }
  return merge.result();
}

// Sums of arrays of `width` values pushed in index order, as a balanced
// binary tree (as PairwiseMerge): accurate over many row blocks, and the
// result depends only on the count. An array is written in place (next(),
// then commit()), so nothing is copied: each commit only adds.
template <typename T>
class PairwiseArraySum {
 public:
  explicit PairwiseArraySum(int64_t width) : width_(width), carry_(width) {}
  // Where the next array goes; commit() adds it in.
  T* next() { return pushed_ & 1 ? carry_.data() : level(0); }
  void commit() {
    if (pushed_ & 1) {  // level 0 holds the previous array: add up the levels
      int64_t lvl = 0;  // the new array is in carry_
      for (uint64_t n = pushed_; n & 1; n >>= 1, ++lvl) {
        T* dest = (n >> 1 & 1) ? carry_.data() : level(lvl + 1);
        const T* earlier = level(lvl);  // after level(lvl + 1), which may grow levels_
        for (int64_t i = 0; i < width_; ++i) dest[i] = earlier[i] + carry_[i];
      }
    }
    ++pushed_;
  }
  void push(const T* values) {
    std::copy(values, values + width_, next());
    commit();
  }
  void clear() { pushed_ = 0; }
  // The pairwise sum of `count` consecutive arrays of `width` values.
  static void sum_of(const T* parts, int64_t count, int64_t width, T* out) {
    PairwiseArraySum sum(width);
    for (int64_t i = 0; i < count; ++i) sum.push(parts + i * width);
    sum.result(out);
  }
  void result(T* out) const {
    std::fill(out, out + width_, T(0));
    for (int64_t lvl = 0; (pushed_ >> lvl) != 0; ++lvl) {
      if ((pushed_ >> lvl & 1) == 0) continue;
      const T* sum = levels_.data() + lvl * width_;
      for (int64_t i = 0; i < width_; ++i) out[i] = sum[i] + out[i];
    }
  }

 private:
  T* level(int64_t lvl) {
    if (static_cast<int64_t>(levels_.size()) < (lvl + 1) * width_) levels_.resize((lvl + 1) * width_);
    return levels_.data() + lvl * width_;
  }

  int64_t width_;
  std::vector<T> carry_;
  std::vector<T> levels_;  // level i: the sum of 2^i arrays (if bit i of pushed_)
  uint64_t pushed_ = 0;
};

// The two-pass schedules' pattern: partial results in parallel, reduced in a
// fixed order. compute(outer, part, out) writes `width` values of T for each
// of outer_count * parts items, in parallel, each into its own span of one
// scratch buffer; then reduce(outer, parts_values) runs for each outer index
// in order on the calling thread, given that index's parts * width values.
// item_values: the input values one item reads (for the parallel grain).
// Items never depend on the thread count, so neither do the results.
template <typename T, typename Compute, typename Reduce>
void chunked_reduce(int64_t outer_count, int64_t parts, int64_t width, int64_t item_values, Compute&& compute,
                    Reduce&& reduce) {
  std::vector<T> scratch(outer_count * parts * width);
  at::parallel_for(0, outer_count * parts, grain_of(item_values), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) compute(item / parts, item % parts, scratch.data() + item * width);
  });
  for (int64_t outer = 0; outer < outer_count; ++outer) {
    reduce(outer, static_cast<const T*>(scratch.data() + outer * parts * width));
  }
}

// Channels-last: per-channel sums over rows [row0, row0 + rows) of one
// sample: of x (center == nullptr; out: C values), or of d = x - center[c]
// and d^2 (out: 2 * C values, the d sums first). Column tile by column tile
// (simd_for_columns), each sum over the rows in order.
template <typename V, int K>
struct CenteredSums {
  std::array<V, K> center, sum_d, sum_d2;
};

template <typename scalar_t, bool Centered>
struct ClBlockSumsOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* block;
  int64_t C;
  const acc_t* center;
  acc_t* out;

  template <typename S>
  CenteredSums<typename S::type, S::count> start(int64_t i, S /*step*/) const {
    using V = typename S::type;
    const auto zeros = [](int) { return V(acc_t(0)); };
    const auto centers = [&](int k) { return Centered ? load_as<V>(center + i + k * S::lanes) : V(acc_t(0)); };
    return {array_of<S::count>(centers), array_of<S::count>(zeros), array_of<S::count>(zeros)};
  }
  template <typename State, typename S>
  void row(State& st, int64_t r, int64_t i, S /*step*/) const {
    typename S::type v[S::count];
    load_values(block + r * C + i, v);
    for (int k = 0; k < S::count; ++k) {
      if constexpr (Centered) {
        const auto d = v[k] - st.center[k];
        st.sum_d[k] = st.sum_d[k] + d;
        st.sum_d2[k] = st.sum_d2[k] + d * d;
      } else {
        st.sum_d[k] = st.sum_d[k] + v[k];
      }
    }
  }
  template <typename State, typename S>
  void finish(const State& st, int64_t i, S /*step*/) const {
    for (int k = 0; k < S::count; ++k) {
      store_as<typename S::type>(out + i + k * S::lanes, st.sum_d[k]);
      if constexpr (Centered) store_as<typename S::type>(out + C + i + k * S::lanes, st.sum_d2[k]);
    }
  }
};

template <typename scalar_t>
void cl_block_sums(const scalar_t* sample, int64_t row0, int64_t rows, int64_t C, const acc_type<scalar_t>* center,
                   acc_type<scalar_t>* out) {
  const scalar_t* block = sample + row0 * C;
  if (center == nullptr) {
    simd_for_columns<scalar_t>(C, rows, ClBlockSumsOp<scalar_t, false>{block, C, center, out});
  } else {
    simd_for_columns<scalar_t>(C, rows, ClBlockSumsOp<scalar_t, true>{block, C, center, out});
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

// The per-channel centers: the mean of the first `count` rows from their sum
// (math::chunk_center, a vector at a time).
template <typename T>
void centers_from_sums(int64_t count, int64_t C, T* center) {
  if (count == 0) return std::fill(center, center + C, T(0));
  for_each_table_vector<T>(C, [&](int64_t c, int64_t n) {
    (TableVec<T>::loadu(center + c, n) / TableVec<T>(T(count))).store(center + c, n);
  });
}

// Stats of one group of Cg channels of n rows each, channel j given as chunk
// stats are: its center c[j] and the sums s1[j], s2[j] of d = x - c[j] and
// d^2. Chan's merge for equal counts: M2 = sum_j (s2 - s1^2 / n) +
// n * sum_j (mean_j - mean)^2, with every mean taken about c[0]. Each channel
// keeps its own center, so channels at different levels (a dead channel, a
// plane of spikes) cost no accuracy.
template <typename T>
CenteredStats<T> merge_channel_stats(int64_t Cg, int64_t n, const T* c, const T* s1, const T* s2) {
  using Vec = TableVec<T>;
  CenteredStats<T> s;
  if (Cg == 0 || n == 0) return s;
  const Vec zero(0), inv_n(T(1) / T(n)), c0(c[0]);
  // Lanes past the group's last channel are 0 in every sum.
  const auto in_group = [&](const Vec& v, int64_t m) { return m < Vec::size() ? Vec::set(zero, v, m) : v; };
  const auto part_mean = [&](int64_t j, int64_t m) {
    return in_group((Vec::loadu(c + j, m) - c0) + Vec::loadu(s1 + j, m) * inv_n, m);
  };
  Vec mean_sum = zero, m2_sum = zero;
  for_each_table_vector<T>(Cg, [&](int64_t j, int64_t m) {
    mean_sum = mean_sum + part_mean(j, m);
    const Vec sum = Vec::loadu(s1 + j, m);
    m2_sum = m2_sum + (Vec::loadu(s2 + j, m) - sum * (sum * inv_n));
  });
  const T offset = horizontal_sum(mean_sum) / T(Cg);
  const Vec rows(static_cast<T>(n));
  for_each_table_vector<T>(Cg, [&](int64_t j, int64_t m) {
    const Vec dev = in_group(part_mean(j, m) - Vec(offset), m);
    m2_sum = m2_sum + rows * (dev * dev);
  });
  const T m2 = horizontal_sum(m2_sum);
  s.count = Cg * n;
  s.center = c[0];
  s.offset = offset;
  s.m2 = m2 < T(0) ? T(0) : m2;  // NaN stays NaN
  return s;
}

template <typename T>
void cl_stats_from_sums(const GroupNormShape& s, const T* center, const T* sums, CenteredStats<T>* out) {
  const int64_t Cg = s.channels_per_group();
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t c0 = g * Cg;
    out[g] = merge_channel_stats(Cg, s.HxW, center + c0, sums + c0, sums + s.C + c0);
  }
}

// What sample_stats keeps between samples: one per work item.
template <typename T>
struct SampleStatsScratch {
  explicit SampleStatsScratch(int64_t C) : center(C), sums(2 * C), center_sum(C), total(2 * C) {}
  std::vector<T> center, sums;
  PairwiseArraySum<T> center_sum, total;
};

// Stats of every group of one channels-last sample (out[G]).
template <typename scalar_t>
void sample_stats(const scalar_t* sample, const GroupNormShape& s, SampleStatsScratch<acc_type<scalar_t>>& scratch,
                  CenteredStats<acc_type<scalar_t>>* out) {
  using acc_t = acc_type<scalar_t>;
  const ClStatsPlan plan = cl_stats_plan(s);
  acc_t* center = scratch.center.data();
  scratch.center_sum.clear();
  for (int64_t b = 0; b < plan.center_blocks; ++b) {
    cl_block_sums(sample, b * plan.block_rows, plan.rows_of(b, plan.center_rows), s.C,
                  static_cast<const acc_t*>(nullptr), scratch.center_sum.next());
    scratch.center_sum.commit();
  }
  scratch.center_sum.result(center);
  centers_from_sums(plan.center_rows, s.C, center);
  scratch.total.clear();
  for (int64_t b = 0; b < plan.blocks; ++b) {
    cl_block_sums(sample, b * plan.block_rows, plan.rows_of(b, s.HxW), s.C, center, scratch.total.next());
    scratch.total.commit();
  }
  scratch.total.result(scratch.sums.data());
  cl_stats_from_sums(s, center, scratch.sums.data(), out);
}

// Two-pass statistics: every chunk / row block in parallel, then merged
// pairwise in index order (as span_stats / sample_stats do).
template <typename scalar_t>
std::vector<CenteredStats<acc_type<scalar_t>>> group_stats(const scalar_t* x, const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  using Stats = CenteredStats<acc_t>;
  const int64_t groups = s.N * s.G;
  std::vector<Stats> result(groups);
  if (s.HxW == 0 || groups == 0) return result;

  if (layout == Layout::ChannelsFirst) {
    const int64_t D = s.group_size();
    const int64_t chunks = ceil_div(D, kChunk);
    chunked_reduce<Stats>(
        groups, chunks, 1, std::min(kChunk, D),
        [&](int64_t group, int64_t k, Stats* out) {
          *out = chunk_stats(x + group * D + k * kChunk, std::min(kChunk, D - k * kChunk));
        },
        [&](int64_t group, const Stats* parts) {
          PairwiseMerge<acc_t> merge;
          for (int64_t k = 0; k < chunks; ++k) merge.push(parts[k]);
          result[group] = merge.result();
        });
    return result;
  }

  const ClStatsPlan plan = cl_stats_plan(s);
  const int64_t C = s.C;
  // Pass 1: per-channel centers from the first rows' sums.
  std::vector<acc_t> centers(s.N * C);
  chunked_reduce<acc_t>(
      s.N, plan.center_blocks, C, plan.block_rows * C,
      [&](int64_t n, int64_t b, acc_t* out) {
        cl_block_sums(x + n * s.HxW * C, b * plan.block_rows, plan.rows_of(b, plan.center_rows), C,
                      static_cast<const acc_t*>(nullptr), out);
      },
      [&](int64_t n, const acc_t* parts) {
        acc_t* center = centers.data() + n * C;
        PairwiseArraySum<acc_t>::sum_of(parts, plan.center_blocks, C, center);
        centers_from_sums(plan.center_rows, C, center);
      });
  // Pass 2: sums about the centers over every row block.
  std::vector<acc_t> sums(2 * C);
  chunked_reduce<acc_t>(
      s.N, plan.blocks, 2 * C, plan.block_rows * C,
      [&](int64_t n, int64_t b, acc_t* out) {
        cl_block_sums(x + n * s.HxW * C, b * plan.block_rows, plan.rows_of(b, s.HxW), C, centers.data() + n * C, out);
      },
      [&](int64_t n, const acc_t* parts) {
        PairwiseArraySum<acc_t>::sum_of(parts, plan.blocks, 2 * C, sums.data());
        cl_stats_from_sums(s, centers.data() + n * C, sums.data(), result.data() + n * s.G);
      });
  return result;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
