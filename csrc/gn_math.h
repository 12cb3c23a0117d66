// Math shared by every gnflex back end: Welford statistics, activation forward
// and derivative, and the folding of normalisation + affine into per-channel
// coefficients. Everything here is host+device so the CPU kernels (and their
// tests) run exactly the code the CUDA kernels run.
//
// Numerical scheme ("shifted data"): every group has a pivot, the first value
// of the group. Statistics are accumulated over (x - pivot) and the output is
// computed as (x - pivot) * scale + shift. Subtracting a value of the group
// first keeps the summed values and the affine terms of the size of the
// spread, not of the mean, so a group with mean 1e4 and std 1e-2 keeps ~1e-7
// relative accuracy in fp32 where the folded form x * scale + shift loses
// ~1e-2 to cancellation.
//
// The activation templates are written once for any value type V that has
// arithmetic operators and the gn_* primitives below. The CPU back end adds
// gn_* overloads for at::vec::Vectorized (csrc/cpu/vec_math.h, which must be
// included before this header), so the same templates run as SIMD code.
//
// Everything sits in an inline namespace named after the CPU capability the
// including file is compiled for, so the AVX2 and the default copies of these
// functions never merge at link time (an AVX2 copy must not run on a CPU
// without AVX2).
#pragma once
#define GNFLEX_GN_MATH_H

#include <cmath>
#include <cstdint>

#include "gn_types.h"

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
GNFLEX_HD float gn_erf(float v) { return ::erff(v); }
GNFLEX_HD double gn_erf(double v) { return ::erf(v); }
GNFLEX_HD float gn_reciprocal(float v) { return 1.0f / v; }
GNFLEX_HD double gn_reciprocal(double v) { return 1.0 / v; }
GNFLEX_HD float gn_rsqrt(float v) { return 1.0f / ::sqrtf(v); }
GNFLEX_HD double gn_rsqrt(double v) { return 1.0 / ::sqrt(v); }
// max(v, 0) and its derivative (1 where v > 0, else 0; torch uses 0 at 0).
template <typename T>
GNFLEX_HD T gn_relu(T v) { return v < T(0) ? T(0) : v; }  // NaN stays NaN, as torch.relu
template <typename T>
GNFLEX_HD T gn_positive_mask(T v) { return v > T(0) ? T(1) : T(0); }

// ---- activations ---------------------------------------------------------
// GELU is the exact (erf) form, as torch.nn.functional.gelu by default.
template <Activation A, typename V>
GNFLEX_HD V activate(V z) {
  if constexpr (A == Activation::ReLU) {
    return gn_relu(z);
  } else if constexpr (A == Activation::SiLU) {
    return z * gn_reciprocal(V(1) + gn_exp(V(0) - z));
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
    const V sig = gn_reciprocal(V(1) + gn_exp(V(0) - z));
    return sig * (V(1) + z * (V(1) - sig));
  } else if constexpr (A == Activation::GELU) {
    // 0.5 * (1 + erf(z / sqrt 2)) + z * exp(-z^2 / 2) / sqrt(2 pi)
    const V cdf = V(0.5) * (V(1) + gn_erf(z * V(M_SQRT1_2)));
    const V pdf = gn_exp(V(-0.5) * z * z) * V(0.5 * M_2_SQRTPI * M_SQRT1_2);
    return cdf + z * pdf;
  } else {
    return V(1);
  }
}

// ---- Welford statistics --------------------------------------------------
// Count, mean and sum of squared deviations of a set of values; partial
// results of disjoint parts merge with Chan et al.'s formula, so a group can
// be split over chunks, threads or blocks and combined in a fixed order.
template <typename T>
struct WelfordStats {
  int64_t count = 0;
  T mean = T(0);
  T m2 = T(0);
};

// Stats of a chunk from its count and the sums of v and v^2 (v = x - pivot).
// Within a chunk the shifted values are small, so the sums lose little.
template <typename T>
GNFLEX_HD WelfordStats<T> welford_from_sums(int64_t count, T sum, T sum_sq) {
  WelfordStats<T> s;
  if (count == 0) return s;
  s.count = count;
  s.mean = sum / T(count);
  const T m2 = sum_sq - sum * s.mean;
  // Clamp rounding below zero, but keep NaN (from inf or NaN input): the
  // group's output must be NaN then, as torch's, not normalized by eps.
  s.m2 = m2 < T(0) ? T(0) : m2;
  return s;
}

template <typename T>
GNFLEX_HD WelfordStats<T> welford_combine(const WelfordStats<T>& a, const WelfordStats<T>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  WelfordStats<T> r;
  r.count = a.count + b.count;
  const T delta = b.mean - a.mean;
  const T b_frac = T(b.count) / T(r.count);
  r.mean = a.mean + delta * b_frac;
  r.m2 = a.m2 + b.m2 + delta * delta * T(a.count) * b_frac;
  return r;
}

// Biased variance (as GroupNorm uses) -> 1 / sqrt(var + eps).
template <typename T>
GNFLEX_HD T rstd_from_stats(const WelfordStats<T>& s, T eps) {
  const T var = s.count > 0 ? s.m2 / T(s.count) : T(0);
  return gn_rsqrt(var + eps);
}

// ---- coefficient folding -------------------------------------------------
// Forward: y = act((x - pivot) * scale + shift) equals
// act((x - mean) * rstd * weight + bias), with mean_shift = mean - pivot.
template <typename T>
struct ChannelAffine {
  T scale;
  T shift;
};

template <typename T>
GNFLEX_HD ChannelAffine<T> fold_affine(T mean_shift, T rstd, T weight, T bias) {
  const T scale = rstd * weight;
  return {scale, bias - mean_shift * scale};
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
GNFLEX_HD InputGradCoefs<T> input_grad_coefs(T sum_gwx, T sum_gw, T mean_shift, T rstd,
                                             int64_t group_size) {
  if (group_size == 0) return {T(0), T(0)};
  const T inv_d = T(1) / T(group_size);
  const T k = rstd * rstd * rstd * (sum_gwx - mean_shift * sum_gw) * inv_d;
  return {-k, k * mean_shift - rstd * sum_gw * inv_d};
}

// d loss / d weight[c] contribution of one (sample, channel):
// sum(g * xhat) = rstd * (sum(g * (x - pivot)) - mean_shift * sum(g)).
template <typename T>
GNFLEX_HD T weight_grad_term(T sum_gx, T sum_g, T mean_shift, T rstd) {
  return rstd * (sum_gx - mean_shift * sum_g);
}

}  // namespace GNFLEX_MATH_NS
}  // namespace math
}  // namespace gnflex
