// CPU GroupNorm kernels, compiled once per CPU capability (DEFAULT, AVX2,
// AVX512): group_norm_kernels_{default,avx2,avx512}.cpp
// define CPU_CAPABILITY and include this file, so each variant of
// at::vec::Vectorized (namespace at::vec::CPU_CAPABILITY) and of these kernels
// (namespace gnflex::cpu::CPU_CAPABILITY) is distinct. group_norm_cpu.cpp picks
// one at run time from ATen's CPU capability.
//
// Data flow (both layouts; the numerical scheme is described in group_norm_math.h):
//   forward:  exact per-chunk stats (chunk mean, then sums about it), merged
//             per group -> mean P (rounded), rstd -> per-(n, c) scale/shift
//             -> y = act((x - P) * scale + shift)
//   backward: per-(n, c) sums of g and g * (x - P), g = dy * act'(z), P the
//             saved mean -> dweight, dbias and per-group dx coefficients
//             -> dx = a * g + x_coef * (x - P) + bias_coef
// Work is cut into fixed-size chunks (independent of the thread count) whose
// partial results are combined in index order, so every result is bitwise
// identical whatever at::get_num_threads() is.
//
// Parts, in include order: group_norm_simd.h (loop helpers), group_norm_stats.h
// (statistics), group_norm_values.h (coefficients, per-value operations over runs),
// group_norm_planes.h (short channels-first planes, walked in blocks),
// group_norm_forward.h, group_norm_backward.h (schedules); this file: the typed
// drivers and the entry points.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/group_norm_kernels_impl.h"
#endif

#include "vec_math.h"  // must precede group_norm_math.h (see there)

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "group_norm_kernels.h"
#include "group_norm_simd.h"
#include "group_norm_stats.h"
#include "group_norm_values.h"
#include "group_norm_planes.h"
#include "group_norm_forward.h"
#include "group_norm_backward.h"

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// ---- typed drivers -------------------------------------------------------------
template <typename scalar_t>
void forward_typed(const ErasedForwardArgs& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const int64_t bytes = static_cast<int64_t>(sizeof(scalar_t));
  const Schedule schedule = choose_schedule(s, p.layout, bytes, p.tuning);
  const TypedForwardArgs<scalar_t> args{
      static_cast<const scalar_t*>(p.x),
      static_cast<scalar_t*>(p.y),
      {static_cast<const acc_t*>(p.weight), static_cast<const acc_t*>(p.bias), p.weight_stride, p.bias_stride},
      static_cast<acc_t>(p.eps),
      static_cast<acc_t*>(p.mean),
      static_cast<acc_t*>(p.rstd),
      stream_output(p.y, s, p.layout, bytes, p.tuning),
      walks_back(read_per_thread(s, p.layout, schedule, bytes), p.tuning)};
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    switch (schedule) {
      case Schedule::Fused: {
        // Items prefetch the next one where x and y of this item and x of the
        // next fit L2.
        const bool prefetch = prefetch_fits(fused_item_values(s, p.layout) * bytes, 3, p.tuning);
        if (p.layout == Layout::ChannelsFirst) return forward_fused_groups<scalar_t, A>(args, s, prefetch);
        return forward_fused_samples<scalar_t, A>(args, s, prefetch);
      }
      default:
        return forward_two_pass<scalar_t, A>(args, s, p.layout);
    }
  });
}

// Per group, the residual mean - P the backward folds in. The saved mean P
// is the mean rounded to the accumulate type; the residual is dropped (0),
// except for groups whose |P| * rstd is large (math::needs_exact_residual):
// those recompute the statistics from x with the forward's own code (bitwise
// the forward's) and take the exact residual. Typical data never needs it,
// so it costs nothing there.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> backward_residuals(const scalar_t* x, const acc_type<scalar_t>* mean,
                                                   const acc_type<scalar_t>* rstd, const GroupNormShape& s,
                                                   Layout layout) {
  using acc_t = acc_type<scalar_t>;
  using Stats = CenteredStats<acc_t>;
  const int64_t groups = s.N * s.G;
  std::vector<acc_t> residual(groups, acc_t(0));
  std::vector<char> exact(groups);
  for (int64_t ng = 0; ng < groups; ++ng) exact[ng] = math::needs_exact_residual(mean[ng], rstd[ng]);
  if (std::none_of(exact.begin(), exact.end(), [](char e) { return e != 0; })) return residual;
  if (layout == Layout::ChannelsFirst) {
    const int64_t D = s.group_size();
    at::parallel_for(0, groups, grain_of(D), [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        if (exact[ng]) residual[ng] = math::mean_residual(span_stats(x + ng * D, D), mean[ng]);
      }
    });
    return residual;
  }
  at::parallel_for(0, s.N, grain_of(s.HxW * s.C), [&](int64_t begin, int64_t end) {
    SampleStatsScratch<acc_t> scratch(s.C);
    std::vector<Stats> stats(s.G);
    for (int64_t n = begin; n < end; ++n) {
      if (std::none_of(exact.begin() + n * s.G, exact.begin() + (n + 1) * s.G, [](char e) { return e != 0; })) {
        continue;
      }
      sample_stats(x + n * s.HxW * s.C, s, scratch, stats.data());
      for (int64_t g = 0; g < s.G; ++g) {
        if (exact[n * s.G + g]) residual[n * s.G + g] = math::mean_residual(stats[g], mean[n * s.G + g]);
      }
    }
  });
  return residual;
}

template <typename scalar_t>
void backward_typed(const ErasedBackwardArgs& p) {
  using acc_t = acc_type<scalar_t>;
  const GroupNormShape& s = p.shape;
  const int64_t planes = s.N * s.C;
  const int64_t bytes = static_cast<int64_t>(sizeof(scalar_t));
  const Schedule schedule = backward_schedule(s, p.layout, bytes, p.activation, p.tuning);
  // Written whole by every schedule, so not zeroed here.
  const std::unique_ptr<acc_t[]> sum_gx(new acc_t[planes]), sum_g(new acc_t[planes]);
  const std::vector<acc_t> residual =
      backward_residuals(static_cast<const scalar_t*>(p.x), static_cast<const acc_t*>(p.mean),
                         static_cast<const acc_t*>(p.rstd), s, p.layout);
  const TypedBackwardArgs<scalar_t> args{
      static_cast<const scalar_t*>(p.dy),
      static_cast<const scalar_t*>(p.x),
      static_cast<scalar_t*>(p.dx),
      static_cast<const acc_t*>(p.mean),
      static_cast<const acc_t*>(p.rstd),
      {static_cast<const acc_t*>(p.weight), static_cast<const acc_t*>(p.bias), p.weight_stride, p.bias_stride},
      residual.data(),
      sum_gx.get(),
      sum_g.get(),
      stream_output(p.dx, s, p.layout, bytes, p.tuning),
      walks_back(read_per_thread(s, p.layout, schedule, 2 * bytes), p.tuning)};
  dispatch_activation(p.activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    switch (schedule) {
      case Schedule::Fused: {
        // Items prefetch the next one where x, dy and dx of this item and x
        // and dy of the next fit L2.
        const bool prefetch = prefetch_fits(fused_item_values(s, p.layout) * bytes, 5, p.tuning);
        if (p.layout == Layout::ChannelsFirst) return backward_fused_groups<scalar_t, A>(args, s, prefetch);
        return backward_fused_samples<scalar_t, A>(args, s, prefetch);
      }
      default:
        return backward_two_pass<scalar_t, A>(args, s, p.layout);
    }
  });

  // Parameter gradients: per-sample ones per (n, c); per-channel ones sums
  // over samples in a fixed order.
  acc_t* dweight = static_cast<acc_t*>(p.dweight);
  acc_t* dbias = static_cast<acc_t*>(p.dbias);
  std::fill(dweight, dweight + (p.weight_stride ? planes : s.C), acc_t(0));
  std::fill(dbias, dbias + (p.bias_stride ? planes : s.C), acc_t(0));
  // Planes of a group are consecutive: plane i = (n * G + g) * Cg + c % Cg.
  const int64_t Cg = s.channels_per_group();
  for (int64_t n = 0; n < s.N; ++n) {
    acc_t* dw = dweight + (p.weight_stride ? n * s.C : 0);
    acc_t* db = dbias + (p.bias_stride ? n * s.C : 0);
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t ng = n * s.G + g, c0 = g * Cg;
      add_group_param_grads(args.sum_gx + n * s.C + c0, args.sum_g + n * s.C + c0, Cg, residual[ng], args.rstd[ng],
                            dw + c0, db + c0);
    }
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

#if defined(GNFLEX_CPU_AVX512_BF16)
// bfloat16 only: kernel_variant() sends other dtypes to the AVX512 variant.
void group_norm_forward_kernel(const ErasedForwardArgs& params) { forward_typed<c10::BFloat16>(params); }

void group_norm_backward_kernel(const ErasedBackwardArgs& params) { backward_typed<c10::BFloat16>(params); }
#else
void group_norm_forward_kernel(const ErasedForwardArgs& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward_typed<decltype(tag)>(params); });
}

void group_norm_backward_kernel(const ErasedBackwardArgs& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { backward_typed<decltype(tag)>(params); });
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
