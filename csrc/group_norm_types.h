// Plain types shared by the host code and every kernel back end. No code that
// depends on compiler target flags lives here (see cpu/group_norm_kernels_impl.h).
#pragma once

#include <cstdint>
#include <type_traits>

// The dispatcher namespace of the ops: torch.ops.gnflex. The JIT build
// (gnflex/jit.py) compiles the same sources as another namespace
// (-DGNFLEX_OP_NAMESPACE=gnflex_jit) so both builds can be loaded side by side.
#ifndef GNFLEX_OP_NAMESPACE
#define GNFLEX_OP_NAMESPACE gnflex
#endif
#define GNFLEX_STRINGIFY_(x) #x
#define GNFLEX_STRINGIFY(x) GNFLEX_STRINGIFY_(x)
// "gnflex::<op>" in the configured namespace.
#define GNFLEX_OP_NAME(op) GNFLEX_STRINGIFY(GNFLEX_OP_NAMESPACE) "::" op

// Functions usable from host code and CUDA kernels.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GNFLEX_HD __host__ __device__ __forceinline__
#else
#define GNFLEX_HD inline
#endif

namespace gnflex {

// Activation fused after the affine transform.
enum class Activation : int { None = 0, ReLU = 1, SiLU = 2, GELU = 3 };

// Memory layouts the kernels read natively.
//   ChannelsFirst: dense (N, C, *spatial) row-major (NCHW).
//   ChannelsLast: dense with the channel innermost, (N, *spatial, C) in
//                 memory: channels_last, channels_last_3d, and a transposed
//                 (N, L, C) tensor of rank 3.
enum class Layout { ChannelsFirst, ChannelsLast };

// Sizes of an (N, C, *) input seen as (N, C, HxW) with G groups.
struct GroupNormShape {
  int64_t N;
  int64_t C;
  int64_t HxW;
  int64_t G;
  GNFLEX_HD int64_t channels_per_group() const { return C / G; }
  // Number of values normalised together.
  GNFLEX_HD int64_t group_size() const { return C / G * HxW; }
  GNFLEX_HD int64_t numel() const { return N * C * HxW; }
};

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value, so
// kernels take the activation as a template parameter.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::ReLU:
      return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::SiLU:
      return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::GELU:
      return f(std::integral_constant<Activation, Activation::GELU>{});
    case Activation::None:
    default:
      return f(std::integral_constant<Activation, Activation::None>{});
  }
}

}  // namespace gnflex
