// SIMD glue for the CPU kernels: gn_* primitive overloads for
// at::vec::Vectorized so the activation templates of gn_math.h run on whole
// vectors, and VecIO, which loads/stores any input dtype as vectors of its
// accumulate type (fp16/bf16 -> two float vectors per step).
#pragma once

#ifdef GNFLEX_GN_MATH_H
#error "include cpu/vec_math.h before gn_math.h so the activation templates see the SIMD overloads"
#endif

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2) before including cpu/vec_math.h"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace gnflex {
namespace math {
inline namespace CPU_CAPABILITY {

template <typename T>
inline at::vec::Vectorized<T> gn_exp(const at::vec::Vectorized<T>& v) { return v.exp(); }
template <typename T>
inline at::vec::Vectorized<T> gn_erf(const at::vec::Vectorized<T>& v) { return v.erf(); }
template <typename T>
inline at::vec::Vectorized<T> gn_relu(const at::vec::Vectorized<T>& v) {
  return at::vec::clamp_min(v, at::vec::Vectorized<T>(T(0)));
}
template <typename T>
inline at::vec::Vectorized<T> gn_positive_mask(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return Vec::blendv(Vec(T(0)), Vec(T(1)), v > Vec(T(0)));
}

}  // namespace CPU_CAPABILITY
}  // namespace math
}  // namespace gnflex

#include "../gn_math.h"

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

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
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using Vec = at::vec::Vectorized<float>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const scalar_t* p, Vec (&v)[kVecs]) { at::vec::load_to_float(p, v[0], v[1]); }
  static void store(scalar_t* p, const Vec (&v)[kVecs]) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
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
