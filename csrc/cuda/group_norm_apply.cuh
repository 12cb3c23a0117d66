// CUDA GroupNorm device code: the elementwise outputs (y in the
// forward, dx in the backward), each work block after its domains' group
// values are ready (level 0 forward, level 1 backward).
#pragma once

#include "group_norm_grad.cuh"

namespace gnflex {
namespace cuda {

// Channels-first: planes as for_each_plane hands them out; 16-byte loads and
// stores where the pointers share their alignment.
template <typename Op, typename scalar_t, typename acc_t>
__device__ void apply_cf(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, scalar_t* __restrict__ out,
                         const GroupNormShape& s, const Plan& plan, int64_t block, const GroupSource<acc_t>& src,
                         const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias, const SequenceWords& sw,
                         int level, Epoch epoch) {
  const DomainRange domains = plane_block_domains(s, plan, block);
  wait_domains(sw, level, domains.first, domains.last, epoch);
  for_each_plane<Op>(s, plan, block, src, weight, bias, [&](const PlaneWork& w, const ChannelCoefs<acc_t>& k) {
    const scalar_t* xs = x + w.offset;
    const scalar_t* dys = Op::kUsesGrad ? dy + w.offset : xs;
    scalar_t* os = out + w.offset;
    const bool aligned = misalignment(xs) == misalignment(dys) && misalignment(xs) == misalignment(os);
    for_each_in_span(w.len, xs, aligned, w.tid, w.nthreads, [&](int64_t i, auto width) {
      constexpr int W = decltype(width)::value;
      acc_t xv[W], dv[W];
      load_values<W>(xs + i, xv);
      if constexpr (Op::kUsesGrad) {
        load_values<W>(dys + i, dv);
      }
#pragma unroll
      for (int j = 0; j < W; ++j) xv[j] = Op::apply(xv[j], Op::kUsesGrad ? dv[j] : acc_t(0), k);
      store_values<W>(os + i, xv);
    });
  });
}

// Channels-last: one work block per (n, row block, tile); each thread owns
// vec channels (coefficients in registers, from the block's table) and every
// rows_per_pass-th row. The domain is the sample.
template <typename Op, int V, typename scalar_t, typename acc_t>
__device__ void apply_cl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, scalar_t* __restrict__ out,
                         const GroupNormShape& s, const Plan& plan, int64_t block, const GroupSource<acc_t>& src,
                         const ChannelParam<acc_t>& weight, const ChannelParam<acc_t>& bias, const SequenceWords& sw,
                         int level, Epoch epoch, unsigned char* arena) {
  const RowBlock b = row_block(s, plan, plan.out_rows, block);
  const RowThread t = row_thread(plan, b);
  wait_domains(sw, level, b.n, b.n, epoch);
  const TileCoefs<Op, acc_t> table = TileCoefs<Op, acc_t>::in(arena);
  table.fill(s, b, src, weight, bias);
  if (!t.active) return;
  ChannelCoefs<acc_t> k[V];
#pragma unroll
  for (int i = 0; i < V; ++i) k[i] = table.at(s, b, t.c + i);
  // kUnroll rows at a time: their loads are in flight together.
  constexpr int kUnroll = Op::kUsesGrad ? 2 : 4;
  const int64_t step = plan.rows_per_pass, row_stride = step * s.C;
  for (int64_t r = b.row_begin + t.ty; r < b.row_end; r += kUnroll * step) {
    const int64_t idx = (b.n * s.HxW + r) * s.C + t.c;
    acc_t xv[kUnroll][V], dv[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * step < b.row_end) {
        load_values<V>(x + idx + u * row_stride, xv[u]);
        if constexpr (Op::kUsesGrad) {
          load_values<V>(dy + idx + u * row_stride, dv[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * step < b.row_end) {
#pragma unroll
        for (int i = 0; i < V; ++i) xv[u][i] = Op::apply(xv[u][i], Op::kUsesGrad ? dv[u][i] : acc_t(0), k[i]);
        store_values<V>(out + idx + u * row_stride, xv[u]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace gnflex
