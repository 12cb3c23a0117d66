// CUDA GroupNorm device code, part 4 of 5: the elementwise outputs (y in the
// forward, dx in the backward, whose launch also runs the dweight / dbias
// blocks).
#pragma once

#include "group_norm_grad.cuh"

namespace gnflex {
namespace cuda {

// Channels-first: planes as for_each_plane hands them out; 16-byte loads and
// stores where the pointers share their alignment.
template <typename Op, typename scalar_t, typename acc_t>
__global__ void apply_cf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                scalar_t* __restrict__ out, GroupNormShape s, Plan plan, GroupSource<acc_t> src,
                                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                ParamGrads<acc_t> pg) {
  if (blockIdx.x >= pg.first_block) {  // uniform
    param_grads_block(s, plan, src, pg);
    return;
  }
  for_each_plane<Op>(s, plan, src, weight, bias, [&](const PlaneWork& w, const ChannelCoefs<acc_t>& k) {
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

// Channels-last: one block per (n, row block, tile); each thread owns vec
// channels (coefficients in registers, from the block's table) and every
// rows_per_pass-th row.
template <typename Op, int V, typename scalar_t, typename acc_t>
__global__ void apply_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                scalar_t* __restrict__ out, GroupNormShape s, Plan plan, GroupSource<acc_t> src,
                                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                ParamGrads<acc_t> pg) {
  if (blockIdx.x >= pg.first_block) {  // uniform
    param_grads_block(s, plan, src, pg);
    return;
  }
  const RowBlock b = row_block(s, plan, plan.out_rows);
  const RowThread t = row_thread(plan, b);
  const TileCoefs<Op, acc_t> table = TileCoefs<Op, acc_t>::shared();
  table.fill(s, b, src, weight, bias);
  if (!t.active) return;
  ChannelCoefs<acc_t> k[V];
#pragma unroll
  for (int i = 0; i < V; ++i) k[i] = table.at(s, b, t.c + i);
  for (int64_t r = b.row_begin + t.ty; r < b.row_end; r += plan.rows_per_pass) {
    const int64_t idx = (b.n * s.HxW + r) * s.C + t.c;
    acc_t xv[V], dv[V];
    load_values<V>(x + idx, xv);
    if constexpr (Op::kUsesGrad) {
      load_values<V>(dy + idx, dv);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) xv[i] = Op::apply(xv[i], Op::kUsesGrad ? dv[i] : acc_t(0), k[i]);
    store_values<V>(out + idx, xv);
  }
}

}  // namespace cuda
}  // namespace gnflex
