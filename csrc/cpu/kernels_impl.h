// CPU GroupNorm kernels, compiled once per CPU capability (DEFAULT, AVX2):
// group_norm_kernels.cpp and group_norm_kernels_avx2.cpp define
// CPU_CAPABILITY and include this file, so each copy of at::vec::Vectorized
// (namespace at::vec::CPU_CAPABILITY) and of these kernels (namespace
// gnflex::cpu::CPU_CAPABILITY) is distinct. group_norm_cpu.cpp picks one at run
// time from ATen's CPU capability.
//
// Data flow (both layouts):
//   forward:  pivots -> per-group Welford stats over (x - pivot) -> mean, rstd
//             -> per-(n, c) scale/shift -> y = act((x - pivot) * scale + shift)
//   backward: per-(n, c) sums of g and g * (x - pivot), g = dy * act'(z)
//             -> dweight, dbias and per-group dx coefficients
//             -> dx = a * g + x_coef * (x - pivot) + bias_coef
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
// is written once, generically in V.
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

template <typename scalar_t, typename V, int K>
inline void store_values(scalar_t* p, const V (&v)[K]) {
  if constexpr (std::is_arithmetic_v<V>) {
    *p = static_cast<scalar_t>(v[0]);
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
template <typename scalar_t, typename Body>
inline std::pair<acc_type<scalar_t>, acc_type<scalar_t>> simd_sum2(int64_t n, const Body& body) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  typename IO::Vec va(acc_t(0)), vb(acc_t(0));
  acc_t sa = 0, sb = 0;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) body(i, Step<typename IO::Vec, IO::kVecs>{}, va, vb);
  for (; i < n; ++i) body(i, Step<acc_t, 1>{}, sa, sb);
  return {horizontal_sum(va) + sa, horizontal_sum(vb) + sb};
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

// ---- per-(n, c) tables ---------------------------------------------------
// pivot of channel c's group, broadcast to every channel: (N * C).
template <typename scalar_t>
std::vector<acc_type<scalar_t>> channel_pivots(const scalar_t* x, const GroupNormShape& s,
                                               Layout layout) {
  std::vector<acc_type<scalar_t>> pivots(s.N * s.C, 0);
  if (s.HxW == 0) return pivots;
  const int64_t Cg = s.channels_per_group();
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t first_channel = c / Cg * Cg;
      const int64_t offset = layout == Layout::ChannelsFirst
                                 ? (n * s.C + first_channel) * s.HxW
                                 : n * s.HxW * s.C + first_channel;
      pivots[n * s.C + c] = static_cast<acc_type<scalar_t>>(x[offset]);
    }
  }
  return pivots;
}

// ---- statistics ------------------------------------------------------------
// Welford stats of x - pivot for each of the N * G groups.
template <typename scalar_t>
std::vector<WelfordStats<acc_type<scalar_t>>> group_stats(
    const scalar_t* x, const std::vector<acc_type<scalar_t>>& pivots, const GroupNormShape& s,
    Layout layout) {
  using acc_t = acc_type<scalar_t>;
  using Stats = WelfordStats<acc_t>;
  const int64_t groups = s.N * s.G;
  const int64_t Cg = s.channels_per_group();
  std::vector<Stats> result(groups);
  if (s.HxW == 0 || groups == 0) return result;

  if (layout == Layout::ChannelsFirst) {
    // A group is one contiguous span of D values, cut into chunks.
    const int64_t D = s.group_size();
    const int64_t chunks = ceil_div(D, kChunk);
    std::vector<Stats> partial(groups * chunks);
    at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t group = item / chunks;
        const int64_t start = item % chunks * kChunk;
        const int64_t len = std::min(kChunk, D - start);
        const scalar_t* span = x + group * D + start;
        const acc_t pivot = pivots[group * Cg];
        auto [sum, sum_sq] = simd_sum2<scalar_t>(len, [&](int64_t i, auto step, auto& a, auto& b) {
          using S = decltype(step);
          using V = typename S::type;
          V v[S::count];
          load_values(span + i, v);
          for (int k = 0; k < S::count; ++k) {
            const V d = v[k] - V(pivot);
            a = a + d;
            b = b + d * d;
          }
        });
        partial[item] = math::welford_from_sums(len, sum, sum_sq);
      }
    });
    for (int64_t group = 0; group < groups; ++group) {
      Stats acc;
      for (int64_t k = 0; k < chunks; ++k) acc = math::welford_combine(acc, partial[group * chunks + k]);
      result[group] = acc;
    }
    return result;
  }

  // Channels-last: a work item is a block of rows (spatial positions) of one
  // sample; it sums x - pivot per channel, then per group.
  const int64_t rows_per_block = std::max<int64_t>(1, kChunk / std::max<int64_t>(s.C, 1));
  const int64_t blocks = ceil_div(s.HxW, rows_per_block);
  std::vector<Stats> partial(s.N * blocks * s.G);
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(s.C), sum_sq(s.C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int64_t row0 = item % blocks * rows_per_block;
      const int64_t rows = std::min(rows_per_block, s.HxW - row0);
      const acc_t* pivot = pivots.data() + n * s.C;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(sum_sq.begin(), sum_sq.end(), acc_t(0));
      for (int64_t r = row0; r < row0 + rows; ++r) {
        const scalar_t* row = x + (n * s.HxW + r) * s.C;
        simd_accumulate_row<scalar_t>(s.C, sum.data(), sum_sq.data(),
                                      [&](int64_t i, auto step, auto& a, auto& b) {
          using S = decltype(step);
          using V = typename S::type;
          load_values(row + i, a);
          for (int k = 0; k < S::count; ++k) {
            a[k] = a[k] - load_as<V>(pivot + i + k * S::lanes);
            b[k] = a[k] * a[k];
          }
        });
      }
      for (int64_t g = 0; g < s.G; ++g) {
        acc_t group_sum = 0, group_sum_sq = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          group_sum += sum[c];
          group_sum_sq += sum_sq[c];
        }
        partial[item * s.G + g] = math::welford_from_sums(rows * Cg, group_sum, group_sum_sq);
      }
    }
  });
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      Stats acc;
      for (int64_t b = 0; b < blocks; ++b) {
        acc = math::welford_combine(acc, partial[(n * blocks + b) * s.G + g]);
      }
      result[n * s.G + g] = acc;
    }
  }
  return result;
}

// ---- elementwise passes ------------------------------------------------------
// Compile-time layout of a run's coefficients (see for_each_run).
using PerChannel = std::true_type;
using PerRun = std::false_type;

// Calls fn(base, len, coef_index, per_channel) for every contiguous run of
// values that share a coefficient layout, in parallel:
//   channels-first: a run is (part of) one (n, c) plane, coefficients are
//                   scalars at coef_index = n * C + c (per_channel: PerRun);
//   channels-last:  a run is one row of C channels, coefficients are the
//                   arrays starting at coef_index = n * C (per_channel: PerChannel).
// per_channel is a type so each layout gets its own loop, free of branches.
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
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(s.C, 1));
    at::parallel_for(0, s.N * s.HxW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) fn(row * s.C, s.C, row / s.HxW * s.C, PerChannel{});
    });
  }
}

// A coefficient table entry as value type V: broadcast of the run's scalar
// (channels-first) or the vector of channels starting at channel j.
template <typename V, typename T, typename P>
inline V coef(const T* table, int64_t index, P /*per_channel*/, int64_t j) {
  if constexpr (P::value) {
    return load_as<V>(table + index + j);
  } else {
    return V(table[index]);
  }
}

// The forward's per-(n, c) coefficient tables: y = act((x - pivot) * scale + shift).
template <typename T>
struct AffineTables {
  const T* pivot;
  const T* scale;
  const T* shift;
};

// For the values at channel offset j of a run: x - pivot, and the
// pre-activation output z = (x - pivot) * scale + shift.
template <typename V, typename T, typename P>
inline V centered(V x, const AffineTables<T>& t, int64_t ci, P per_channel, int64_t j) {
  return x - coef<V>(t.pivot, ci, per_channel, j);
}

template <typename V, typename T, typename P>
inline V pre_activation(V x_centered, const AffineTables<T>& t, int64_t ci, P per_channel,
                        int64_t j) {
  return x_centered * coef<V>(t.scale, ci, per_channel, j) + coef<V>(t.shift, ci, per_channel, j);
}

// d = x - pivot and g = dy * act'(z), z recomputed from x.
template <Activation A, typename V, typename T, typename P>
inline std::pair<V, V> centered_and_grad(V x, V dy, const AffineTables<T>& t, int64_t ci,
                                         P per_channel, int64_t j) {
  const V d = centered(x, t, ci, per_channel, j);
  if constexpr (A == Activation::None) {
    return {d, dy};
  } else {
    return {d, dy * math::activate_grad<A>(pre_activation(d, t, ci, per_channel, j))};
  }
}

template <typename scalar_t, Activation A>
void apply_forward(const scalar_t* x, scalar_t* y, const GroupNormShape& s, Layout layout,
                   const AffineTables<acc_type<scalar_t>>& t) {
  for_each_run(s, layout, [&](int64_t base, int64_t len, int64_t ci, auto per_channel) {
    simd_for<scalar_t>(len, [&](int64_t i, auto step) {
      using S = decltype(step);
      using V = typename S::type;
      V v[S::count];
      load_values(x + base + i, v);
      for (int k = 0; k < S::count; ++k) {
        const int64_t j = i + k * S::lanes;
        v[k] = math::activate<A>(pre_activation(centered(v[k], t, ci, per_channel, j), t, ci,
                                                per_channel, j));
      }
      store_values(y + base + i, v);
    });
  });
}

// Per-(n, c) sums of g * (x - pivot) and g.
template <typename scalar_t, Activation A>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const GroupNormShape& s,
                       Layout layout, const AffineTables<acc_type<scalar_t>>& t,
                       acc_type<scalar_t>* sum_gx, acc_type<scalar_t>* sum_g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t planes = s.N * s.C;
  std::fill(sum_gx, sum_gx + planes, acc_t(0));
  std::fill(sum_g, sum_g + planes, acc_t(0));
  if (s.HxW == 0) return;

  // One body for both layouts: values of one run at offset i.
  auto body = [&](int64_t base, int64_t ci, auto per_channel) {
    return [=](int64_t i, auto step, auto& a, auto& b) {
      using S = decltype(step);
      using V = typename S::type;
      V xv[S::count], dv[S::count];
      load_values(x + base + i, xv);
      load_values(dy + base + i, dv);
      for (int k = 0; k < S::count; ++k) {
        const auto [d, g] = centered_and_grad<A>(xv[k], dv[k], t, ci, per_channel, i + k * S::lanes);
        if constexpr (std::is_array_v<std::remove_reference_t<decltype(a)>>) {
          a[k] = g * d;
          b[k] = g;
        } else {
          a = a + g * d;
          b = b + g;
        }
      }
    };
  };

  if (layout == Layout::ChannelsFirst) {
    const int64_t chunks = ceil_div(s.HxW, kChunk);
    std::vector<std::pair<acc_t, acc_t>> partial(planes * chunks);
    at::parallel_for(0, planes * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / chunks;
        const int64_t start = item % chunks * kChunk;
        partial[item] = simd_sum2<scalar_t>(std::min(kChunk, s.HxW - start),
                                            body(plane * s.HxW + start, plane, PerRun{}));
      }
    });
    for (int64_t plane = 0; plane < planes; ++plane) {
      for (int64_t k = 0; k < chunks; ++k) {
        sum_gx[plane] += partial[plane * chunks + k].first;
        sum_g[plane] += partial[plane * chunks + k].second;
      }
    }
    return;
  }

  const int64_t rows_per_block = std::max<int64_t>(1, kChunk / std::max<int64_t>(s.C, 1));
  const int64_t blocks = ceil_div(s.HxW, rows_per_block);
  std::vector<acc_t> partial(s.N * blocks * 2 * s.C, acc_t(0));
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int64_t row0 = item % blocks * rows_per_block;
      const int64_t rows = std::min(rows_per_block, s.HxW - row0);
      acc_t* block_gx = partial.data() + item * 2 * s.C;
      acc_t* block_g = block_gx + s.C;
      for (int64_t r = row0; r < row0 + rows; ++r) {
        // Coefficient tables are indexed n * C + j inside the row.
        simd_accumulate_row<scalar_t>(s.C, block_gx, block_g,
                                      body((n * s.HxW + r) * s.C, n * s.C, PerChannel{}));
      }
    }
  });
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      const acc_t* block_gx = partial.data() + (n * blocks + b) * 2 * s.C;
      for (int64_t c = 0; c < s.C; ++c) {
        sum_gx[n * s.C + c] += block_gx[c];
        sum_g[n * s.C + c] += block_gx[s.C + c];
      }
    }
  }
}

template <typename scalar_t, Activation A>
void apply_input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const GroupNormShape& s,
                      Layout layout, const AffineTables<acc_type<scalar_t>>& t,
                      const acc_type<scalar_t>* g_coef, const acc_type<scalar_t>* x_coef,
                      const acc_type<scalar_t>* bias_coef) {
  for_each_run(s, layout, [&](int64_t base, int64_t len, int64_t ci, auto per_channel) {
    simd_for<scalar_t>(len, [&](int64_t i, auto step) {
      using S = decltype(step);
      using V = typename S::type;
      V xv[S::count], dv[S::count];
      load_values(x + base + i, xv);
      load_values(dy + base + i, dv);
      for (int k = 0; k < S::count; ++k) {
        const int64_t j = i + k * S::lanes;
        const auto [d, g] = centered_and_grad<A>(xv[k], dv[k], t, ci, per_channel, j);
        dv[k] = coef<V>(g_coef, ci, per_channel, j) * g + coef<V>(x_coef, ci, per_channel, j) * d +
                coef<V>(bias_coef, ci, per_channel, j);
      }
      store_values(dx + base + i, dv);
    });
  });
}


// ---- typed drivers -------------------------------------------------------------
template <typename scalar_t>
void forward_typed(const ForwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t* b = static_cast<const acc_t*>(p.bias);
  acc_t* mean = static_cast<acc_t*>(p.mean);
  acc_t* rstd = static_cast<acc_t*>(p.rstd);
  const int64_t Cg = s.channels_per_group();

  const auto pivots = channel_pivots(x, s, p.layout);
  const auto stats = group_stats(x, pivots, s, p.layout);
  std::vector<acc_t> scale(s.N * s.C), shift(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t ng = n * s.G + g;
      mean[ng] = pivots[n * s.C + g * Cg] + stats[ng].mean;
      rstd[ng] = math::rstd_from_stats(stats[ng], static_cast<acc_t>(p.eps));
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const auto affine = math::fold_affine(stats[ng].mean, rstd[ng], w[c], b[c]);
        scale[n * s.C + c] = affine.scale;
        shift[n * s.C + c] = affine.shift;
      }
    }
  }
  dispatch_activation(p.activation, [&](auto a) {
    apply_forward<scalar_t, decltype(a)::value>(x, static_cast<scalar_t*>(p.y), s, p.layout,
                                               {pivots.data(), scale.data(), shift.data()});
  });
}

template <typename scalar_t>
void backward_typed(const BackwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* dy = static_cast<const scalar_t*>(p.dy);
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* rstd = static_cast<const acc_t*>(p.rstd);
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t* b = static_cast<const acc_t*>(p.bias);
  const int64_t planes = s.N * s.C;
  const int64_t Cg = s.channels_per_group();
  const auto pivots = channel_pivots(x, s, p.layout);

  // Forward coefficients (to recompute z for the activation) and mean - pivot.
  std::vector<acc_t> scale(planes), shift(planes), mean_shift(planes), plane_rstd(planes);
  for (int64_t i = 0; i < planes; ++i) {
    const int64_t ng = i / s.C * s.G + i % s.C / Cg;
    const int64_t c = i % s.C;
    mean_shift[i] = mean[ng] - pivots[i];
    plane_rstd[i] = rstd[ng];
    const auto affine = math::fold_affine(mean_shift[i], rstd[ng], w[c], b[c]);
    scale[i] = affine.scale;
    shift[i] = affine.shift;
  }

  const AffineTables<acc_t> tables{pivots.data(), scale.data(), shift.data()};
  std::vector<acc_t> sum_gx(planes), sum_g(planes);
  dispatch_activation(p.activation, [&](auto a) {
    channel_grad_sums<scalar_t, decltype(a)::value>(dy, x, s, p.layout, tables, sum_gx.data(),
                                                    sum_g.data());
  });

  // Parameter gradients: sums over samples in a fixed order.
  acc_t* dweight = static_cast<acc_t*>(p.dweight);
  acc_t* dbias = static_cast<acc_t*>(p.dbias);
  std::fill(dweight, dweight + s.C, acc_t(0));
  std::fill(dbias, dbias + s.C, acc_t(0));
  for (int64_t i = 0; i < planes; ++i) {
    dweight[i % s.C] += math::weight_grad_term(sum_gx[i], sum_g[i], mean_shift[i], plane_rstd[i]);
    dbias[i % s.C] += sum_g[i];
  }
  if (p.dx == nullptr) return;

  std::vector<acc_t> g_coef(planes), x_coef(planes), bias_coef(planes);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      acc_t sum_gwx = 0, sum_gw = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        sum_gwx += w[c] * sum_gx[n * s.C + c];
        sum_gw += w[c] * sum_g[n * s.C + c];
      }
      const int64_t first = n * s.C + g * Cg;
      const auto coefs = math::input_grad_coefs(sum_gwx, sum_gw, mean_shift[first],
                                                plane_rstd[first], s.group_size());
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        g_coef[n * s.C + c] = plane_rstd[first] * w[c];
        x_coef[n * s.C + c] = coefs.x_coef;
        bias_coef[n * s.C + c] = coefs.bias_coef;
      }
    }
  }
  dispatch_activation(p.activation, [&](auto a) {
    apply_input_grad<scalar_t, decltype(a)::value>(dy, x, static_cast<scalar_t*>(p.dx), s, p.layout,
                                                   tables, g_coef.data(), x_coef.data(),
                                                   bias_coef.data());
  });
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
