// CUDA GroupNorm device code, last part: the forward and backward kernels
// (one launch each), their schedules and workspace, and their launches on
// raw pointers (the op in group_norm_cuda.cu and the simulator test both
// call them).
#pragma once

#include <numeric>

#include "group_norm_resident.cuh"

namespace gnflex {
namespace cuda {

// Scratch memory of one call, carved from one buffer the caller allocates:
// per-(n, g) coefficients, the forward's chunk stats, the backward's
// residual sums and gradient partial sums, and the two-level
// merges' per-band results (each its own region).
template <typename acc_t>
struct Workspace {
  static constexpr int64_t kAlign = 256;
  int64_t coefs_at = 0, stats_at = 0, band_stats_at = 0, residual_at = 0, grad_at = 0, group_grad_at = 0,
          band_grad_at = 0, band_group_grad_at = 0, bytes = 0;

  Workspace(const GroupNormShape& s, const Plan& plan) {
    const bool cf = plan.layout == Layout::ChannelsFirst;
    // Places the next region of `items` items of `size` bytes.
    const auto region = [this](int64_t items, int64_t size) {
      const int64_t at = bytes;
      bytes += (std::max<int64_t>(1, items) * size + kAlign - 1) / kAlign * kAlign;
      return at;
    };
    const int64_t slots = cf ? 0 : plan.tiles * plan.group_slots;
    const int64_t stat_bands = plan.stat_bands.parts > 1 ? plan.stat_bands.parts : 0;
    const int64_t grad_bands = plan.grad_bands.parts > 1 ? plan.grad_bands.parts : 0;
    coefs_at = region(s.N * s.G, sizeof(GroupCoefs<acc_t>));
    stats_at = region(cf ? s.N * s.G * plan.run_parts : s.N * plan.stat_rows.parts * slots, sizeof(ChunkStats<acc_t>));
    band_stats_at = region(s.N * stat_bands * s.G, sizeof(ChunkStats<acc_t>));
    residual_at = region(s.N * s.G * plan.residual_splits, sizeof(acc_t));
    grad_at = region(s.N * s.C * grad_parts(plan), sizeof(Sum2<acc_t>));
    group_grad_at = region(s.N * plan.grad_rows.parts * slots, sizeof(Sum2<acc_t>));
    band_grad_at = region(s.N * grad_bands * s.C, sizeof(Sum2<acc_t>));
    band_group_grad_at = region(s.N * grad_bands * s.G, sizeof(Sum2<acc_t>));
  }
  template <typename T>
  static T* at(void* base, int64_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
  }
  GroupCoefs<acc_t>* coefs(void* base) const { return at<GroupCoefs<acc_t>>(base, coefs_at); }
  ChunkStats<acc_t>* chunk_stats(void* base) const { return at<ChunkStats<acc_t>>(base, stats_at); }
  ChunkStats<acc_t>* band_stats(void* base) const { return at<ChunkStats<acc_t>>(base, band_stats_at); }
  acc_t* residual_sums(void* base) const { return at<acc_t>(base, residual_at); }
  // The backward's gradient sums, where they go.
  GradOut<acc_t> grad_out(void* base, const Plan& plan, const SequenceWords& sw) const {
    return {ChannelSums<acc_t>{at<Sum2<acc_t>>(base, grad_at), grad_parts(plan), plan.layout},
            at<Sum2<acc_t>>(base, group_grad_at),
            ChannelSums<acc_t>{at<Sum2<acc_t>>(base, band_grad_at), plan.grad_bands.parts, Layout::ChannelsLast},
            at<Sum2<acc_t>>(base, band_group_grad_at),
            coefs(base),
            sw,
            0};
  }
};

// ---- schedules -------------------------------------------------------------------
// A round covers about kRoundBytes of x; a stage starts kLagRounds rounds
// after the one it depends on, so its blocks rarely wait and x read by the
// first is still in L2 (lag x round well below an A100 / H100 L2) when the
// second reads it again.
constexpr int64_t kRoundBytes = 4 << 20;
constexpr int64_t kLagRounds = 2;
inline int64_t round_bytes() {
#ifdef GNFLEX_CUDA_SIM
  if (gnflex_sim_plan.round_bytes > 0) return gnflex_sim_plan.round_bytes;
#endif
  return kRoundBytes;
}

// Bytes of x read between a domain's statistics and its output pass: the
// lag's rounds when there are several, the whole tensor when one round holds
// it. The bench calls the path "l2" up to kL2ReuseBytes (well inside an A100 /
// H100 L2), else "dram".
constexpr int64_t kL2ReuseBytes = 16 << 20;
inline int64_t l2_reuse_bytes() {
#ifdef GNFLEX_CUDA_SIM
  if (gnflex_sim_plan.l2_reuse_bytes > 0) return gnflex_sim_plan.l2_reuse_bytes;
#endif
  return kL2ReuseBytes;
}
inline int64_t reuse_bytes(const Schedule& sc, int64_t tensor_bytes) {
  const Stage& stats = sc.stage[0];
  if (stats.rounds() <= 1) return tensor_bytes;
  return kLagRounds * (tensor_bytes / stats.rounds() + 1);
}
// The "dram" path: the output pass re-reads x (the backward's dx pass x and
// dy) from memory; its rounds then run reversed.
inline bool rereads_from_dram(const Schedule& sc, int64_t tensor_bytes) {
  return reuse_bytes(sc, tensor_bytes) > l2_reuse_bytes();
}

// A stage's work items per domain and per work block.
struct StageItems {
  int64_t per_domain, per_block;
};

// Stages over `domains` domains of domain_bytes each, in rounds of whole
// blocks of every stage (so a round's blocks cover exactly its domains).
inline Schedule make_schedule(int64_t domains, int64_t domain_bytes, std::initializer_list<StageItems> stages) {
  int64_t align = 1;
  for (const StageItems& st : stages) {
    const int64_t a = st.per_block / std::gcd(st.per_block, st.per_domain);
    align = std::lcm(align, a);
  }
  const int64_t round_domains =
      align * std::max<int64_t>(1, round_bytes() / std::max<int64_t>(1, align * domain_bytes));
  const bool one_round = round_domains >= domains;
  Schedule sc;
  for (const StageItems& st : stages) {
    Stage& stage = sc.stage[sc.stages];
    stage.blocks = ceil_div(domains * st.per_domain, st.per_block);
    stage.per_round = one_round ? std::max<int64_t>(1, stage.blocks) : round_domains * st.per_domain / st.per_block;
    stage.first_round = sc.stages * (one_round ? 1 : kLagRounds);
    ++sc.stages;
  }
  return sc;
}

inline StageItems stats_items_cf(const Plan& plan) { return {plan.run_parts, plan.teams_per_block()}; }
inline StageItems plane_items(const GroupNormShape& s, const Plan& plan) {
  const int64_t Cg = s.channels_per_group();
  return plan.planes_per_block > 0 ? StageItems{Cg, plan.planes_per_block} : StageItems{Cg * plan.plane.parts, 1};
}

// Forward: statistics (stage 0), output (stage 1).
template <typename scalar_t>
Schedule forward_schedule(const GroupNormShape& s, const Plan& plan) {
  const int64_t elem = sizeof(scalar_t);
  Schedule sc = plan.layout == Layout::ChannelsFirst
                    ? make_schedule(s.N * s.G, s.group_size() * elem, {stats_items_cf(plan), plane_items(s, plan)})
                    : make_schedule(s.N, s.C * s.HxW * elem,
                                    {{plan.stat_rows.parts * plan.tiles, 1}, {plan.out_rows.parts * plan.tiles, 1}});
  sc.stage[1].reversed = rereads_from_dram(sc, s.numel() * elem);
  finish_schedule(sc);
  return sc;
}

// Backward: residual sums (stage 0), gradient sums (1), dx (2, when wanted),
// dweight / dbias (3, when wanted; after every gradient-sum block).
template <typename scalar_t>
Schedule backward_schedule(const GroupNormShape& s, const Plan& plan, bool input_grad, bool param_grads) {
  const int64_t elem = sizeof(scalar_t);
  const int64_t per_block = plan.teams_per_block();
  Schedule sc;
  if (plan.layout == Layout::ChannelsFirst) {
    const StageItems planes = plane_items(s, plan);
    sc = make_schedule(s.N * s.G, s.group_size() * elem, {{plan.residual_splits, per_block}, planes, planes});
  } else {
    sc = make_schedule(s.N, s.C * s.HxW * elem,
                       {{s.G * plan.residual_splits, per_block},
                        {plan.grad_rows.parts * plan.tiles, 1},
                        {plan.out_rows.parts * plan.tiles, 1}});
  }
  sc.stage[2].reversed = rereads_from_dram(sc, s.numel() * elem);  // dx re-reads x and dy
  if (!input_grad) sc.stage[2].blocks = 0;
  Stage& params = sc.stage[sc.stages++];
  params.blocks = param_grads ? ceil_div(s.C, kParamChannels) : 0;
  params.per_round = std::max<int64_t>(1, params.blocks);
  params.first_round = sc.stage[1].end_round();
  finish_schedule(sc);
  return sc;
}

// What launch_forward / launch_backward need of their caller, over both
// channels-last vector widths (the width follows the pointers): bytes of
// scratch memory, the sequence words' capacity (groups, and the bands of
// two-level merges), and the most tickets (blocks) one launch takes (1-D
// grids allow up to 2^31 - 1).
struct LaunchNeeds {
  int64_t workspace_bytes = 0, domains = 1, tickets = 0;
};

template <typename scalar_t>
LaunchNeeds launch_needs(const GroupNormShape& s, Layout layout) {
  LaunchNeeds needs;
  needs.domains = std::max<int64_t>(1, s.N * s.G);
  const int64_t stat_domains = layout == Layout::ChannelsFirst ? s.N * s.G : s.N;
  for (int vec : {1, PackTraits<scalar_t>::kSize}) {
    const Plan plan = make_plan<scalar_t>(s, layout, vec);
    needs.workspace_bytes = std::max(needs.workspace_bytes, Workspace<acc_type<scalar_t>>(s, plan).bytes);
    needs.domains = std::max({needs.domains, stat_domains * plan.stat_bands.parts, s.N * plan.grad_bands.parts});
    needs.tickets = std::max({needs.tickets, forward_schedule<scalar_t>(s, plan).tickets,
                              backward_schedule<scalar_t>(s, plan, true, true).tickets});
  }
  return needs;
}

inline dim3 grid_of(int64_t blocks) { return dim3(static_cast<unsigned int>(blocks)); }

// Calls f(Width<V>) for the plan's channels-last vector width.
template <typename scalar_t, typename F>
void dispatch_width(const Plan& plan, F&& f) {
  constexpr int kV = PackTraits<scalar_t>::kSize;
  if (plan.vec == kV) {
    f(Width<kV>{});
  } else {
    f(Width<1>{});
  }
}

// ---- the kernels -----------------------------------------------------------------
// At least two blocks of kThreads per SM: ptxas keeps a kernel within 128
// registers (without a bound it chose 64 for some and spilled).
constexpr int kMinBlocksPerSm = 2;

// Shared memory the phases of one kernel share (a block runs one phase).
template <int64_t kBytes>
struct alignas(16) SharedArena {
  unsigned char bytes[kBytes];
};

// Forward, channels-first: chunk statistics (the completing team merges its
// group), then y.
template <Activation A, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_cf_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelParam<acc_t> weight,
                      ChannelParam<acc_t> bias, GroupNormShape s, Plan plan, Schedule sc, StatsOut<acc_t> out) {
  const Ticket ticket = take_ticket(out.sw);
  out.epoch = ticket.epoch;
  const Work w = locate(sc, ticket.value);
  if (w.stage == 0) {
    if (plan.warp_runs) {
      chunk_stats_cf<32>(x, s, plan, w.block, out);
    } else {
      chunk_stats_cf<kThreads>(x, s, plan, w.block, out);
    }
  } else if (w.stage == 1) {
    const GroupSource<acc_t> src{out.mean, out.rstd, out.coefs};
    apply_cf<ForwardOp<A>>(x, x, y, s, plan, w.block, src, weight, bias, out.sw, 0, ticket.epoch);
  }
  finish_block(out.sw, sc.tickets, ticket.epoch);
}

// Forward, channels-first, groups resident in a team's registers (one pass,
// no tickets).
template <Activation A, int kLanes, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_cf_resident_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelParam<acc_t> weight,
                               ChannelParam<acc_t> bias, GroupNormShape s, acc_t eps, acc_t* __restrict__ mean,
                               acc_t* __restrict__ rstd) {
  __shared__ SharedArena<kResidentArena<acc_t>> arena;
  ScaleShift<acc_t>* table = reinterpret_cast<ScaleShift<acc_t>*>(arena.bytes);
  resident_cf<A, kLanes>(x, y, s, blockIdx.x, weight, bias, eps, mean, rstd, table);
}

// Forward, channels-last: chunk statistics (the completing block merges its
// sample's groups), then y.
template <Activation A, int V, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_cl_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelParam<acc_t> weight,
                      ChannelParam<acc_t> bias, GroupNormShape s, Plan plan, Schedule sc, StatsOut<acc_t> out) {
  using Table = TileCoefs<ForwardOp<A>, acc_t>;
  __shared__ SharedArena<std::max<int64_t>(kStatsClArena<V, acc_t>, Table::kArenaBytes)> arena;
  const Ticket ticket = take_ticket(out.sw);
  out.epoch = ticket.epoch;
  const Work w = locate(sc, ticket.value);
  if (w.stage == 0) {
    chunk_stats_cl<V>(x, s, plan, w.block, out, arena.bytes);
  } else if (w.stage == 1) {
    const GroupSource<acc_t> src{out.mean, out.rstd, out.coefs};
    apply_cl<ForwardOp<A>, V>(x, x, y, s, plan, w.block, src, weight, bias, out.sw, 0, ticket.epoch, arena.bytes);
  }
  finish_block(out.sw, sc.tickets, ticket.epoch);
}

// What the backward reads and writes besides x, dy and dx.
template <typename acc_t>
struct TypedBackwardArgs {
  const acc_t* mean;
  const acc_t* rstd;
  ChannelParam<acc_t> weight, bias;
  acc_t* residual_sums;
  GradOut<acc_t> out;
  ParamGrads<acc_t> pg;
};

// The stages of the backward in either layout; kChannelsLast picks the
// gradient-sum and dx phases.
template <bool kChannelsLast, Activation A, int V, typename scalar_t, typename acc_t>
__device__ void backward_work(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ dx, const GroupNormShape& s, const Plan& plan, const Work& w,
                              const TypedBackwardArgs<acc_t>& a, unsigned char* arena) {
  const GradOut<acc_t>& out = a.out;
  const GroupSource<acc_t> coefs{a.mean, a.rstd, out.coefs};
  if (w.stage == 0) {
    if (plan.warp_runs) {
      residual_sums<32>(x, s, plan, w.block, a.mean, a.rstd, a.residual_sums, out.sw, out.epoch);
    } else {
      residual_sums<kThreads>(x, s, plan, w.block, a.mean, a.rstd, a.residual_sums, out.sw, out.epoch);
    }
  } else if (w.stage == 1) {
    const GroupSource<acc_t> summed{a.mean, a.rstd, out.coefs, a.residual_sums, plan.residual_splits, s.group_size()};
    if constexpr (kChannelsLast) {
      grad_sums_cl<GradSumsOp<A>, V>(x, dy, s, plan, w.block, summed, a.weight, a.bias, out, arena);
    } else {
      grad_sums_cf<GradSumsOp<A>>(x, dy, s, plan, w.block, summed, a.weight, a.bias, out);
    }
  } else if (w.stage == 2) {
    if constexpr (kChannelsLast) {
      apply_cl<InputGradOp<A>, V>(x, dy, dx, s, plan, w.block, coefs, a.weight, a.bias, out.sw, 1, out.epoch, arena);
    } else {
      apply_cf<InputGradOp<A>>(x, dy, dx, s, plan, w.block, coefs, a.weight, a.bias, out.sw, 1, out.epoch);
    }
  } else if (w.stage == 3) {
    param_grads_block(s, plan, w.block, coefs, a.pg, out.sw);
  }
}

template <Activation A, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_cf_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                       GroupNormShape s, Plan plan, Schedule sc, TypedBackwardArgs<acc_t> a) {
  const Ticket ticket = take_ticket(a.out.sw);
  a.out.epoch = ticket.epoch;
  backward_work<false, A, 1>(dy, x, dx, s, plan, locate(sc, ticket.value), a, nullptr);
  finish_block(a.out.sw, sc.tickets, ticket.epoch);
}

template <Activation A, int V, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_cl_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                       GroupNormShape s, Plan plan, Schedule sc, TypedBackwardArgs<acc_t> a) {
  __shared__ SharedArena<kGradClArena<V, acc_t>> arena;
  const Ticket ticket = take_ticket(a.out.sw);
  a.out.epoch = ticket.epoch;
  backward_work<true, A, V>(dy, x, dx, s, plan, locate(sc, ticket.value), a, arena.bytes);
  finish_block(a.out.sw, sc.tickets, ticket.epoch);
}

// ---- launches --------------------------------------------------------------------
// y = act(GroupNorm(x)), mean and rstd (N * G). weight / bias may be null
// (1 / 0). workspace: launch_needs().workspace_bytes; sw: sequence words of
// the stream, capacity >= launch_needs().domains.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_forward(const scalar_t* x, scalar_t* y, ChannelParam<acc_t> weight, ChannelParam<acc_t> bias, acc_t eps,
                    Activation act, const GroupNormShape& s, Layout layout, acc_t* mean, acc_t* rstd, void* workspace,
                    SequenceWords sw, cudaStream_t stream) {
  if (s.N * s.C == 0 || s.HxW == 0) return;
  const Plan plan = make_plan<scalar_t>(s, layout, channels_last_vec<scalar_t>(s, {x, y}));
  if (plan.resident) {
    dispatch_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const dim3 grid = grid_of(resident_blocks(s, plan));
      if (plan.warp_runs) {
        GNFLEX_LAUNCH((forward_cf_resident_kernel<A, 32, scalar_t, acc_t>), grid, kThreads, stream, x, y, weight, bias,
                      s, eps, mean, rstd);
      } else {
        GNFLEX_LAUNCH((forward_cf_resident_kernel<A, kThreads, scalar_t, acc_t>), grid, kThreads, stream, x, y, weight,
                      bias, s, eps, mean, rstd);
      }
    });
    return;
  }
  const Workspace<acc_t> ws(s, plan);
  const Schedule sc = forward_schedule<scalar_t>(s, plan);
  const StatsOut<acc_t> out{
      ws.chunk_stats(workspace), ws.band_stats(workspace), mean, rstd, ws.coefs(workspace), eps, sw, 0};
  dispatch_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (layout == Layout::ChannelsFirst) {
      GNFLEX_LAUNCH((forward_cf_kernel<A, scalar_t, acc_t>), grid_of(sc.tickets), kThreads, stream, x, y, weight, bias,
                    s, plan, sc, out);
    } else {
      dispatch_width<scalar_t>(plan, [&](auto width) {
        constexpr int V = decltype(width)::value;
        GNFLEX_LAUNCH((forward_cl_kernel<A, V, scalar_t, acc_t>), grid_of(sc.tickets), kThreads, stream, x, y, weight,
                      bias, s, plan, sc, out);
      });
    }
  });
}

// dx (when not null), dweight and dbias (when dweight.data is not null).
// weight / bias may be null (1 / 0). workspace and sw as for launch_forward.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void launch_backward(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd,
                     ChannelParam<acc_t> weight, ChannelParam<acc_t> bias, Activation act, const GroupNormShape& s,
                     Layout layout, scalar_t* dx, ChannelGrad<acc_t> dweight, ChannelGrad<acc_t> dbias, void* workspace,
                     SequenceWords sw, cudaStream_t stream) {
  if (s.N * s.C == 0 || s.HxW == 0) return;
  const Plan plan = make_plan<scalar_t>(s, layout, channels_last_vec<scalar_t>(s, {x, dy, dx}));
  const Workspace<acc_t> ws(s, plan);
  const Schedule sc = backward_schedule<scalar_t>(s, plan, dx != nullptr, dweight.data != nullptr);
  const GradOut<acc_t> out = ws.grad_out(workspace, plan, sw);
  // dweight / dbias from the per-band channel sums where there are bands
  // (channels-last only).
  const ParamGrads<acc_t> pg{plan.grad_bands.parts > 1 ? out.band : out.partial, dweight, dbias};
  const TypedBackwardArgs<acc_t> args{mean, rstd, weight, bias, ws.residual_sums(workspace), out, pg};
  dispatch_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (layout == Layout::ChannelsFirst) {
      GNFLEX_LAUNCH((backward_cf_kernel<A, scalar_t, acc_t>), grid_of(sc.tickets), kThreads, stream, dy, x, dx, s, plan,
                    sc, args);
    } else {
      dispatch_width<scalar_t>(plan, [&](auto width) {
        constexpr int V = decltype(width)::value;
        GNFLEX_LAUNCH((backward_cl_kernel<A, V, scalar_t, acc_t>), grid_of(sc.tickets), kThreads, stream, dy, x, dx, s,
                      plan, sc, args);
      });
    }
  });
}

// Each dtype's launches (and so its kernels) compile in a translation unit of
// their own, launches/<dtype>.cu, so a build compiles them in parallel; the
// op's file declares them extern: GNFLEX_LAUNCHES(extern, float).
#define GNFLEX_LAUNCHES(prefix, scalar_t)                                                                             \
  prefix template void launch_forward<scalar_t>(const scalar_t*, scalar_t*, ChannelParam<acc_type<scalar_t>>,         \
                                                ChannelParam<acc_type<scalar_t>>, acc_type<scalar_t>, Activation,     \
                                                const GroupNormShape&, Layout, acc_type<scalar_t>*,                   \
                                                acc_type<scalar_t>*, void*, SequenceWords, cudaStream_t);             \
  prefix template void launch_backward<scalar_t>(const scalar_t*, const scalar_t*, const acc_type<scalar_t>*,         \
                                                 const acc_type<scalar_t>*, ChannelParam<acc_type<scalar_t>>,         \
                                                 ChannelParam<acc_type<scalar_t>>, Activation, const GroupNormShape&, \
                                                 Layout, scalar_t*, ChannelGrad<acc_type<scalar_t>>,                  \
                                                 ChannelGrad<acc_type<scalar_t>>, void*, SequenceWords, cudaStream_t);

}  // namespace cuda
}  // namespace gnflex
