// CPU GroupNorm kernels, part 4: the forward schedules (fused per group /
// per sample, two-pass). Part of group_norm_kernels_impl.h, which includes the parts
// in order inside one translation unit per CPU capability.
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// ---- forward -------------------------------------------------------------------
template <typename scalar_t>
struct TypedForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  AffineParams<acc_t> params;
  acc_t eps;
  acc_t* mean;
  acc_t* rstd;
  bool stream;     // non-temporal stores for y
  bool walk_back;  // the output pass walks its items last to first (walks_back)
};

// Channels-first, one group per work item, set up in batches
// (groups_per_batch). prefetch: fetch the next group while writing this one
// (see prefetch_fits).
template <typename scalar_t, Activation A>
void forward_fused_groups(const TypedForwardArgs<scalar_t>& a, const GroupNormShape& s, bool prefetch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const int64_t D = s.group_size();
  const int64_t batch = groups_per_batch(D);
  const auto pb = plane_blocks_if<scalar_t>(forward_walks_plane_blocks<scalar_t>(s.HxW), s.HxW);
  at::parallel_for(0, s.N * s.G, grain_of(D), [&](int64_t begin, int64_t end) {
    Scratch<acc_t, 3> table({batch * Cg, batch * Cg, batch * Cg});
    std::array<CenteredStats<acc_t>, kMaxBatch> stats;
    for (int64_t first = begin; first < end; first += batch) {
      const int64_t last = std::min(end, first + batch);
      for (int64_t ng = first; ng < last; ++ng) stats[ng - first] = span_stats(a.x + ng * D, D);
      for (int64_t ng = first; ng < last; ++ng) {
        const int64_t c0 = ng % s.G * Cg, at = (ng - first) * Cg;
        group_forward_coefs(stats[ng - first], a.eps, a.params.weight(ng / s.G, c0), a.params.bias(ng / s.G, c0), Cg,
                            a.mean + ng, a.rstd + ng, table.arrays[0] + at, table.arrays[1] + at, table.arrays[2] + at);
      }
      if (pb && !a.walk_back) {
        // The batch's planes in one walk (PlaneBlocks::crosses_groups).
        const RunWrite<scalar_t, 1> w{a.stream, {prefetch && last < end ? a.x + last * D : nullptr}};
        forward_planes<scalar_t, A>(a.x + first * D, a.y + first * D, (last - first) * Cg, *pb,
                                    {table.arrays[0], table.arrays[1], table.arrays[2]}, w);
        continue;
      }
      for_each_item(first, last, a.walk_back, [&](int64_t ng, int64_t /*ahead*/) {
        const int64_t at = (ng - first) * Cg;
        const AffineTables<acc_t> t{table.arrays[0] + at, table.arrays[1] + at, table.arrays[2] + at};
        const scalar_t* gx = a.x + ng * D;
        const bool more = prefetch && ng + 1 < end;
        if (pb) {
          return pb->for_each_block(Cg, a.walk_back, [&](int64_t c, int64_t planes) {
            const RunWrite<scalar_t, 1> w{a.stream, {more ? gx + D + c * s.HxW : nullptr}};
            forward_planes<scalar_t, A>(gx + c * s.HxW, a.y + ng * D + c * s.HxW, planes, *pb,
                                        {t.pivot + c, t.scale + c, t.shift + c}, w);
          });
        }
        for_each_item(0, Cg, a.walk_back, [&](int64_t c, int64_t /*ahead*/) {
          const RunWrite<scalar_t, 1> w{a.stream, {more ? gx + D + c * s.HxW : nullptr}};
          forward_run<scalar_t, A>(gx + c * s.HxW, a.y + ng * D + c * s.HxW, s.HxW, run_affine(t, c, PerRun{}), w);
        });
      });
    }
    stream_fence();
  });
}

// Channels-last, one sample per work item. prefetch: fetch the next sample
// while writing this one (see prefetch_fits).
template <typename scalar_t, Activation A>
void forward_fused_samples(const TypedForwardArgs<scalar_t>& a, const GroupNormShape& s, bool prefetch) {
  using acc_t = acc_type<scalar_t>;
  using Stats = CenteredStats<acc_t>;
  const int64_t Cg = s.channels_per_group();
  at::parallel_for(0, s.N, grain_of(s.HxW * s.C), [&](int64_t begin, int64_t end) {
    Scratch<acc_t, 3> table({s.C, s.C, s.C});
    auto [pivot, scale, shift] = table.arrays;
    SampleStatsScratch<acc_t> scratch(s.C);
    std::vector<Stats> stats(s.G);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xs = a.x + n * s.HxW * s.C;
      sample_stats(xs, s, scratch, stats.data());
      for (int64_t g = 0; g < s.G; ++g) {
        group_forward_coefs(stats[g], a.eps, a.params.weight(n, g * Cg), a.params.bias(n, g * Cg), Cg,
                            a.mean + n * s.G + g, a.rstd + n * s.G + g, pivot + g * Cg, scale + g * Cg, shift + g * Cg);
      }
      const RunWrite<scalar_t, 1> w{a.stream, {prefetch && n + 1 < end ? xs + s.HxW * s.C : nullptr}};
      cl_forward_rows<scalar_t, A>(xs, a.y + n * s.HxW * s.C, s.HxW, s.C, {pivot, scale, shift}, w, a.walk_back);
    }
    stream_fence();
  });
}

template <typename scalar_t, Activation A>
void forward_two_pass(const TypedForwardArgs<scalar_t>& a, const GroupNormShape& s, Layout layout) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Cg = s.channels_per_group();
  const auto stats = group_stats(a.x, s, layout);
  std::vector<acc_t> pivots(s.N * s.C), scale(s.N * s.C), shift(s.N * s.C);
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const int64_t c0 = ng % s.G * Cg;
    group_forward_coefs(stats[ng], a.eps, a.params.weight(ng / s.G, c0), a.params.bias(ng / s.G, c0), Cg, a.mean + ng,
                        a.rstd + ng, pivots.data() + ng * Cg, scale.data() + ng * Cg, shift.data() + ng * Cg);
  }
  const AffineTables<acc_t> t{pivots.data(), scale.data(), shift.data()};
  if (layout == Layout::ChannelsFirst && forward_walks_plane_blocks<scalar_t>(s.HxW)) {
    const PlaneBlocks<scalar_t> pb(s.HxW);
    for_each_plane_block<scalar_t>(
        s, pb, a.walk_back, false, [&](int64_t ng, int64_t c, int64_t planes, int64_t ahead) {
          const int64_t at = ng * s.group_size() + c * s.HxW, ci = ng * Cg + c;
          const RunWrite<scalar_t, 1> w{a.stream, {ahead >= 0 ? a.x + ahead : nullptr}};
          forward_planes<scalar_t, A>(a.x + at, a.y + at, planes, pb, {t.pivot + ci, t.scale + ci, t.shift + ci}, w);
        });
    return;
  }
  if (layout == Layout::ChannelsFirst) {
    for_each_run(s, layout, a.walk_back, [&](int64_t base, int64_t len, int64_t ci, auto per_channel, int64_t ahead) {
      const RunWrite<scalar_t, 1> w{a.stream, {ahead >= 0 ? a.x + ahead : nullptr}};
      forward_run<scalar_t, A>(a.x + base, a.y + base, len, run_affine(t, ci, per_channel), w);
    });
    return;
  }
  const RunWrite<scalar_t, 1> w{a.stream, {}};
  for_each_row_range(s, a.walk_back, [&](int64_t n, int64_t row0, int64_t rows) {
    const int64_t base = (n * s.HxW + row0) * s.C;
    cl_forward_rows<scalar_t, A>(a.x + base, a.y + base, rows, s.C,
                                 {t.pivot + n * s.C, t.scale + n * s.C, t.shift + n * s.C}, w, a.walk_back);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
