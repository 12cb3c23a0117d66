// SIMD glue for the CPU kernels: gn_* primitive overloads for
// at::vec::Vectorized so the activation templates of group_norm_math.h run on whole
// vectors, and VecIO, which loads/stores any input dtype as vectors of its
// accumulate type (fp16/bf16 -> two float vectors per step).
#pragma once

#ifdef GNFLEX_GROUP_NORM_MATH_H
#error "include cpu/vec_math.h before group_norm_math.h so the activation templates see the SIMD overloads"
#endif

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including cpu/vec_math.h"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace gnflex {
namespace math {
inline namespace CPU_CAPABILITY {

// exp of float vectors on AVX2 / AVX-512: 2^n * exp(r) with n = round(v / ln 2)
// and r = v - n ln 2 (ln 2 in two parts, Cody-Waite), exp(r) as
// 1 + r (1 + r s(r)) with s of degree 4, fitted to exp over |r| <= ln 2 / 2
// (relative error 3e-9 before rounding) and evaluated by Horner's rule in
// six fused multiply-adds: under 1 ulp over the float range, against ~20 for
// ATen's exp_u20, in fewer instructions. v is clamped to [-104, 89] first,
// beyond which exp is 0 or inf in float; the clamp keeps NaN (min/max return
// their second operand, v, when it is NaN). 2^n is applied exactly, subnormal
// results included: AVX-512 by vscalefps, AVX2 as 2^(n/2) * 2^(n - n/2).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// p * 2^n for whole numbers n in [-150, 128], exactly.
inline at::vec::Vectorized<float> times_power_of_two(const at::vec::Vectorized<float>& p,
                                                     const at::vec::Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  // Each half of n is a normal power of two. NaN: p is NaN already.
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i k1 = _mm256_srai_epi32(k, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(k, k1), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
#endif
}

// exp(v), or exp(-v) where kNegated: the same bits as exp(0 - v) (the clamp,
// n and r mirrored exactly), without the negation.
template <bool kNegated = false>
inline at::vec::Vectorized<float> exp_float_vector(const at::vec::Vectorized<float>& v) {
  using Vec = at::vec::Vectorized<float>;
  using at::vec::fmadd;
  constexpr float kLog2e = 1.44269504088896341f;
  // n = round(a / ln 2), r = a - n ln2_hi + n ln2_lo for the argument a: v,
  // or -v where kNegated (x is v clamped to the mirrored range, a = -x).
  Vec n, r;
  if constexpr (kNegated) {
    const Vec x = at::vec::clamp(v, Vec(-89.0f), Vec(104.0f));
    n = (x * Vec(-kLog2e)).round();
    r = fmadd(n, Vec(2.12194440e-4f), at::vec::fmsub(n, Vec(-0.693359375f), x));
  } else {
    const Vec x = at::vec::clamp(v, Vec(-104.0f), Vec(89.0f));
    n = (x * Vec(kLog2e)).round();
    r = fmadd(n, Vec(2.12194440e-4f), fmadd(n, Vec(-0.693359375f), x));
  }
  Vec p = fmadd(Vec(1.381461275741458e-3f), r, Vec(8.368710055947304e-3f));
  p = fmadd(p, r, Vec(4.166838899254799e-2f));
  p = fmadd(p, r, Vec(1.666652113199234e-1f));
  p = fmadd(p, r, Vec(4.999999403953552e-1f));
  p = fmadd(p, r, Vec(1.0f));
  return times_power_of_two(fmadd(p, r, Vec(1.0f)), n);
}
#endif

template <typename T>
inline at::vec::Vectorized<T> gn_exp(const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return exp_float_vector(v);
#endif
  return v.exp();
}
template <typename T>
inline at::vec::Vectorized<T> gn_exp_neg(const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return exp_float_vector<true>(v);
#endif
  return (at::vec::Vectorized<T>(T(0)) - v).exp();
}
// 1 / v: a division, correctly rounded and the same on every CPU model
// (v = inf gives 0, NaN stays NaN). The hardware estimate refined by a
// Newton step was no faster once it fixed up 0 and inf (docs/performance).
template <typename T>
inline at::vec::Vectorized<T> gn_reciprocal(const at::vec::Vectorized<T>& v) {
  return at::vec::Vectorized<T>(T(1)) / v;
}
template <typename T>
inline at::vec::Vectorized<T> gn_erf(const at::vec::Vectorized<T>& v) {
  return v.erf();
}
template <typename T>
inline at::vec::Vectorized<T> gn_relu(const at::vec::Vectorized<T>& v) {
  return at::vec::clamp_min(v, at::vec::Vectorized<T>(T(0)));
}
// AVX-512 compares into a mask register and blends by it; ATen's blendv
// would widen the compare to a vector and compare that again.
template <typename T>
inline at::vec::Vectorized<T> gn_positive_mask(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), _mm512_set1_ps(1.0f));
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_NLE_UQ), _mm512_set1_pd(1.0));
  }
#endif
  return Vec::blendv(Vec(T(1)), Vec(T(0)), v <= Vec(T(0)));  // 1 at NaN, as torch
}
template <typename T>
inline at::vec::Vectorized<T> gn_select_positive(const at::vec::Vectorized<T>& z,
                                                 const at::vec::Vectorized<T>& if_positive,
                                                 const at::vec::Vectorized<T>& otherwise) {
  using Vec = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), otherwise, if_positive);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ), otherwise, if_positive);
  }
#endif
  return Vec::blendv(otherwise, if_positive, z > Vec(T(0)));
}

}  // namespace CPU_CAPABILITY
}  // namespace math
}  // namespace gnflex

#include "../group_norm_math.h"

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Non-temporal ("streaming") stores, for outputs too big to stay in cache:
// they write whole lines without first reading them, which saves a third of
// the memory traffic of a read-x, write-y pass. Aligned vectors only (others
// store normally); stream_fence() orders them before the results are used.
template <typename T>
inline void stream_vector(T* p, const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if (reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      return _mm512_stream_pd(p, v);
    } else {
      return _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      return _mm256_stream_pd(p, v);
    } else {
      return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
    }
  }
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// a * b + c: in one rounding in the AVX2 / AVX-512 variants, in two in the
// portable one, on whole vectors and on the scalar values of tails alike, so
// a value's bits do not depend on where a vector starts. The kernels'
// per-value formulas (statistics' squares, outputs, dx) use it: separate
// products and adds queue on the add ports, and -ffp-contract=off
// (build_flags.txt) leaves fusing to the code.
template <typename V>
inline V mul_add(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_arithmetic_v<V>) {
    return std::fma(a, b, c);
  } else {
    return at::vec::fmadd(a, b, c);
  }
#else
  // Not at::vec::fmadd: it fuses on some targets (NEON) and not on others,
  // where the scalar tails would not.
  return a * b + c;
#endif
}

// Loads kStep consecutive scalar_t values as kVecs vectors of acc_type and
// stores them back. One step of every vectorized loop in the CPU kernels.
template <typename scalar_t, typename Enable = void>
struct VecIO {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t kStep = Vec::size();
  static void load(const scalar_t* p, Vec (&v)[kVecs]) { v[0] = Vec::loadu(p); }
  static void store(scalar_t* p, const Vec (&v)[kVecs]) { v[0].store(p); }
  static void stream(scalar_t* p, const Vec (&v)[kVecs]) { stream_vector(p, v[0]); }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using Vec = at::vec::Vectorized<float>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const scalar_t* p, Vec (&v)[kVecs]) { at::vec::load_to_float(p, v[0], v[1]); }
  static void store(scalar_t* p, const Vec (&v)[kVecs]) { narrow(v[0], v[1]).store(p); }
  static void stream(scalar_t* p, const Vec (&v)[kVecs]) { stream_vector(p, narrow(v[0], v[1])); }
  // Two float vectors -> one of scalar_t, rounded to nearest even: ATen's
  // integer rounding, or in the AVX512-BF16 kernels the hardware's, which
  // gives the same bits except that it reads denormals as 0 and quiets NaNs
  // its own way; a pair of vectors holding either goes ATen's way.
  static at::vec::Vectorized<scalar_t> narrow(const Vec& lo, const Vec& hi) {
#if defined(GNFLEX_CPU_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signaling NaN
      const __mmask16 odd_lo = _mm512_fpclass_ps_mask(lo, kNanOrDenormal);
      const __mmask16 odd_hi = _mm512_fpclass_ps_mask(hi, kNanOrDenormal);
      if (__builtin_expect(_kortestz_mask16_u8(odd_lo, odd_hi), 1)) {
        return at::vec::Vectorized<scalar_t>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
#endif
    return at::vec::convert_from_float<scalar_t>(lo, hi);
  }
  // One float vector of values (half a step), for the end of a run: a 7x7
  // plane would otherwise leave 17 of its 49 values to the scalar tail. Or
  // only its first n values (zeros past them), for the end of a block walk.
  static void load_half(const scalar_t* p, Vec& v) { at::vec::load_to_float(p, v); }
  static void load_half(const scalar_t* p, Vec& v, int64_t n) {
    v = std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
  }
  static void store_half(scalar_t* p, const Vec& v, int64_t n = Vec::size()) { narrow(v, v).store(p, n); }
};

// Broadcast of a scalar, or a load of per-channel values, as value type V
// (acc_t for scalar tails, Vectorized<acc_t> in the SIMD body).
template <typename V, typename T>
inline V load_as(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else {
    return V::loadu(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
