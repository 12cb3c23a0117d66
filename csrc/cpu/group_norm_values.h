// CPU GroupNorm kernels, part 3: per-run coefficients and the elementwise
// passes over runs. Part of group_norm_kernels_impl.h, which includes the parts in
// order inside one translation unit per CPU capability.
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// ---- coefficients -------------------------------------------------------------
// Consecutive entries of a parameter; an absent parameter is null (not
// allocated as ones / zeros on every call) and reads as `absent`.
template <typename T>
struct ParamSpan {
  const T* data;
  T absent;
  T operator[](int64_t c) const { return data != nullptr ? data[c] : absent; }
};

// weight and bias: per channel (stride 0) or per sample (stride C, AdaGN /
// FiLM modulation folded in), or absent (null: 1 and 0); entry (n, c) at
// data + n * stride + c.
template <typename T>
struct AffineParams {
  const T* w;
  const T* b;
  int64_t w_stride, b_stride;
  ParamSpan<T> weight(int64_t n, int64_t c) const { return {w != nullptr ? w + n * w_stride + c : nullptr, T(1)}; }
  ParamSpan<T> bias(int64_t n, int64_t c) const { return {b != nullptr ? b + n * b_stride + c : nullptr, T(0)}; }
};

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

// Entries [c, c + n) of a parameter as a vector (TableVec).
template <typename T>
TableVec<T> load_params(ParamSpan<T> p, int64_t c, int64_t n) {
  return p.data != nullptr ? TableVec<T>::loadu(p.data + c, n) : TableVec<T>(p.absent);
}

// Cg copies of value (a group's pivots).
template <typename T>
void fill_table(T* p, int64_t Cg, T value) {
  for_each_table_vector<T>(Cg, [&](int64_t c, int64_t n) { TableVec<T>(value).store(p + c, n); });
}

// The scale and shift of one group's Cg channels from its residual
// mean - pivot and rstd: the forward's, and the backward's rebuild of them
// (to recompute z for the activation's derivative).
template <typename T>
void fold_group_affine(T residual, T rstd, ParamSpan<T> w, ParamSpan<T> b, int64_t Cg, T* scale, T* shift) {
  for_each_table_vector<T>(Cg, [&](int64_t c, int64_t n) {
    const auto affine =
        math::fold_affine(TableVec<T>(residual), TableVec<T>(rstd), load_params(w, c, n), load_params(b, c, n));
    affine.scale.store(scale + c, n);
    affine.shift.store(shift + c, n);
  });
}

// mean and rstd of one group and the pivot/scale/shift of its Cg channels
// (w, b, pivot, scale, shift point at the group's first channel): the pivot
// is the rounded mean, its residual goes into the shift.
template <typename T>
void group_forward_coefs(const CenteredStats<T>& stats, T eps, ParamSpan<T> w, ParamSpan<T> b, int64_t Cg, T* mean,
                         T* rstd, T* pivot, T* scale, T* shift) {
  const T m = math::rounded_mean(stats);
  const T r = math::rstd_from_stats(stats, eps);
  *mean = m;
  *rstd = r;
  fill_table(pivot, Cg, m);
  fold_group_affine(math::mean_residual(stats, m), r, w, b, Cg, scale, shift);
}

// The dx coefficients of one group's Cg channels, from their sums of
// g * (x - pivot) and g.
template <typename T>
void group_input_grad_coefs(const T* sum_gx, const T* sum_g, ParamSpan<T> w, int64_t Cg, T residual, T rstd,
                            int64_t group_size, T* g_coef, T* x_coef, T* bias_coef) {
  // Weighted sums a vector of channels at a time, then across lanes: a fixed
  // order, the same in every schedule.
  TableVec<T> gwx(0), gw(0);
  for_each_table_vector<T>(Cg, [&](int64_t c, int64_t n) {
    const TableVec<T> wc = load_params(w, c, n);
    gwx = gwx + wc * TableVec<T>::loadu(sum_gx + c, n);
    gw = gw + wc * TableVec<T>::loadu(sum_g + c, n);
    (TableVec<T>(rstd) * wc).store(g_coef + c, n);
  });
  const T sum_gwx = horizontal_sum(gwx);
  const T sum_gw = horizontal_sum(gw);
  const auto coefs = math::input_grad_coefs(sum_gwx, sum_gw, residual, rstd, group_size);
  for_each_table_vector<T>(Cg, [&](int64_t c, int64_t n) {
    TableVec<T>(coefs.x_coef).store(x_coef + c, n);
    TableVec<T>(coefs.bias_coef).store(bias_coef + c, n);
  });
}

// One group's terms of the parameter gradients, added to dweight and dbias
// (pointers at the group's first channel).
template <typename T>
void add_group_param_grads(const T* sum_gx, const T* sum_g, int64_t Cg, T residual, T rstd, T* dweight, T* dbias) {
  for_each_table_vector<T>(Cg, [&](int64_t c, int64_t n) {
    const TableVec<T> gs = TableVec<T>::loadu(sum_g + c, n);
    const TableVec<T> term =
        math::weight_grad_term(TableVec<T>::loadu(sum_gx + c, n), gs, TableVec<T>(residual), TableVec<T>(rstd));
    (TableVec<T>::loadu(dweight + c, n) + term).store(dweight + c, n);
    (TableVec<T>::loadu(dbias + c, n) + gs).store(dbias + c, n);
  });
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
  V get(int64_t /*j*/) const {
    return V(value);
  }
};

template <typename T>
struct ChannelArray {
  const T* values;
  template <typename V>
  V get(int64_t j) const {
    return load_as<V>(values + j);
  }
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
  return RunAffine<Coef>{run_coef(t.pivot, ci, pc), run_coef(t.scale, ci, pc), run_coef(t.shift, ci, pc)};
}

template <typename T, typename P>
inline auto run_input_grad(const InputGradTables<T>& t, int64_t ci, P pc) {
  using Coef = decltype(run_coef(t.g_coef, ci, pc));
  return RunInputGrad<Coef>{run_coef(t.g_coef, ci, pc), run_coef(t.x_coef, ci, pc), run_coef(t.bias_coef, ci, pc)};
}

// For the values at offset j of a run: x - pivot, and the pre-activation
// output z = (x - pivot) * scale + shift.
template <typename V, typename Coef>
inline V centered(V x, const RunAffine<Coef>& a, int64_t j) {
  return x - a.pivot.template get<V>(j);
}

template <typename V, typename Coef>
inline V pre_activation(V x_centered, const RunAffine<Coef>& a, int64_t j) {
  return mul_add(x_centered, a.scale.template get<V>(j), a.shift.template get<V>(j));
}

// dx = g_coef * g + x_coef * d + bias_coef, for d = x - pivot.
template <typename V>
inline V input_grad_value(const V& g_coef, const V& g, const V& x_coef, const V& d, const V& bias_coef) {
  return mul_add(g_coef, g, mul_add(x_coef, d, bias_coef));
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

// Fetches the n values from p into L2, a cache line at a time.
template <typename T>
inline void prefetch_lines(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t at = 0; at < n * static_cast<int64_t>(sizeof(T)); at += kCacheLine) __builtin_prefetch(bytes + at, 0, 2);
}

// Called at every SIMD step i of a run; fetches once per cache line (an
// AVX2 step covers half a line).
template <typename scalar_t, int Inputs>
inline void prefetch_next(const RunWrite<scalar_t, Inputs>& w, int64_t i) {
  constexpr int64_t kLineValues = kCacheLine / sizeof(scalar_t);
  if (i % kLineValues != 0) return;
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

// Channels-last forward over `rows` rows of one sample (x, y at the first
// row; t: the sample's per-channel tables), in blocks of rows, column tile by
// column tile (simd_for_columns: the coefficients stay in registers). Each
// value is computed as forward_run computes it.
template <typename scalar_t, Activation A, bool Stream>
struct ForwardColumnsOp {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  int64_t C;
  AffineTables<acc_t> t;
  const scalar_t* next;  // the same rows of the next item, prefetched (or null)

  template <typename S>
  std::array<RunAffine<Broadcast<typename S::type>>, S::count> start(int64_t i, S /*step*/) const {
    using V = typename S::type;
    return array_of<S::count>([&](int k) {
      const int64_t j = i + k * S::lanes;
      return RunAffine<Broadcast<V>>{{load_as<V>(t.pivot + j)}, {load_as<V>(t.scale + j)}, {load_as<V>(t.shift + j)}};
    });
  }
  template <typename State, typename S>
  void row(const State& a, int64_t r, int64_t i, S /*step*/) const {
    using V = typename S::type;
    V v[S::count];
    if (!std::is_arithmetic_v<V> && next != nullptr) __builtin_prefetch(next + r * C + i, 0, 2);
    load_values(x + r * C + i, v);
    for (int k = 0; k < S::count; ++k) v[k] = math::activate<A>(pre_activation(centered(v[k], a[k], 0), a[k], 0));
    store_values(y + r * C + i, v, Stream);
  }
  template <typename State, typename S>
  void finish(const State& /*a*/, int64_t /*i*/, S /*step*/) const {}
};

// Blocks go first to last, or last to first where `backward` (walks_back).
template <typename scalar_t, Activation A>
void cl_forward_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, const AffineTables<acc_type<scalar_t>>& t,
                     const RunWrite<scalar_t, 1>& w, bool backward) {
  const int64_t block = sum_rows_per_block(C);
  const int64_t blocks = ceil_div(rows, block);
  for_each_item(0, blocks, backward, [&](int64_t b, int64_t /*ahead*/) {
    const int64_t r0 = b * block;
    const int64_t n = std::min(block, rows - r0);
    // Fetch ahead, either way (a column tile's walk down the rows defeats the
    // hardware prefetchers): the next item's rows, or else the block walked next.
    const int64_t ahead = backward ? b - 1 : b + 1;
    const scalar_t* next = w.next[0] != nullptr           ? w.next[0] + r0 * C
                           : ahead >= 0 && ahead < blocks ? x + ahead * block * C
                                                          : nullptr;
    if (w.stream) {
      simd_for_columns<scalar_t>(C, n, ForwardColumnsOp<scalar_t, A, true>{x + r0 * C, y + r0 * C, C, t, next});
    } else {
      simd_for_columns<scalar_t>(C, n, ForwardColumnsOp<scalar_t, A, false>{x + r0 * C, y + r0 * C, C, t, next});
    }
  });
}

// The loop body adding g * (x - pivot) and g of a run into two accumulators:
// V-typed scalars (simd_sum2) or arrays (simd_column_sums). With an
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
std::pair<acc_type<scalar_t>, acc_type<scalar_t>> plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t HxW,
                                                                  const AffineTables<acc_type<scalar_t>>& t, int64_t ci,
                                                                  acc_type<scalar_t>* g_out) {
  acc_type<scalar_t> sum_gx = 0, sum_g = 0;
  const auto a = run_affine(t, ci, PerRun{});
  for (int64_t start = 0; start < HxW; start += kChunk) {
    const auto part =
        simd_sum2<scalar_t>(std::min(kChunk, HxW - start),
                            grad_sums_body<scalar_t, A>(dy + start, x + start, a, g_out ? g_out + start : nullptr));
    sum_gx += part.first;
    sum_g += part.second;
  }
  return {sum_gx, sum_g};
}

// Channels-last: per-channel sums of g * (x - pivot) and g over rows
// [row0, row0 + rows) of one sample into block_gx, block_g (C values each).
template <typename scalar_t, Activation A>
void cl_block_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t row0, int64_t rows, int64_t C,
                        const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* block_gx,
                        acc_type<scalar_t>* block_g, acc_type<scalar_t>* g_out = nullptr) {
  const auto a = run_affine(t, 0, PerChannel{});
  simd_column_sums<scalar_t, 2>(C, rows, block_gx, block_g, [&](int64_t r) {
    const int64_t offset = (row0 + r) * C;
    return grad_sums_body<scalar_t, A>(dy + offset, x + offset, a, g_out ? g_out + offset : nullptr);
  });
}

// dx of a run from g: read back from g_saved (kept by the sums pass) or
// recomputed from dy and x. The branch is taken once per run, so a run with
// g_saved reads neither dy nor computes act'(z).
template <typename scalar_t, Activation A, typename Coef>
inline void input_grad_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, const RunAffine<Coef> a,
                           const RunInputGrad<Coef> ig, const RunWrite<scalar_t, 2>& w,
                           const acc_type<scalar_t>* g_saved = nullptr) {
  const auto run = [&](const auto& load_grad) {
    simd_for<scalar_t>(len, [&](int64_t i, auto step) {
      using S = decltype(step);
      using V = typename S::type;
      V xv[S::count], gv[S::count];
      if constexpr (!std::is_arithmetic_v<V>) prefetch_next(w, i);
      load_values(x + i, xv);
      load_grad(i, step, xv, gv);
      for (int k = 0; k < S::count; ++k) {
        const int64_t j = i + k * S::lanes;
        const V d = centered(xv[k], a, j);
        gv[k] = input_grad_value(ig.g_coef.template get<V>(j), gv[k], ig.x_coef.template get<V>(j), d,
                                 ig.bias_coef.template get<V>(j));
      }
      store_values(dx + i, gv, w.stream);
    });
  };
  if (A != Activation::None && g_saved != nullptr) {
    // g_saved may be dx itself, each value read before it is written; the
    // tail step redoes values the steps before it wrote (simd_for), so its g
    // is read first.
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t L = Vec::size();
    const bool overlapping_tail = len % L != 0 && tail_as_vector<IO>(len);
    const Vec tail_g = overlapping_tail ? Vec::loadu(g_saved + len - L) : Vec(0);
    run([&](int64_t i, auto step, const auto& /*xv*/, auto& gv) {
      using S = decltype(step);
      if constexpr (std::is_same_v<typename S::type, Vec> && S::count == 1) {
        if (overlapping_tail && i == len - L) {
          gv[0] = tail_g;
          return;
        }
      }
      for (int k = 0; k < S::count; ++k) gv[k] = load_as<typename S::type>(g_saved + i + k * S::lanes);
    });
  } else {
    run([&](int64_t i, auto step, const auto& xv, auto& gv) {
      using S = decltype(step);
      load_values(dy + i, gv);
      for (int k = 0; k < S::count; ++k) gv[k] = centered_and_grad<A>(xv[k], gv[k], a, i + k * S::lanes).second;
    });
  }
}

// Two-pass elementwise passes: fn(base, len, ci, per_channel, ahead) for
// every run, in parallel, with coefficients in (N * C) tables; each thread
// walks its runs backward where `backward` (walks_back). ahead: in a backward
// walk, where the run walked next starts (to fetch); -1 otherwise.
template <typename Fn>
void for_each_run(const GroupNormShape& s, Layout layout, bool backward, const Fn& fn) {
  if (layout == Layout::ChannelsFirst) {
    const int64_t chunks = ceil_div(s.HxW, kChunk);
    const auto base = [&](int64_t item) { return item / chunks * s.HxW + item % chunks * kChunk; };
    at::parallel_for(0, s.N * s.C * chunks, grain_of(std::min(kChunk, s.HxW)), [&](int64_t begin, int64_t end) {
      for_each_item(begin, end, backward, [&](int64_t item, int64_t ahead) {
        fn(base(item), std::min(kChunk, s.HxW - item % chunks * kChunk), item / chunks, PerRun{},
           ahead >= 0 ? base(ahead) : int64_t(-1));
      });
      stream_fence();
    });
  } else {
    at::parallel_for(0, s.N * s.HxW, rows_per_block(s.C), [&](int64_t begin, int64_t end) {
      for_each_item(begin, end, backward, [&](int64_t row, int64_t ahead) {
        fn(row * s.C, s.C, row / s.HxW * s.C, PerChannel{}, ahead >= 0 ? ahead * s.C : int64_t(-1));
      });
      stream_fence();
    });
  }
}

// Channels-last two-pass elementwise passes: fn(n, row0, rows) for the rows
// of each sample that one thread takes (split as the statistics' row blocks,
// sum_rows_per_block), in parallel; pieces in different samples go in the
// order of `backward` (walks_back).
template <typename Fn>
void for_each_row_range(const GroupNormShape& s, bool backward, const Fn& fn) {
  const int64_t block = sum_rows_per_block(s.C);
  const int64_t blocks = ceil_div(s.HxW, block);
  at::parallel_for(0, s.N * blocks, grain_of(block * s.C), [&](int64_t begin, int64_t end) {
    const int64_t first = begin / blocks, last = (end - 1) / blocks;
    for_each_item(first, last + 1, backward, [&](int64_t n, int64_t /*ahead*/) {
      const int64_t row0 = n == first ? begin % blocks * block : 0;
      const int64_t row_end = n == last ? std::min(s.HxW, ((end - 1) % blocks + 1) * block) : s.HxW;
      fn(n, row0, row_end - row0);
    });
    stream_fence();
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
