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

// Whether `copies` times `bytes` fit one core's L2 budget (fused_group_bytes).
bool fits_l2(int64_t bytes, int copies, const CpuTuning& t) { return copies * bytes <= t.fused_group_bytes; }

// The backward's schedule: choose_schedule's (x and dy are both read twice),
// except that a channels-last sample whose x, dy and dx do not fit L2 runs
// fused only while the call's x, dy and dx stay in L3 (l3_reread_bytes): its
// dx pass reads back what L2 no longer holds, and from memory the two-pass
// schedule's long sequential passes are faster. Not with an activation: the
// fused schedules keep g = dy * act'(z) in cache for the dx pass
// (keeps_grad), where two-pass recomputes it (bf16, fp16) or parks it in dx,
// a round trip through memory at these sizes; that outweighs the reads.
Schedule backward_schedule(const GroupNormShape& s, Layout layout, int64_t elem_bytes, Activation activation,
                           const CpuTuning& t) {
  const Schedule schedule = choose_schedule(s, layout, 2 * elem_bytes, t);
  if (t.schedule != Schedule::Auto || schedule != Schedule::Fused || layout == Layout::ChannelsFirst ||
      activation != Activation::None) {
    return schedule;
  }
  const bool sample_fits_l2 = fits_l2(fused_item_values(s, layout) * elem_bytes, 3, t);
  const bool call_fits_l3 = 3 * s.numel() * elem_bytes <= t.l3_reread_bytes;
  return sample_fits_l2 || call_fits_l3 ? Schedule::Fused : Schedule::TwoPass;
}

// Whether a fused schedule fetches its next item into L2 while it writes the
// current one: only where everything that is then live fits the L2 (the
// current item's inputs and output, the next item's inputs: `copies` times
// the item's input bytes). Past that the prefetch evicts the current item's
// values before its output pass reads them.
bool prefetch_fits(int64_t item_bytes, int copies, const CpuTuning& tuning) {
  return fits_l2(item_bytes, copies, tuning);
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
      b = mul_add(d, d, b);
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

// Arrays of `width` values pushed in index order, merged as a balanced
// binary tree (as PairwiseMerge): accurate over many row blocks, and the
// result depends only on the number pushed. An array is written in place
// (next(), then commit()), so nothing is copied. Merge(earlier, its count,
// later, its count, dest, width) combines two adjacent parts (dest may be
// `later`); each array pushed stands for `count` rows.
template <typename T, typename Merge>
class PairwiseArrays {
 public:
  explicit PairwiseArrays(int64_t width) : width_(width), carry_(width) {}
  // Where the next array goes; commit() adds it in.
  T* next() { return pushed_ & 1 ? carry_.data() : level(0); }
  void commit(int64_t count = 1) {
    if (pushed_ & 1) {  // level 0 holds the previous array; the new one is in carry_
      carry_count_ = count;
      carry_up(pushed_, 0);
    } else {
      counts_[0] = count;
    }
    ++pushed_;
  }
  // Adds a merged run of 2^lvl arrays at once, a whole subtree of the tree
  // the pushes so far build, so pushed_ must be a multiple of 2^lvl: pushing
  // a run's levels (level_values) joins it with the same bits as pushing its
  // arrays one at a time.
  void push_level(const T* values, int lvl, int64_t count) {
    const uint64_t n = pushed_ >> lvl;
    if (n & 1) {
      std::copy(values, values + width_, carry_.data());
      carry_count_ = count;
      carry_up(n, lvl);
    } else {
      std::copy(values, values + width_, level(lvl));
      counts_[lvl] = count;
    }
    pushed_ += uint64_t(1) << lvl;
  }
  // The merge of 2^lvl arrays kept for bit lvl of the number pushed (where it is set).
  const T* level_values(int lvl) const { return levels_.data() + lvl * width_; }
  void push(const T* values, int64_t count = 1) {
    std::copy(values, values + width_, next());
    commit(count);
  }
  void clear() { pushed_ = 0; }
  // The levels merged from the lowest (latest) up; zeros if nothing was pushed.
  void result(T* out) const {
    std::fill(out, out + width_, T(0));
    int64_t count = 0;
    for (int lvl = 0; (pushed_ >> lvl) != 0; ++lvl) {
      if ((pushed_ >> lvl & 1) == 0) continue;
      Merge{}(level_values(lvl), counts_[lvl], static_cast<const T*>(out), count, out, width_);
      count += counts_[lvl];
    }
  }

 private:
  // Merges carry_ into the levels from lvl up while bit 0 of n (the pushes
  // counted in runs of 2^lvl) says the level holds an earlier part.
  void carry_up(uint64_t n, int lvl) {
    for (; n & 1; n >>= 1, ++lvl) {
      T* dest = (n >> 1 & 1) ? carry_.data() : level(lvl + 1);
      const T* earlier = level(lvl);  // after level(lvl + 1), which may grow levels_
      Merge{}(earlier, counts_[lvl], static_cast<const T*>(carry_.data()), carry_count_, dest, width_);
      carry_count_ += counts_[lvl];
      if ((n >> 1 & 1) == 0) counts_[lvl + 1] = carry_count_;
    }
  }
  T* level(int64_t lvl) {
    if (static_cast<int64_t>(levels_.size()) < (lvl + 1) * width_) levels_.resize((lvl + 1) * width_);
    return levels_.data() + lvl * width_;
  }

  int64_t width_;
  std::vector<T> carry_;
  int64_t carry_count_ = 0;
  std::vector<T> levels_;             // level i: the merge of 2^i arrays (if bit i of pushed_)
  std::array<int64_t, 64> counts_{};  // the rows each level stands for
  uint64_t pushed_ = 0;
};

// PairwiseArrays' merge for plain sums, element by element.
struct AddArrays {
  template <typename T>
  void operator()(const T* earlier, int64_t /*earlier_count*/, const T* later, int64_t /*later_count*/, T* dest,
                  int64_t width) const {
    for (int64_t i = 0; i < width; ++i) dest[i] = earlier[i] + later[i];
  }
};

template <typename T>
using PairwiseArraySum = PairwiseArrays<T, AddArrays>;

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

// The channels-last two-pass pattern: per outer index (a sample), the
// pairwise sum (PairwiseArraySum) of `blocks` arrays of `width` values, in
// parallel. block(outer, b, out) writes block b's array; reduce(outer, sum)
// then runs for each outer index in order on the calling thread. Blocks go in
// runs of 2^levels: a run's blocks summed in order are whole subtrees of the
// tree of all blocks, so runs are summed on any thread and joined in order
// (push_level) with the bits of one sum over every block in order, which is
// what the fused schedules take. So the run length may follow the thread
// count: long runs keep the joining, on one thread, short.
template <typename T, typename Block, typename Reduce>
void pairwise_block_sums(int64_t outer_count, int64_t blocks, int64_t width, int64_t block_values, Block&& block,
                         Reduce&& reduce) {
  if (outer_count == 0 || blocks == 0) return;
  // About 8 runs a thread, of at most 64 blocks.
  const int64_t wanted_runs = ceil_div(8 * std::max(at::get_num_threads(), 1), outer_count);
  int levels = 0;
  while (levels < 6 && (blocks >> (levels + 1)) >= wanted_runs) ++levels;
  const int64_t run = int64_t(1) << levels, runs = ceil_div(blocks, run);
  // A run's level sums, slot l for bit l of its block count.
  const int64_t slots = levels + 1;
  const std::unique_ptr<T[]> scratch(new T[outer_count * runs * slots * width]);
  at::parallel_for(0, outer_count * runs, grain_of(run * block_values), [&](int64_t begin, int64_t end) {
    PairwiseArraySum<T> sum(width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t outer = item / runs, b0 = item % runs * run, count = std::min(run, blocks - b0);
      sum.clear();
      for (int64_t b = b0; b < b0 + count; ++b) {
        block(outer, b, sum.next());
        sum.commit();
      }
      for (int l = 0; l < slots; ++l) {
        if (count >> l & 1) std::copy_n(sum.level_values(l), width, scratch.get() + (item * slots + l) * width);
      }
    }
  });
  PairwiseArraySum<T> total(width);
  std::vector<T> result(width);
  for (int64_t outer = 0; outer < outer_count; ++outer) {
    total.clear();
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t item = outer * runs + r, count = std::min(run, blocks - r * run);
      for (int l = levels; l >= 0; --l) {  // larger subtrees hold earlier blocks
        if (count >> l & 1) total.push_level(scratch.get() + (item * slots + l) * width, l, int64_t(1) << l);
      }
    }
    total.result(result.data());
    reduce(outer, static_cast<const T*>(result.data()));
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
        st.sum_d2[k] = mul_add(d, d, st.sum_d2[k]);
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

// Channels-last statistics of a sample, run by run. A run is a fixed number
// of rows (whole row blocks, about kRunValues values: its first rows are
// still in cache when they are read again) with exact per-channel statistics
// of its own, in two phases:
//   centers  per-channel mean of the run's first center_count(rows) rows (a
//            subset bounds M2's rounding as a whole-chunk mean would: see
//            math::chunk_center);
//   sums     per-channel sums of d = x - center and d^2 over the run's rows,
//            row block by row block, summed pairwise;
// so x is read from memory once. Runs merge per channel with Chan's formula,
// pairwise in row order (MergeChannelStats), then each group's channels merge
// as equal parts (channels at different levels cost no accuracy). The fused
// schedule runs the runs of a sample in order, the two-pass schedule in
// parallel; both merge the same runs in the same order.
constexpr int64_t kRunValues = 16 * kChunk;

struct ClStatsPlan {
  int64_t block_rows, run_rows, runs;
  int64_t rows_of_run(int64_t run, int64_t HxW) const { return std::min(run_rows, HxW - run * run_rows); }
};

ClStatsPlan cl_stats_plan(const GroupNormShape& s) {
  const int64_t block_rows = sum_rows_per_block(s.C);
  int64_t run_rows = block_rows;
  while (2 * run_rows * s.C <= kRunValues) run_rows *= 2;
  return {block_rows, run_rows, ceil_div(s.HxW, run_rows)};
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

// Per-channel statistics of C channels of equal count, as three arrays of C:
// centers, offsets (mean - center) and M2s (math::CenteredStats, a channel a
// lane). PairwiseArrays' merge of two adjacent row ranges: math::chan_merge
// for every channel at once.
struct MergeChannelStats {
  template <typename T>
  void operator()(const T* a, int64_t na, const T* b, int64_t nb, T* dest, int64_t width) const {
    using Vec = TableVec<T>;
    if (nb == 0 || na == 0) {
      const T* only = nb == 0 ? a : b;
      if (dest != only) std::copy(only, only + width, dest);
      return;
    }
    const int64_t C = width / 3;
    const T b_frac = T(nb) / T(na + nb);
    const Vec frac(b_frac), weight(T(na) * b_frac);
    for_each_table_vector<T>(C, [&](int64_t c, int64_t m) {
      const Vec ca = Vec::loadu(a + c, m), oa = Vec::loadu(a + C + c, m);
      const Vec delta = (Vec::loadu(b + c, m) - ca) + (Vec::loadu(b + C + c, m) - oa);
      const Vec offset = oa + delta * frac;
      const Vec center = ca + offset;
      const Vec m2 = Vec::loadu(a + 2 * C + c, m) + Vec::loadu(b + 2 * C + c, m) + delta * delta * weight;
      center.store(dest + c, m);
      ((ca - center) + offset).store(dest + C + c, m);
      m2.store(dest + 2 * C + c, m);
    });
  }
};

// Stats of one group of Cg channels of n rows each (centers c, offsets o,
// M2s m2, as MergeChannelStats holds them). Chan's merge for equal counts:
// M2 = sum_j m2[j] + n * sum_j (mean_j - mean)^2, with every mean taken about
// c[0]. Each channel keeps its own center, so channels at different levels (a
// dead channel, a plane of spikes) cost no accuracy.
template <typename T>
CenteredStats<T> merge_channel_stats(int64_t Cg, int64_t n, const T* c, const T* o, const T* m2) {
  using Vec = TableVec<T>;
  CenteredStats<T> s;
  if (Cg == 0 || n == 0) return s;
  const Vec zero(0), c0(c[0]);
  // Lanes past the group's last channel load as 0; their means are not.
  const auto in_group = [&](const Vec& v, int64_t m) { return m < Vec::size() ? Vec::set(zero, v, m) : v; };
  const auto part_mean = [&](int64_t j, int64_t m) {
    return in_group((Vec::loadu(c + j, m) - c0) + Vec::loadu(o + j, m), m);
  };
  Vec mean_sum = zero, m2_sum = zero;
  for_each_table_vector<T>(Cg, [&](int64_t j, int64_t m) {
    mean_sum = mean_sum + part_mean(j, m);
    m2_sum = m2_sum + Vec::loadu(m2 + j, m);
  });
  const T offset = horizontal_sum(mean_sum) / T(Cg);
  const Vec rows(static_cast<T>(n));
  for_each_table_vector<T>(Cg, [&](int64_t j, int64_t m) {
    const Vec dev = in_group(part_mean(j, m) - Vec(offset), m);
    m2_sum = m2_sum + rows * (dev * dev);
  });
  const T total = horizontal_sum(m2_sum);
  s.count = Cg * n;
  s.center = c[0];
  s.offset = offset;
  s.m2 = total < T(0) ? T(0) : total;  // NaN stays NaN
  return s;
}

// Every group's stats from the per-channel stats of a whole sample.
template <typename T>
void cl_stats_from_channels(const GroupNormShape& s, const T* channels, CenteredStats<T>* out) {
  const int64_t Cg = s.channels_per_group();
  for (int64_t g = 0; g < s.G; ++g) {
    const T* first = channels + g * Cg;
    out[g] = merge_channel_stats(Cg, s.HxW, first, first + s.C, first + 2 * s.C);
  }
}

// What a run's statistics keep between runs: one per work item.
template <typename T>
struct ClRunScratch {
  explicit ClRunScratch(int64_t C) : center_sum(C), total(2 * C), sums(2 * C) {}
  PairwiseArraySum<T> center_sum, total;
  std::vector<T> sums;
};

// Per-channel stats (MergeChannelStats' arrays, out: 3 * C values) of run
// `run` of a channels-last sample; returns its rows.
template <typename scalar_t>
int64_t cl_run_stats(const scalar_t* sample, const GroupNormShape& s, const ClStatsPlan& plan, int64_t run,
                     ClRunScratch<acc_type<scalar_t>>& scratch, acc_type<scalar_t>* out) {
  using acc_t = acc_type<scalar_t>;
  using Vec = TableVec<acc_t>;
  const int64_t C = s.C, row0 = run * plan.run_rows, rows = plan.rows_of_run(run, s.HxW);
  const int64_t center_rows = center_count(rows);
  acc_t* center = out;
  scratch.center_sum.clear();
  for (int64_t r = 0; r < center_rows; r += plan.block_rows) {
    cl_block_sums(sample, row0 + r, std::min(plan.block_rows, center_rows - r), C, static_cast<const acc_t*>(nullptr),
                  scratch.center_sum.next());
    scratch.center_sum.commit();
  }
  scratch.center_sum.result(center);
  centers_from_sums(center_rows, C, center);
  scratch.total.clear();
  for (int64_t r = 0; r < rows; r += plan.block_rows) {
    cl_block_sums(sample, row0 + r, std::min(plan.block_rows, rows - r), C, static_cast<const acc_t*>(center),
                  scratch.total.next());
    scratch.total.commit();
  }
  scratch.total.result(scratch.sums.data());
  const acc_t* sum_d = scratch.sums.data();
  // math::stats_from_centered_sums, a vector of channels at a time.
  const Vec count(static_cast<acc_t>(rows)), zero(0);
  for_each_table_vector<acc_t>(C, [&](int64_t c, int64_t m) {
    const Vec d = Vec::loadu(sum_d + c, m);
    const Vec offset = d / count;
    const Vec m2 = Vec::loadu(sum_d + C + c, m) - d * offset;
    offset.store(out + C + c, m);
    Vec::blendv(m2, zero, m2 < zero).store(out + 2 * C + c, m);  // NaN stays NaN
  });
  return rows;
}

// What sample_stats keeps between samples: one per work item.
template <typename T>
struct SampleStatsScratch {
  explicit SampleStatsScratch(int64_t C) : run(C), runs(3 * C), channels(3 * C) {}
  ClRunScratch<T> run;
  PairwiseArrays<T, MergeChannelStats> runs;
  std::vector<T> channels;
};

// Stats of every group of one channels-last sample (out[G]).
template <typename scalar_t>
void sample_stats(const scalar_t* sample, const GroupNormShape& s, SampleStatsScratch<acc_type<scalar_t>>& scratch,
                  CenteredStats<acc_type<scalar_t>>* out) {
  const ClStatsPlan plan = cl_stats_plan(s);
  scratch.runs.clear();
  for (int64_t r = 0; r < plan.runs; ++r) {
    acc_type<scalar_t>* next = scratch.runs.next();
    scratch.runs.commit(cl_run_stats(sample, s, plan, r, scratch.run, next));
  }
  scratch.runs.result(scratch.channels.data());
  cl_stats_from_channels(s, scratch.channels.data(), out);
}

// Two-pass statistics: every chunk / run in parallel, then merged
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
  const int64_t width = 3 * s.C, items = s.N * plan.runs;
  const std::unique_ptr<acc_t[]> parts(new acc_t[items * width]);  // written whole below
  at::parallel_for(0, items, grain_of(plan.run_rows * s.C), [&](int64_t begin, int64_t end) {
    ClRunScratch<acc_t> scratch(s.C);
    for (int64_t item = begin; item < end; ++item) {
      cl_run_stats(x + item / plan.runs * s.HxW * s.C, s, plan, item % plan.runs, scratch, parts.get() + item * width);
    }
  });
  PairwiseArrays<acc_t, MergeChannelStats> runs(width);
  std::vector<acc_t> channels(width);
  for (int64_t n = 0; n < s.N; ++n) {
    runs.clear();
    for (int64_t r = 0; r < plan.runs; ++r)
      runs.push(parts.get() + (n * plan.runs + r) * width, plan.rows_of_run(r, s.HxW));
    runs.result(channels.data());
    cl_stats_from_channels(s, channels.data(), result.data() + n * s.G);
  }
  return result;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
