// CUDA GroupNorm device code: the resident forward. A channels-first group
// that fits its statistics team's registers (a warp's up to kWarpSpan
// values, a block's up to kSpan) is normalized in one pass: the team loads
// it once, computes its exact statistics from the registers (the chunk
// scheme with the group as its one chunk), folds its channels' scale and
// shift into a shared-memory table and writes y from the registers. x is
// read once and y written once; no workspace, no waiting on other blocks.
#pragma once

#include "group_norm_apply.cuh"

namespace gnflex {
namespace cuda {

// Shared memory of a resident block: the channels of its teams' groups.
template <typename acc_t>
constexpr int64_t kResidentArena = kResidentChannels * static_cast<int64_t>(sizeof(ScaleShift<acc_t>));

// Blocks of a resident launch: a team per group.
inline int64_t resident_blocks(const GroupNormShape& s, const Plan& plan) {
  return ceil_div(s.N * s.G, plan.teams_per_block());
}

// Once per group, from its team's centered sums: mean (the pivot) and rstd
// written, the channels' scale and shift in the team's table, and the
// group's values in every thread.
template <typename Op, typename T, typename acc_t>
__device__ GroupValues<acc_t> finalize_resident_group(const T& team, const GroupNormShape& s, int64_t ng, int64_t run,
                                                      acc_t center, const Sum2<acc_t>& d,
                                                      const ChannelParam<acc_t>& weight,
                                                      const ChannelParam<acc_t>& bias, acc_t eps,
                                                      acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                                                      ScaleShift<acc_t>* channels) {
  GroupValues<acc_t> group{};
  if (team.rank == 0) {
    const auto st = math::stats_from_centered_sums(run, center, d.a, d.b);
    group.pivot = math::rounded_mean(st);
    group.rstd = math::rstd_from_stats(st, eps);
    group.residual = math::mean_residual(st, group.pivot);
    gstore(mean + ng, group.pivot);
    gstore(rstd + ng, group.rstd);
  }
  group = team.broadcast(group);
  const int64_t Cg = s.channels_per_group();
#pragma unroll 1
  for (int64_t c = team.rank; c < Cg; c += T::kSize) {
    const ChannelCoefs<acc_t> k = channel_coefs<Op>(group, weight, bias, ng / s.G, ng % s.G * Cg + c);
    channels[c] = {k.scale, k.shift};
  }
  team.sync();
  return group;
}

// Group `team.item` of work block `block`: y, mean and rstd.
template <Activation A, int kLanes, typename scalar_t, typename acc_t>
__device__ void resident_cf(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const GroupNormShape& s,
                            int64_t block, const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias,
                            acc_t eps, acc_t* __restrict__ mean, acc_t* __restrict__ rstd, ScaleShift<acc_t>* table) {
  using T = Team<kLanes>;
  using Op = ForwardOp<A>;
  const T team = T::in_block(block);
  if (team.item >= s.N * s.G) return;  // uniform per team
  const int64_t ng = team.item, run = s.group_size();
  ScaleShift<acc_t>* channels = table + (kLanes == 32 ? threadIdx.x / 32 : 0) * s.channels_per_group();
  const scalar_t* xs = x + ng * run;
  SpanValues<kLanes, scalar_t, acc_t> values;
  values.load(xs, run, team.rank);
  const acc_t sum = team.sum2(values.sums([](acc_t v) { return Sum2<acc_t>{v, acc_t(0)}; })).a;
  const acc_t center = team.broadcast(math::chunk_center(run, sum));
  const Sum2<acc_t> d = team.sum2(values.sums([center](acc_t v) {
    const acc_t dv = v - center;
    return Sum2<acc_t>{dv, dv * dv};
  }));
  const GroupValues<acc_t> group =
      finalize_resident_group<Op>(team, s, ng, run, center, d, weight, bias, eps, mean, rstd, channels);
  // The channel of span index i: i / HxW, exact in float (i + 1/2 is at
  // least 1 / (2 HxW) from a multiple of HxW, far above the rounding, for
  // spans below 2^22 values).
  const int hxw = static_cast<int>(s.HxW);
  const float inv_hxw = 1.0f / static_cast<float>(hxw);
  const auto channel = [inv_hxw](int i) { return static_cast<int>((static_cast<float>(i) + 0.5f) * inv_hxw); };
  scalar_t* ys = y + ng * run;
  const bool aligned = misalignment(xs) == misalignment(ys);
  values.for_each_held([&](int64_t at, auto width, const auto& v) {
    constexpr int W = decltype(width)::value;
    const int i = static_cast<int>(at);
    const int first = channel(i);
    // Each value's channel coefficients: the first's for a pack in one
    // channel (the common case), else each its own.
    ScaleShift<acc_t> k[W];
    const ScaleShift<acc_t> k0 = channels[first];
#pragma unroll
    for (int j = 0; j < W; ++j) k[j] = k0;
    if (W > 1 && i - first * hxw + W > hxw) {
#pragma unroll
      for (int j = 1; j < W; ++j) k[j] = channels[channel(i + j)];
    }
    acc_t out[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      out[j] = Op::apply(v[j], acc_t(0), ChannelCoefs<acc_t>{group.pivot, k[j].scale, k[j].shift, acc_t(0), acc_t(0)});
    }
    if (W == 1 || aligned) {
      store_values<W>(ys + at, out);
    } else {
#pragma unroll
      for (int j = 0; j < W; ++j) store_values<1>(ys + at + j, reinterpret_cast<const acc_t(&)[1]>(out[j]));
    }
  });
}

}  // namespace cuda
}  // namespace gnflex
