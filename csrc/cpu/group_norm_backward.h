// CPU GroupNorm kernels, part 5: the backward schedules (fused per group /
// per sample, two-pass). Part of group_norm_kernels_impl.h, which includes the parts
// in order inside one translation unit per CPU capability.
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// ---- backward ------------------------------------------------------------------
template <typename scalar_t>
struct TypedBackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;  // null: only parameter gradients
  const acc_t* mean;
  const acc_t* rstd;
  AffineParams<acc_t> params;
  // Per group: the residual mean - pivot (the pivot is the saved mean; see
  // backward_residuals).
  const acc_t* residual;
  // Outputs for the parameter gradients: per-(n, c) sums of g * (x - pivot)
  // and g.
  acc_t* sum_gx;
  acc_t* sum_g;
  bool stream;     // non-temporal stores for dx
  bool walk_back;  // the dx pass walks its items last to first (walks_back)
};

// A group's pivot / scale / shift tables (pointers at its first channel),
// rebuilt from the saved statistics: outputs are computed about the group's
// rounded mean (the pivot). Scale and shift give z for act'(z), so without an
// activation they are not read and not built.
template <typename scalar_t, Activation A>
void group_affine_tables(const TypedBackwardArgs<scalar_t>& a, const GroupNormShape& s, int64_t n, int64_t g,
                         acc_type<scalar_t>* pivot, acc_type<scalar_t>* scale, acc_type<scalar_t>* shift) {
  const int64_t Cg = s.channels_per_group();
  const int64_t ng = n * s.G + g, c0 = g * Cg;
  fill_table(pivot, Cg, a.mean[ng]);
  if constexpr (A != Activation::None) {
    fold_group_affine(a.residual[ng], a.rstd[ng], a.params.weight(n, c0), a.params.bias(n, c0), Cg, scale, shift);
  }
}

// Whether the fused schedules keep g = dy * act'(z) between their two passes:
// with an activation and when dx is wanted.
template <Activation A, typename Args>
bool keeps_grad(const Args& a) {
  return A != Activation::None && a.dx != nullptr;
}

// Where g = dy * act'(z) can wait in dx itself for the dx pass, which reads
// each value before writing it: dx of the accumulate type (fp32, fp64), an
// activation, and dx written through the cache; null otherwise. The dx pass
// then reads x and g where it would read x and dy, and skips recomputing
// act'(z). A streamed dx does not stay in cache: there g would make a round
// trip to memory that costs more than recomputing it.
template <Activation A, typename scalar_t>
acc_type<scalar_t>* grad_in_dx(const TypedBackwardArgs<scalar_t>& a) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    if (keeps_grad<A>(a) && !a.stream) return a.dx;
  }
  return nullptr;
}

// Channels-first small groups of short planes, in batches
// (backward_groups_per_batch): each step (tables, sums, dx coefficients, dx)
// runs over the whole batch. A group of a few dozen values costs less than
// its set-up chain (sums stored as scalars, read back as vectors, horizontal
// sums, a division); batched, the chains of independent groups overlap. The
// dx pass walks the batch's planes as one run, and so do the sums where they
// may cross groups (PlaneBlocks::crosses_groups), else they walk each group's
// blocks as backward_fused_groups does: the bits of one group at a time.
template <typename scalar_t, Activation A>
void backward_fused_group_batches(const TypedBackwardArgs<scalar_t>& a, const GroupNormShape& s,
                                  const PlaneBlocks<scalar_t>& pb, bool prefetch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t D = s.group_size();
  const int64_t batch = backward_groups_per_batch(D);
  at::parallel_for(0, s.N * s.G, grain_of(2 * D), [&](int64_t begin, int64_t end) {
    const int64_t width = std::min(batch, end - begin) * Cg;
    Scratch<acc_t, 6> table({width, width, width, width, width, width});
    auto [pivot, scale, shift, g_coef, x_coef, bias_coef] = table.arrays;
    // g = dy * act'(z) of the current batch, kept for its dx pass.
    std::vector<acc_t> g_saved(keeps_grad<A>(a) ? width * s.HxW : 0);
    acc_t* const g_out = g_saved.empty() ? nullptr : g_saved.data();
    for (int64_t first = begin; first < end; first += batch) {
      const int64_t last = std::min(end, first + batch), planes = (last - first) * Cg;
      for (int64_t ng = first; ng < last; ++ng) {
        const int64_t at = (ng - first) * Cg;
        group_affine_tables<scalar_t, A>(a, s, ng / s.G, ng % s.G, pivot + at, scale + at, shift + at);
      }
      const AffineTables<acc_t> t{pivot, scale, shift};
      const scalar_t* bx = a.x + first * D;
      const scalar_t* bdy = a.dy + first * D;
      if (pb.crosses_groups(D, true)) {
        plane_block_grad_sums<scalar_t, A>(bdy, bx, planes, pb, t, a.sum_gx + first * Cg, a.sum_g + first * Cg, g_out);
      } else {
        for (int64_t ng = first; ng < last; ++ng) {
          const int64_t at = (ng - first) * Cg, off = (ng - first) * D;
          group_plane_grad_sums<scalar_t, A>(bdy + off, bx + off, Cg, pb, {pivot + at, scale + at, shift + at},
                                             a.sum_gx + ng * Cg, a.sum_g + ng * Cg, g_out ? g_out + off : nullptr);
        }
      }
      if (a.dx == nullptr) continue;
      for (int64_t ng = first; ng < last; ++ng) {
        const int64_t at = (ng - first) * Cg;
        group_input_grad_coefs(a.sum_gx + ng * Cg, a.sum_g + ng * Cg, a.params.weight(ng / s.G, ng % s.G * Cg), Cg,
                               a.residual[ng], a.rstd[ng], D, g_coef + at, x_coef + at, bias_coef + at);
      }
      const bool more = prefetch && last < end;
      const RunWrite<scalar_t, 2> w{a.stream,
                                    {more ? bx + planes * s.HxW : nullptr, more ? bdy + planes * s.HxW : nullptr}};
      input_grad_planes<scalar_t, A>(bdy, bx, a.dx + first * D, planes, pb, t, {g_coef, x_coef, bias_coef}, w, g_out);
    }
    stream_fence();
  });
}

// Channels-first, one group per work item: sums, then dx from cache.
// prefetch: fetch the next group while writing this one (see prefetch_fits).
template <typename scalar_t, Activation A>
void backward_fused_groups(const TypedBackwardArgs<scalar_t>& a, const GroupNormShape& s, bool prefetch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t D = s.group_size();
  const auto pb = plane_blocks_if<scalar_t>(backward_walks_plane_blocks<scalar_t>(s.HxW), s.HxW);
  if (pb && backward_groups_per_batch(D) >= 2 && !a.walk_back) {
    return backward_fused_group_batches<scalar_t, A>(a, s, *pb, prefetch);
  }
  at::parallel_for(0, s.N * s.G, grain_of(2 * D), [&](int64_t begin, int64_t end) {
    Scratch<acc_t, 6> table({Cg, Cg, Cg, Cg, Cg, Cg});
    auto [pivot, scale, shift, g_coef, x_coef, bias_coef] = table.arrays;
    // g = dy * act'(z) of the current group, kept for its dx pass.
    std::vector<acc_t> g_saved(keeps_grad<A>(a) ? D : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / s.G, g = ng - n * s.G, c0 = g * Cg;
      const scalar_t* gx = a.x + ng * D;
      const scalar_t* gdy = a.dy + ng * D;
      group_affine_tables<scalar_t, A>(a, s, n, g, pivot, scale, shift);
      const AffineTables<acc_t> t{pivot, scale, shift};
      acc_t* g_out = g_saved.empty() ? nullptr : g_saved.data();
      if (pb) {
        group_plane_grad_sums<scalar_t, A>(gdy, gx, Cg, *pb, t, a.sum_gx + ng * Cg, a.sum_g + ng * Cg, g_out);
      } else {
        for (int64_t c = 0; c < Cg; ++c) {
          std::tie(a.sum_gx[ng * Cg + c], a.sum_g[ng * Cg + c]) = plane_grad_sums<scalar_t, A>(
              gdy + c * s.HxW, gx + c * s.HxW, s.HxW, t, c, g_out ? g_out + c * s.HxW : nullptr);
        }
      }
      if (a.dx == nullptr) continue;
      group_input_grad_coefs(a.sum_gx + ng * Cg, a.sum_g + ng * Cg, a.params.weight(n, c0), Cg, a.residual[ng],
                             a.rstd[ng], D, g_coef, x_coef, bias_coef);
      const InputGradTables<acc_t> gt{g_coef, x_coef, bias_coef};
      const bool more = prefetch && ng + 1 < end;
      if (pb) {
        pb->for_each_block(Cg, a.walk_back, [&](int64_t c, int64_t planes) {
          const int64_t at = c * s.HxW;
          const RunWrite<scalar_t, 2> w{a.stream, {more ? gx + D + at : nullptr, more ? gdy + D + at : nullptr}};
          input_grad_planes<scalar_t, A>(gdy + at, gx + at, a.dx + ng * D + at, planes, *pb,
                                         {pivot + c, scale + c, shift + c}, {g_coef + c, x_coef + c, bias_coef + c}, w,
                                         g_out ? g_out + at : nullptr);
        });
        continue;
      }
      for_each_item(0, Cg, a.walk_back, [&](int64_t c, int64_t /*ahead*/) {
        const RunWrite<scalar_t, 2> w{a.stream,
                                      {more ? gx + D + c * s.HxW : nullptr, more ? gdy + D + c * s.HxW : nullptr}};
        input_grad_run<scalar_t, A>(gdy + c * s.HxW, gx + c * s.HxW, a.dx + ng * D + c * s.HxW, s.HxW,
                                    run_affine(t, c, PerRun{}), run_input_grad(gt, c, PerRun{}), w,
                                    g_saved.empty() ? nullptr : g_saved.data() + c * s.HxW);
      });
    }
    stream_fence();
  });
}

// Channels-last, one sample per work item. prefetch: as in backward_fused_groups.
template <typename scalar_t, Activation A>
void backward_fused_samples(const TypedBackwardArgs<scalar_t>& a, const GroupNormShape& s, bool prefetch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t block_rows = sum_rows_per_block(s.C);
  at::parallel_for(0, s.N, grain_of(2 * s.HxW * s.C), [&](int64_t begin, int64_t end) {
    Scratch<acc_t, 8> table({s.C, s.C, s.C, s.C, s.C, s.C, s.C, s.C});
    auto [pivot, scale, shift, g_coef, x_coef, bias_coef, block_gx, block_g] = table.arrays;
    // g = dy * act'(z) of the current sample, kept for its dx pass: in dx
    // (grad_in_dx), so no scratch as large as a sample goes through the
    // caches besides it; else in scratch (not zeroed: every value read is
    // written first).
    acc_t* const g_dx = grad_in_dx<A>(a);
    const std::unique_ptr<acc_t[]> g_saved(new acc_t[keeps_grad<A>(a) && g_dx == nullptr ? s.HxW * s.C : 0]);
    PairwiseArraySum<acc_t> total(2 * s.C);  // block_gx, block_g are adjacent
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = n * s.HxW * s.C;
      acc_t* const g_out = g_dx != nullptr ? g_dx + offset : keeps_grad<A>(a) ? g_saved.get() : nullptr;
      for (int64_t g = 0; g < s.G; ++g) {
        group_affine_tables<scalar_t, A>(a, s, n, g, pivot + g * Cg, scale + g * Cg, shift + g * Cg);
      }
      const AffineTables<acc_t> t{pivot, scale, shift};
      acc_t* sum_gx = a.sum_gx + n * s.C;
      acc_t* sum_g = a.sum_g + n * s.C;
      total.clear();
      for (int64_t row0 = 0; row0 < s.HxW; row0 += block_rows) {
        cl_block_grad_sums<scalar_t, A>(a.dy + offset, a.x + offset, row0, std::min(block_rows, s.HxW - row0), s.C, t,
                                        block_gx, block_g, g_out);
        total.push(block_gx);
      }
      total.result(block_gx);
      std::copy(block_gx, block_gx + s.C, sum_gx);
      std::copy(block_g, block_g + s.C, sum_g);
      if (a.dx == nullptr) continue;
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t ng = n * s.G + g;
        group_input_grad_coefs(sum_gx + g * Cg, sum_g + g * Cg, a.params.weight(n, g * Cg), Cg, a.residual[ng],
                               a.rstd[ng], s.group_size(), g_coef + g * Cg, x_coef + g * Cg, bias_coef + g * Cg);
      }
      const auto row_affine = run_affine(t, 0, PerChannel{});
      const auto row_input_grad = run_input_grad(InputGradTables<acc_t>{g_coef, x_coef, bias_coef}, 0, PerChannel{});
      const bool more = prefetch && n + 1 < end;
      for_each_item(0, s.HxW, a.walk_back, [&](int64_t r, int64_t ahead) {
        // Fetch ahead: the same row of the next sample (x and dy, for its
        // sums), or else what this pass reads of the row walked next.
        RunWrite<scalar_t, 2> w{a.stream, {}};
        if (more) {
          const int64_t next = offset + (s.HxW + r) * s.C;
          w.next[0] = a.x + next;
          w.next[1] = a.dy + next;
        } else if (ahead >= 0) {
          w.next[0] = a.x + offset + ahead * s.C;
          if (g_out != nullptr) {
            prefetch_lines(g_out + ahead * s.C, s.C);
          } else {
            w.next[1] = a.dy + offset + ahead * s.C;
          }
        }
        input_grad_run<scalar_t, A>(a.dy + offset + r * s.C, a.x + offset + r * s.C, a.dx + offset + r * s.C, s.C,
                                    row_affine, row_input_grad, w, g_out ? g_out + r * s.C : nullptr);
      });
    }
    stream_fence();
  });
}

template <typename scalar_t, Activation A>
void backward_two_pass(const TypedBackwardArgs<scalar_t>& a, const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  const int64_t planes = s.N * s.C;
  const int64_t Cg = s.channels_per_group();
  std::vector<acc_t> pivots(planes), scale(planes), shift(planes);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t at = (n * s.G + g) * Cg;
      group_affine_tables<scalar_t, A>(a, s, n, g, pivots.data() + at, scale.data() + at, shift.data() + at);
    }
  }
  const AffineTables<acc_t> t{pivots.data(), scale.data(), shift.data()};

  // Pass 1: per-(n, c) sums, chunks / row blocks in parallel, merged in order;
  // g into dx where it can wait there (grad_in_dx).
  acc_t* const g_dx = grad_in_dx<A>(a);
  const auto g_at = [&](int64_t offset) { return g_dx != nullptr ? g_dx + offset : nullptr; };
  std::fill(a.sum_gx, a.sum_gx + planes, acc_t(0));
  std::fill(a.sum_g, a.sum_g + planes, acc_t(0));
  const auto pb =
      plane_blocks_if<scalar_t>(layout == Layout::ChannelsFirst && backward_walks_plane_blocks<scalar_t>(s.HxW), s.HxW);
  const auto block_tables = [&](int64_t ci) { return AffineTables<acc_t>{t.pivot + ci, t.scale + ci, t.shift + ci}; };
  if (pb) {
    for_each_plane_block<scalar_t>(
        s, *pb, false, true, [&](int64_t ng, int64_t c, int64_t n_planes, int64_t /*ahead*/) {
          const int64_t at = ng * s.group_size() + c * s.HxW, ci = ng * Cg + c;
          plane_block_grad_sums<scalar_t, A>(a.dy + at, a.x + at, n_planes, *pb, block_tables(ci), a.sum_gx + ci,
                                             a.sum_g + ci, g_at(at));
        });
  } else if (s.HxW > 0 && layout == Layout::ChannelsFirst) {
    const int64_t chunks = ceil_div(s.HxW, kChunk);
    chunked_reduce<std::pair<acc_t, acc_t>>(
        planes, chunks, 1, 2 * std::min(kChunk, s.HxW),
        [&](int64_t plane, int64_t k, std::pair<acc_t, acc_t>* out) {
          const int64_t base = plane * s.HxW + k * kChunk;
          *out = simd_sum2<scalar_t>(
              std::min(kChunk, s.HxW - k * kChunk),
              grad_sums_body<scalar_t, A>(a.dy + base, a.x + base, run_affine(t, plane, PerRun{}), g_at(base)));
        },
        [&](int64_t plane, const std::pair<acc_t, acc_t>* parts) {
          for (int64_t k = 0; k < chunks; ++k) {
            a.sum_gx[plane] += parts[k].first;
            a.sum_g[plane] += parts[k].second;
          }
        });
  } else if (s.HxW > 0) {
    const int64_t block_rows = sum_rows_per_block(s.C);
    const int64_t blocks = ceil_div(s.HxW, block_rows);
    pairwise_block_sums<acc_t>(
        s.N, blocks, 2 * s.C, 2 * block_rows * s.C,
        [&](int64_t n, int64_t b, acc_t* out) {
          const int64_t offset = n * s.HxW * s.C, row0 = b * block_rows;
          const AffineTables<acc_t> sample_t{t.pivot + n * s.C, t.scale + n * s.C, t.shift + n * s.C};
          cl_block_grad_sums<scalar_t, A>(a.dy + offset, a.x + offset, row0, std::min(block_rows, s.HxW - row0), s.C,
                                          sample_t, out, out + s.C, g_at(offset));
        },
        [&](int64_t n, const acc_t* sums) {
          std::copy_n(sums, s.C, a.sum_gx + n * s.C);
          std::copy_n(sums + s.C, s.C, a.sum_g + n * s.C);
        });
  }
  if (a.dx == nullptr) return;

  // Pass 2: dx.
  std::vector<acc_t> g_coef(planes), x_coef(planes), bias_coef(planes);
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const int64_t i = ng * Cg;
    group_input_grad_coefs(a.sum_gx + i, a.sum_g + i, a.params.weight(ng / s.G, ng % s.G * Cg), Cg, a.residual[ng],
                           a.rstd[ng], s.group_size(), g_coef.data() + i, x_coef.data() + i, bias_coef.data() + i);
  }
  const InputGradTables<acc_t> gt{g_coef.data(), x_coef.data(), bias_coef.data()};
  // What pass 2 reads besides x: g in dx, or dy.
  const scalar_t* other = g_dx != nullptr ? a.dx : a.dy;
  const auto fetch = [&](int64_t ahead) {
    return RunWrite<scalar_t, 2>{a.stream, {ahead >= 0 ? a.x + ahead : nullptr, ahead >= 0 ? other + ahead : nullptr}};
  };
  if (pb) {
    for_each_plane_block<scalar_t>(
        s, *pb, a.walk_back, false, [&](int64_t ng, int64_t c, int64_t n_planes, int64_t ahead) {
          const int64_t at = ng * s.group_size() + c * s.HxW, ci = ng * Cg + c;
          input_grad_planes<scalar_t, A>(a.dy + at, a.x + at, a.dx + at, n_planes, *pb, block_tables(ci),
                                         {gt.g_coef + ci, gt.x_coef + ci, gt.bias_coef + ci}, fetch(ahead), g_at(at));
        });
    return;
  }
  for_each_run(s, layout, a.walk_back, [&](int64_t base, int64_t len, int64_t ci, auto per_channel, int64_t ahead) {
    input_grad_run<scalar_t, A>(a.dy + base, a.x + base, a.dx + base, len, run_affine(t, ci, per_channel),
                                run_input_grad(gt, ci, per_channel), fetch(ahead), g_at(base));
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
