// CUDA GroupNorm device code: what an output value needs. Where a group's
// values (mean, rstd, residual, dx coefficients) are found, a channel's
// coefficients folded from them and its weight / bias, and the per-value
// operations of the forward output, the gradient sums and dx.
#pragma once

#include "group_norm_device.cuh"

namespace gnflex {
namespace cuda {

// ---- coefficients ----------------------------------------------------------------
// Where the blocks find a group's values: mean (the pivot) and rstd; the
// residual from the GroupCoefs, or summed from the backward's residual
// partial sums (before the GroupCoefs are written).
template <typename acc_t>
struct GroupSource {
  const acc_t* mean;
  const acc_t* rstd;
  const GroupCoefs<acc_t>* coefs;
  const acc_t* residual_sums = nullptr;  // per (n, g, split), or null
  int64_t splits = 1;
  int64_t group_size = 1;
};

// mean - pivot of group ng from the residual partial sums: their total over
// the group size where it matters, else 0 (fixed order).
template <typename acc_t>
__device__ acc_t summed_residual(const GroupSource<acc_t>& src, int64_t ng, acc_t mean, acc_t rstd) {
  if (!math::needs_exact_residual(mean, rstd)) return acc_t(0);
  acc_t total = acc_t(0);
  for (int64_t k = 0; k < src.splits; ++k) total += gload_l2(src.residual_sums + ng * src.splits + k);
  return total / static_cast<acc_t>(src.group_size);
}

// Group ng's values (channel_coefs folds in a channel's weight and bias).
template <bool kInputGrad, typename acc_t>
__device__ GroupValues<acc_t> group_values(const GroupSource<acc_t>& src, int64_t ng) {
  GroupValues<acc_t> v{gload_l2(src.mean + ng), gload_l2(src.rstd + ng), acc_t(0), acc_t(0), acc_t(0)};
  if (src.residual_sums != nullptr) {
    v.residual = summed_residual(src, ng, v.pivot, v.rstd);
  } else {
    v.residual = gload_l2(&src.coefs[ng].residual);
  }
  if constexpr (kInputGrad) {
    v.x_coef = gload_l2(&src.coefs[ng].x_coef);
    v.bias_coef = gload_l2(&src.coefs[ng].bias_coef);
  }
  return v;
}

// Channel c of sample n: its coefficients from its group's values
// (group_values) and its weight and bias, loaded only where the operation Op
// reads them.
template <typename Op, typename acc_t>
__device__ __forceinline__ ChannelCoefs<acc_t> channel_coefs(const GroupValues<acc_t>& group,
                                                             const ChannelParam<acc_t>& weight,
                                                             const ChannelParam<acc_t>& bias, int64_t n, int64_t c) {
  const acc_t w = Op::kUsesWeight ? weight.at(n, c, acc_t(1)) : acc_t(1);
  const acc_t b = Op::kUsesBias ? bias.at(n, c, acc_t(0)) : acc_t(0);
  const auto affine = math::fold_affine(group.residual, group.rstd, w, b);
  return {group.pivot, affine.scale, affine.shift, group.x_coef, group.bias_coef};
}

template <typename acc_t>
__device__ __forceinline__ ChannelCoefs<acc_t> warp_broadcast(const ChannelCoefs<acc_t>& k) {
  return {warp_broadcast(k.pivot), warp_broadcast(k.scale), warp_broadcast(k.shift), warp_broadcast(k.x_coef),
          warp_broadcast(k.bias_coef)};
}
template <typename acc_t>
__device__ __forceinline__ GroupValues<acc_t> warp_broadcast(const GroupValues<acc_t>& v) {
  return {warp_broadcast(v.pivot), warp_broadcast(v.rstd), warp_broadcast(v.residual), warp_broadcast(v.x_coef),
          warp_broadcast(v.bias_coef)};
}

// ---- per-value operations ----------------------------------------------------
// Each says what it reads: dy (kUsesGrad), the dx coefficients (kInputGrad),
// the channel's weight and bias (z = (x - pivot) * scale + shift needs both;
// dx's coefficient of g is scale).
// Backward sums: g * d and g, d = x - pivot, g = dy * act'(z).
template <Activation A>
struct GradSumsOp {
  static constexpr bool kUsesGrad = true;
  static constexpr bool kInputGrad = false;
  static constexpr bool kUsesWeight = A != Activation::None;
  static constexpr bool kUsesBias = A != Activation::None;
  template <typename acc_t>
  __device__ static Sum2<acc_t> apply(acc_t x, acc_t dy, const ChannelCoefs<acc_t>& k) {
    const acc_t d = x - k.pivot;
    acc_t g = dy;
    if constexpr (A != Activation::None) g = dy * math::activate_grad<A>(d * k.scale + k.shift);
    return {g * d, g};
  }
};

// Forward output.
template <Activation A>
struct ForwardOp {
  static constexpr bool kUsesGrad = false;
  static constexpr bool kInputGrad = false;
  static constexpr bool kUsesWeight = true;
  static constexpr bool kUsesBias = true;
  template <typename acc_t>
  __device__ static acc_t apply(acc_t x, acc_t /*dy*/, const ChannelCoefs<acc_t>& k) {
    return math::activate<A>((x - k.pivot) * k.scale + k.shift);
  }
};

// Input gradient; scale = rstd * weight is also the coefficient of g.
template <Activation A>
struct InputGradOp {
  static constexpr bool kUsesGrad = true;
  static constexpr bool kInputGrad = true;
  static constexpr bool kUsesWeight = true;
  static constexpr bool kUsesBias = A != Activation::None;
  template <typename acc_t>
  __device__ static acc_t apply(acc_t x, acc_t dy, const ChannelCoefs<acc_t>& k) {
    const Sum2<acc_t> gd = GradSumsOp<A>::apply(x, dy, k);  // {g * d, g}
    return k.scale * gd.b + k.x_coef * (x - k.pivot) + k.bias_coef;
  }
};

}  // namespace cuda
}  // namespace gnflex
