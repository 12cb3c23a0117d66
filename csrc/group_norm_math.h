// Math shared by every gnflex back end: exact group statistics, activation forward
// and derivative, and the folding of normalisation + affine into per-channel
// coefficients. Everything here is host+device so the CPU kernels (and their
// tests) run exactly the code the CUDA kernels run.
//
// Numerical scheme: exact statistics for any data, normalisation about the
// mean. Each chunk of a group (a few thousand values, in L1 or registers)
// gets exact statistics by the corrected two-pass algorithm (Chan, Golub and
// LeVeque 1983): first a `center`, the mean of the chunk or of a part of it
// (chunk_center), then the sums of d = x - center and d^2, so
// M2 = sum d^2 - (sum d)^2 / n cancels nothing, and the chunk's mean is
// center + sum d / n kept as two numbers. Chunks merge with Chan's formula in
// a fixed order (chan_merge; the CPU merges a channels-last group's channels,
// of equal counts, at once: merge_channel_stats). Neither a value far from
// the mean (a spike) nor a mean far from zero (1e4 with std 1e-2) loses
// accuracy: no sum is ever taken about a point far from the data.
//
// The output is computed about P, the group mean rounded to the accumulate
// type (what the op returns as `mean`), and the rounding residual
// r = mean - P folded into the shift: y = act((x - P) * scale + shift) with
// shift = bias - r * scale. x - P is exact where it matters (|mean| >> std),
// so fp32 data at 1e4 with std 1e-2 keeps ~1e-7 relative accuracy where the
// folded form x * scale + shift loses ~1e-2. The backward sums g * (x - P)
// about the same P, so its sums do not cancel either.
//
// The activation templates are written once for any value type V that has
// arithmetic operators and the gn_* primitives below. The CPU back end adds
// gn_* overloads for at::vec::Vectorized (csrc/cpu/vec_math.h, which must be
// included before this header), so the same templates run as SIMD code.
//
// Everything sits in an inline namespace named after the CPU capability the
// including file is compiled for, so the AVX2 and the default variants of these
// functions never merge at link time (an AVX2 variant must not run on a CPU
// without AVX2).
#pragma once
#define GNFLEX_GROUP_NORM_MATH_H

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "group_norm_types.h"

#ifdef CPU_CAPABILITY
#define GNFLEX_MATH_NS CPU_CAPABILITY
#else
#define GNFLEX_MATH_NS portable
#endif

namespace gnflex {
namespace math {
inline namespace GNFLEX_MATH_NS {

// ---- scalar primitives (float and double) --------------------------------
GNFLEX_HD float gn_exp(float v) { return ::expf(v); }
GNFLEX_HD double gn_exp(double v) { return ::exp(v); }
GNFLEX_HD float gn_exp_neg(float v) { return ::expf(0.0f - v); }
GNFLEX_HD double gn_exp_neg(double v) { return ::exp(0.0 - v); }
GNFLEX_HD float gn_erf(float v) { return ::erff(v); }
GNFLEX_HD double gn_erf(double v) { return ::erf(v); }
GNFLEX_HD float gn_reciprocal(float v) { return 1.0f / v; }
GNFLEX_HD double gn_reciprocal(double v) { return 1.0 / v; }
GNFLEX_HD float gn_rsqrt(float v) { return 1.0f / ::sqrtf(v); }
GNFLEX_HD double gn_rsqrt(double v) { return 1.0 / ::sqrt(v); }
// Machine epsilon of the accumulate type (std::numeric_limits is host-only).
GNFLEX_HD float gn_epsilon(float) { return FLT_EPSILON; }
GNFLEX_HD double gn_epsilon(double) { return DBL_EPSILON; }
// max(v, 0) and its derivative as torch's threshold_backward: 0 where v <= 0,
// else 1 (so 0 at 0, and 1 at NaN: the gradient passes through).
template <typename T>
GNFLEX_HD T gn_relu(T v) {
  return v < T(0) ? T(0) : v;
}  // NaN stays NaN, as torch.relu
template <typename T>
GNFLEX_HD T gn_positive_mask(T v) {
  return v <= T(0) ? T(0) : T(1);
}
// z > 0 ? if_positive : otherwise (otherwise at NaN).
template <typename T>
GNFLEX_HD T gn_select_positive(T z, T if_positive, T otherwise) {
  return z > T(0) ? if_positive : otherwise;
}

// ---- activations ---------------------------------------------------------
// GELU is the exact (erf) form, as torch.nn.functional.gelu by default.
template <Activation A, typename V>
GNFLEX_HD V activate(V z) {
  if constexpr (A == Activation::ReLU) {
    return gn_relu(z);
  } else if constexpr (A == Activation::SiLU) {
    return z / (V(1) + gn_exp_neg(z));  // torch's form: one division, no product
  } else if constexpr (A == Activation::GELU) {
    return z * V(0.5) * (V(1) + gn_erf(z * V(M_SQRT1_2)));
  } else {
    return z;
  }
}

// d activate(z) / dz.
template <Activation A, typename V>
GNFLEX_HD V activate_grad(V z) {
  if constexpr (A == Activation::ReLU) {
    return gn_positive_mask(z);
  } else if constexpr (A == Activation::SiLU) {
    // sig * (1 + z * (1 - sig)). Where z > 0, 1 - sig is taken as exp(-z) * sig:
    // 1 - sig cancels when sig -> 1 (a sigmoid rounded to 1 - 2^-24 gave
    // silu'(z) = 1 + z * 2^-24, 6e-4 off at z = 1e4). Where z <= 0, sig <= 1/2,
    // so 1 - sig does not cancel, and exp(-z) may overflow (inf * 0 is NaN).
    const V e = gn_exp_neg(z);
    const V sig = gn_reciprocal(V(1) + e);
    return sig * (V(1) + z * gn_select_positive(z, e * sig, V(1) - sig));
  } else if constexpr (A == Activation::GELU) {
    // 0.5 * (1 + erf(z / sqrt 2)) + z * exp(-z^2 / 2) / sqrt(2 pi)
    const V cdf = V(0.5) * (V(1) + gn_erf(z * V(M_SQRT1_2)));
    const V pdf = gn_exp(V(-0.5) * z * z) * V(0.5 * M_2_SQRTPI * M_SQRT1_2);
    return cdf + z * pdf;
  } else {
    return V(1);
  }
}

// ---- statistics: count, center + offset (the mean), M2 -----------------------
// Count, mean and sum of squared deviations (M2) of a set of values. The mean
// is center + offset: center is a value near the mean (the first chunk's
// mean), offset the small remainder, so merging chunks of a group with a large
// mean subtracts centers exactly instead of rounding each chunk's mean. Partial
// results of disjoint parts merge with Chan et al.'s formula, so a group can
// be split over chunks, threads or blocks and combined in a fixed order.
template <typename T>
struct CenteredStats {
  int64_t count = 0;
  T center = T(0);
  T offset = T(0);
  T m2 = T(0);
};

// The center of a chunk: the mean of all of its values or of a subset (the
// first of the two passes). A subset of m of the chunk's n values has a mean
// within sqrt(M2 / m) of the chunk's (Cauchy-Schwarz), which bounds the
// relative rounding error of M2 from the centered sums below by about
// (1 + n / m) units, whatever the data.
template <typename T>
GNFLEX_HD T chunk_center(int64_t count, T sum) {
  return count > 0 ? sum / T(count) : T(0);
}

// Stats of a chunk from the sums of d = x - center and d^2 over its count
// values (the second pass). center is near the chunk's mean, so sum_d is
// small and the correction sum_d^2 / n cancels little; it removes the offset
// of center from M2.
template <typename T>
GNFLEX_HD CenteredStats<T> stats_from_centered_sums(int64_t count, T center, T sum_d, T sum_d2) {
  CenteredStats<T> s;
  if (count == 0) return s;
  s.count = count;
  s.center = center;
  s.offset = sum_d / T(count);
  const T m2 = sum_d2 - sum_d * s.offset;
  // Clamp rounding below zero, but keep NaN (from inf or NaN input): the
  // group's output must be NaN then, as torch's, not normalized by eps.
  s.m2 = m2 < T(0) ? T(0) : m2;
  return s;
}

template <typename T>
GNFLEX_HD CenteredStats<T> chan_merge(const CenteredStats<T>& a, const CenteredStats<T>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  CenteredStats<T> r;
  r.count = a.count + b.count;
  // Centers of one group's chunks are close when |mean| >> std: exact difference.
  const T delta = (b.center - a.center) + (b.offset - a.offset);
  const T b_frac = T(b.count) / T(r.count);
  const T offset = a.offset + delta * b_frac;
  // Re-centered on the merged mean: a part whose center is far from the
  // group's (one value, a spike) would otherwise put its distance into the
  // delta of every later merge.
  r.center = a.center + offset;
  r.offset = (a.center - r.center) + offset;
  r.m2 = a.m2 + b.m2 + delta * delta * T(a.count) * b_frac;
  return r;
}

// The mean rounded to T: the `mean` output, and the point the outputs are
// computed about.
template <typename T>
GNFLEX_HD T rounded_mean(const CenteredStats<T>& s) {
  return s.center + s.offset;
}

// mean - m for a value m near the mean (the rounded mean, or a saved mean):
// the residual the coefficients fold in. center - m is exact when center and
// m are within a factor of two (always so when the residual matters), and
// then the result is the exact residual.
template <typename T>
GNFLEX_HD T mean_residual(const CenteredStats<T>& s, T m) {
  return (s.center - m) + s.offset;
}

// Biased variance (as GroupNorm uses) -> 1 / sqrt(var + eps). Any eps that
// F.group_norm accepts: a negative eps gives what torch gives (NaN where
// var + eps < 0).
template <typename T>
GNFLEX_HD T rstd_from_stats(const CenteredStats<T>& s, T eps) {
  const T var = s.count > 0 ? s.m2 / T(s.count) : T(0);
  return gn_rsqrt(var + eps);
}

// The backward's coefficients use the saved mean P; its residual mean - P is
// below half an ulp of P and only matters when |P| * rstd is large. Groups
// beyond this bound recompute the residual from x (the forward's statistics,
// bitwise equal to what the forward used): |P| * rstd > 8, i.e. |mean| > 8
// std in any type, where dropping it would move xhat by more than
// 8 * epsilon / 2, four units of the accumulate type.
template <typename T>
GNFLEX_HD bool needs_exact_residual(T mean, T rstd) {
  const T a = mean < T(0) ? -mean : mean;
  return a * rstd > T(8);
}

// ---- coefficient folding -------------------------------------------------
// Forward: y = act((x - pivot) * scale + shift) equals
// act((x - mean) * rstd * weight + bias), with the residual r = mean - pivot
// of the scheme above (pivot = P).
template <typename T>
struct ChannelAffine {
  T scale;
  T shift;
};

template <typename T>
GNFLEX_HD ChannelAffine<T> fold_affine(T residual, T rstd, T weight, T bias) {
  const T scale = rstd * weight;
  return {scale, bias - residual * scale};
}

// Backward. With g = dy * act'(z) and per-group sums over the group's D values
//   sum_gwx = sum(g * weight * (x - pivot)),  sum_gw = sum(g * weight),
// dx = rstd * weight * g + x_coef * (x - pivot) + bias_coef, the usual
// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) rewritten about the pivot.
template <typename T>
struct InputGradCoefs {
  T x_coef;
  T bias_coef;
};

template <typename T>
GNFLEX_HD InputGradCoefs<T> input_grad_coefs(T sum_gwx, T sum_gw, T residual, T rstd, int64_t group_size) {
  if (group_size == 0) return {T(0), T(0)};
  const T inv_d = T(1) / T(group_size);
  const T k = rstd * rstd * rstd * (sum_gwx - residual * sum_gw) * inv_d;
  return {-k, k * residual - rstd * sum_gw * inv_d};
}

// d loss / d weight[c] contribution of one (sample, channel):
// sum(g * xhat) = rstd * (sum(g * (x - pivot)) - residual * sum(g)).
template <typename T>
GNFLEX_HD T weight_grad_term(T sum_gx, T sum_g, T residual, T rstd) {
  return rstd * (sum_gx - residual * sum_g);
}

}  // namespace GNFLEX_MATH_NS
}  // namespace math
}  // namespace gnflex
