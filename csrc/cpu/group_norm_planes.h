// CPU GroupNorm kernels, part 3b: channels-first planes of a few vectors,
// walked in blocks. Part of group_norm_kernels_impl.h, which includes the parts
// in order inside one translation unit per CPU capability.
//
// A plane walked on its own (a run: simd_for, simd_sum2) pays a loop set-up,
// a ragged end (a half step, scalar steps), and for the gradient sums the
// merge of four accumulator pairs; on a plane of a few vectors (7x7: 49
// values) that costs about what its values do. Short planes are walked
// instead in blocks of consecutive planes of one group, as one contiguous
// run of vectors: a vector may straddle two planes, its lanes then take the
// coefficients of their own plane (a blend). Every value, a block's last ones
// included (a partial vector, loaded and stored masked), is computed by the same
// vector code, so it comes out the same wherever block and vector boundaries
// fall; the per-plane sums, which depend on where the lanes fall, come from
// the same blocks in every schedule (docs/performance.md has the timings).
// Planes under one vector (tiny: 2x2, 3x3) go in rounds of a vector's worth
// of planes (simd_for_tiny_planes).
#pragma once

namespace gnflex {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Planes of fewer vectors than this are short: past that the per-plane costs
// are small next to the values', and a block's sums of a plane run as one
// chain of adds where simd_sum2 keeps four (16x16 planes were slower walked
// in blocks).
constexpr int64_t kShortPlaneVectors = 16;

// Whether the backward walks channels-first planes of HxW values in blocks:
// all short ones (under kShortPlaneVectors), tiny ones (under one vector:
// see simd_for_tiny_planes) included.
template <typename scalar_t>
bool backward_walks_plane_blocks(int64_t HxW) {
  return HxW >= 1 && HxW < kShortPlaneVectors * VecIO<scalar_t>::Vec::size();
}

// The forward only those of up to half kShortPlaneVectors which end inside
// a step: a plane of whole steps runs as fast on its own, and on longer
// planes the per-plane walk's steps of two vectors (fp16 / bf16) beat the
// block walk's one (bf16 SiLU 12x12 to 15x15).
template <typename scalar_t>
bool forward_walks_plane_blocks(int64_t HxW) {
  using IO = VecIO<scalar_t>;
  return backward_walks_plane_blocks<scalar_t>(HxW) && HxW % IO::kStep != 0 &&
         HxW <= kShortPlaneVectors / 2 * IO::Vec::size();
}

// How a pass cuts a group's short planes of HxW values into blocks, set up
// once per pass: per_block planes a block, about kChunk values in whole
// vectors (so that only a group's last block ends inside one). Planes under
// one vector (tiny) go in rounds of a vector's worth of planes (see
// simd_for_tiny_planes); lane j of a round's vector k is in the round's plane
// lane_plane[k][j].
template <typename scalar_t>
struct PlaneBlocks {
  static constexpr int64_t kLanes = VecIO<scalar_t>::Vec::size();
  int64_t HxW;
  int64_t per_block;
  int32_t lane_plane[kLanes][kLanes];

  explicit PlaneBlocks(int64_t HxW_) : HxW(HxW_) {
    // Blocks are whole rounds, or whole multiples of the planes that fill
    // whole vectors.
    const int64_t unit = tiny() ? kLanes : kLanes / std::gcd(HxW, kLanes);
    per_block = unit * std::max<int64_t>(1, kChunk / (unit * HxW));
    if (!tiny()) return;
    for (int32_t v = 0; v < kLanes * HxW; ++v) lane_plane[v / kLanes][v % kLanes] = static_cast<int32_t>(v / HxW);
  }
  bool tiny() const { return HxW < kLanes; }
  // Whether a pass may walk the planes of consecutive groups as one run
  // (batches of small groups, two-pass blocks): an elementwise pass always,
  // each lane computing with its own plane's coefficients; the gradient
  // sums where every plane keeps the lanes it has in its own group's walk,
  // on which they depend: tiny planes (their sums add a plane's terms in
  // order, lane by lane) or groups of whole vectors.
  bool crosses_groups(int64_t group_size, bool sums) const { return !sums || tiny() || group_size % kLanes == 0; }
  int64_t blocks(int64_t Cg) const { return ceil_div(Cg, per_block); }
  // fn(c, planes) for each block (planes [c, c + planes)) of a group of Cg,
  // last to first where `backward`.
  template <typename Fn>
  void for_each_block(int64_t Cg, bool backward, const Fn& fn) const {
    for_each_item(0, blocks(Cg), backward, [&](int64_t b, int64_t /*ahead*/) {
      const int64_t c = b * per_block;
      fn(c, std::min(per_block, Cg - c));
    });
  }
};

// The PlaneBlocks of a pass that walks blocks (`walks`); none otherwise.
template <typename scalar_t>
std::optional<PlaneBlocks<scalar_t>> plane_blocks_if(bool walks, int64_t HxW) {
  if (!walks) return std::nullopt;
  return PlaneBlocks<scalar_t>(HxW);
}

// Where a vector of a block walk lies: inside plane c (Interior); across the
// end of plane c, its first `split` lanes in c and the others in c + 1
// (Edge; split == lanes where c ends with the vector); or at the block's end,
// only its first `split` lanes in the block, all in c (Last).
struct Interior {};
struct Edge {};
struct Last {};

template <typename Kind>
constexpr bool kIsLast = std::is_same_v<Kind, Last>;

// The walk goes one accumulate-type vector at a time (fp16 / bf16: half a
// VecIO step). Loads and stores of the vector at p; of a Last one only its
// first n values (zeros past them), through ATen's partial loads and stores
// (masked where the ISA has them).
template <typename scalar_t>
struct VectorIO {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t kLanes = Vec::size();
  template <typename Kind>
  static Vec load(const scalar_t* p, Kind, int64_t n) {
    if constexpr (IO::kVecs == 1) {
      return kIsLast<Kind> ? Vec::loadu(p, n) : Vec::loadu(p);
    } else {
      Vec v;
      if constexpr (kIsLast<Kind>) {
        IO::load_half(p, v, n);
      } else {
        IO::load_half(p, v);
      }
      return v;
    }
  }
  template <typename Kind>
  static void store(scalar_t* p, const Vec& v, Kind, int64_t n, bool stream) {
    if constexpr (IO::kVecs == 1) {
      if constexpr (kIsLast<Kind>) return v.store(p, n);
      if (stream) return stream_vector(p, v);
      v.store(p);
    } else {
      IO::store_half(p, v, kIsLast<Kind> ? n : kLanes);
    }
  }
};

// first's lanes [0, count), rest's others.
template <typename V>
inline V first_lanes(const V& rest, const V& first, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm512_mask_mov_ps(rest, static_cast<__mmask16>((1u << count) - 1), first);
  }
#endif
  using T = typename V::value_type;
  return V::blendv(rest, first, V::arange(T(0), T(1)) < V(static_cast<T>(count)));
}

#define GNFLEX_ALWAYS_INLINE __attribute__((always_inline))

// Walks `planes` consecutive planes of HxW values (at least a vector each) as one
// run of vectors: body(i, kind, coefs, c, split) for the vector at value i
// (kind, c, split: see Interior), where coefs[t] holds, lane by lane, the
// entry of tables[t] (per-plane coefficients, from the block's first plane)
// for the lane's plane. The coefficients change only at an Edge, so the
// loop over a plane's interior keeps them in registers.
template <typename scalar_t, size_t N, typename Body>
GNFLEX_ALWAYS_INLINE inline void simd_for_planes(int64_t planes, int64_t HxW,
                                                 const std::array<const acc_type<scalar_t>*, N>& tables,
                                                 const Body& body) {
  using Vec = typename VecIO<scalar_t>::Vec;
  constexpr int64_t L = Vec::size();
  const auto coefs_of = [&](int64_t c) { return array_of<N>([&](int t) { return Vec(tables[t][c]); }); };
  const int64_t n = planes * HxW;
  auto here = coefs_of(0);
  int64_t i = 0, end = HxW;  // plane c is [end - HxW, end)
  for (int64_t c = 0;;) {
    for (; i + L < end; i += L) body(i, Interior{}, here, c, L);
    const int64_t split = end - i;
    if (i + L > n) return body(i, Last{}, here, c, split);
    if (c + 1 == planes) return body(i, Edge{}, here, c, split);
    const auto next = coefs_of(c + 1);
    body(i, Edge{}, array_of<N>([&](int t) { return first_lanes(next[t], here[t], split); }), c, split);
    i += L;
    end += HxW;
    here = next;
    ++c;
  }
}

// Lane j of v[idx[j]] for each j.
template <typename V>
inline V spread_lanes(const V& v, const int32_t* idx) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm512_permutexvar_ps(_mm512_loadu_si512(idx), v);
  } else if constexpr (std::is_same_v<V, at::vec::Vectorized<double>>) {
    return _mm512_permutexvar_pd(_mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx))), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)));
  } else if constexpr (std::is_same_v<V, at::vec::Vectorized<double>>) {
    // Double j is floats 2j, 2j + 1: each 64-bit index k becomes the pair.
    const __m256i twice =
        _mm256_slli_epi64(_mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))), 1);
    const __m256i pairs = _mm256_or_si256(twice, _mm256_slli_epi64(_mm256_add_epi64(twice, _mm256_set1_epi64x(1)), 32));
    return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(v), pairs));
  }
#endif
  using T = typename V::value_type;
  T in[V::size()], out[V::size()];
  v.store(in);
  for (int64_t j = 0; j < V::size(); ++j) out[j] = in[idx[j]];
  return V::loadu(out);
}

// The walk of planes shorter than a vector (tiny), in rounds of L planes
// (a vector's worth), which fill HxW vectors: lane j of the round's vector k
// holds its value k * L + j, of its plane (k * L + j) / HxW.
// body(i, kind, coefs, c, valid) as simd_for_planes's (Interior or, for a
// group's last round, Last with `valid` lanes), c the round's first plane;
// round_done(c, n) after each round of n planes. The coefficients of a
// round's planes load as one vector, spread to the lanes by one permutation
// per vector. Each lane computes with its own plane's coefficients only, and
// tiny_plane_grad_sums adds a plane's terms in order, so a plane's results
// are the same wherever its round starts.
template <typename scalar_t, size_t N, typename Body, typename RoundDone>
GNFLEX_ALWAYS_INLINE inline void simd_for_tiny_planes(int64_t planes, const PlaneBlocks<scalar_t>& pb,
                                                      const std::array<const acc_type<scalar_t>*, N>& tables,
                                                      const Body& body, const RoundDone& round_done) {
  using Vec = typename VecIO<scalar_t>::Vec;
  constexpr int64_t L = Vec::size();
  const int64_t HxW = pb.HxW;
  for (int64_t c = 0; c < planes; c += L) {
    const int64_t n = std::min(L, planes - c), values = n * HxW;
    const auto round = array_of<N>([&](int t) { return Vec::loadu(tables[t] + c, n); });
    for (int64_t k = 0; k * L < values; ++k) {
      const auto coefs = array_of<N>([&](int t) { return spread_lanes(round[t], pb.lane_plane[k]); });
      const int64_t i = c * HxW + k * L;
      if (values - k * L >= L) {
        body(i, Interior{}, coefs, c, L);
      } else {
        body(i, Last{}, coefs, c, values - k * L);
      }
    }
    round_done(c, n);
  }
}

// An elementwise pass over a block of short planes, tiny or not.
template <typename scalar_t, size_t N, typename Body>
GNFLEX_ALWAYS_INLINE inline void walk_planes(int64_t planes, const PlaneBlocks<scalar_t>& pb,
                                             const std::array<const acc_type<scalar_t>*, N>& tables, const Body& body) {
  if (pb.tiny()) return simd_for_tiny_planes<scalar_t, N>(planes, pb, tables, body, [](int64_t, int64_t) {});
  simd_for_planes<scalar_t, N>(planes, pb.HxW, tables, body);
}

template <typename V, size_t N>
inline RunAffine<Broadcast<V>> lane_affine(const std::array<V, N>& coefs) {
  return {{coefs[0]}, {coefs[1]}, {coefs[2]}};
}

// ---- passes over a block -------------------------------------------------------
// The forward's output (as forward_run).
template <typename scalar_t, Activation A>
void forward_planes(const scalar_t* x, scalar_t* y, int64_t planes, const PlaneBlocks<scalar_t>& pb,
                    const AffineTables<acc_type<scalar_t>>& t, const RunWrite<scalar_t, 1>& write) {
  using IO = VectorIO<scalar_t>;
  const RunWrite<scalar_t, 1> w = write;  // a local copy: vector stores may alias `write`
  walk_planes<scalar_t, 3>(
      planes, pb, {t.pivot, t.scale, t.shift},
      [&](int64_t i, auto kind, const auto& coefs, int64_t /*c*/, int64_t split) GNFLEX_ALWAYS_INLINE {
        prefetch_next(w, i);
        const auto a = lane_affine(coefs);
        const auto v = math::activate<A>(pre_activation(centered(IO::load(x + i, kind, split), a, 0), a, 0));
        IO::store(y + i, v, kind, split, w.stream);
      });
}

// plane_block_grad_sums of tiny planes: a round's terms go to a buffer, each
// plane's sums add them in order.
template <typename scalar_t, Activation A>
void tiny_plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t planes, const PlaneBlocks<scalar_t>& pb,
                          const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* sum_gx,
                          acc_type<scalar_t>* sum_g, acc_type<scalar_t>* g_out) {
  using acc_t = acc_type<scalar_t>;
  using IO = VectorIO<scalar_t>;
  const int64_t HxW = pb.HxW;
  acc_t round_gx[IO::kLanes * IO::kLanes], round_g[IO::kLanes * IO::kLanes];
  simd_for_tiny_planes<scalar_t, 3>(
      planes, pb, {t.pivot, t.scale, t.shift},
      [&](int64_t i, auto kind, const auto& coefs, int64_t c, int64_t valid) GNFLEX_ALWAYS_INLINE {
        const auto [d, g] =
            centered_and_grad<A>(IO::load(x + i, kind, valid), IO::load(dy + i, kind, valid), lane_affine(coefs), 0);
        if (A != Activation::None && g_out != nullptr) g.store(g_out + i, valid);
        (g * d).store(round_gx + i - c * HxW);
        g.store(round_g + i - c * HxW);
      },
      [&](int64_t c, int64_t n) {
        for (int64_t p = 0; p < n; ++p) {
          acc_t gx = 0, gs = 0;
          for (int64_t h = p * HxW; h < (p + 1) * HxW; ++h) {
            gx += round_gx[h];
            gs += round_g[h];
          }
          sum_gx[c + p] = gx;
          sum_g[c + p] = gs;
        }
      });
}

// Per-plane sums of g * (x - pivot) and g (as plane_grad_sums) into sum_gx,
// sum_g; g_out: as grad_sums_body's.
template <typename scalar_t, Activation A>
void plane_block_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t planes, const PlaneBlocks<scalar_t>& pb,
                           const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* sum_gx,
                           acc_type<scalar_t>* sum_g, acc_type<scalar_t>* g_out) {
  using IO = VectorIO<scalar_t>;
  using Vec = typename IO::Vec;
  if (pb.tiny()) return tiny_plane_grad_sums<scalar_t, A>(dy, x, planes, pb, t, sum_gx, sum_g, g_out);
  const Vec zero(0);
  Vec part_gx = zero, part_g = zero;  // of the plane in progress
  simd_for_planes<scalar_t, 3>(
      planes, pb.HxW, {t.pivot, t.scale, t.shift},
      [&](int64_t i, auto kind, const auto& coefs, int64_t c, int64_t split) GNFLEX_ALWAYS_INLINE {
        using Kind = decltype(kind);
        const auto [d, g] =
            centered_and_grad<A>(IO::load(x + i, kind, split), IO::load(dy + i, kind, split), lane_affine(coefs), 0);
        if (A != Activation::None && g_out != nullptr) g.store(g_out + i, kIsLast<Kind> ? split : IO::kLanes);
        const Vec gd = g * d;
        if constexpr (std::is_same_v<Kind, Interior>) {
          part_gx = part_gx + gd;
          part_g = part_g + g;
        } else {
          sum_gx[c] = horizontal_sum(part_gx + first_lanes(zero, gd, split));
          sum_g[c] = horizontal_sum(part_g + first_lanes(zero, g, split));
          part_gx = first_lanes(gd, zero, split);
          part_g = first_lanes(g, zero, split);
        }
      });
}

// plane_block_grad_sums of one channels-first group of Cg short planes, block
// by block as the two-pass schedule cuts them (for sums that may not cross
// groups); tables and sums at the group's first channel, g_out (if any) at
// its first value.
template <typename scalar_t, Activation A>
void group_plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t Cg, const PlaneBlocks<scalar_t>& pb,
                           const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* sum_gx,
                           acc_type<scalar_t>* sum_g, acc_type<scalar_t>* g_out) {
  const int64_t HxW = pb.HxW;
  pb.for_each_block(Cg, false, [&](int64_t c, int64_t planes) {
    plane_block_grad_sums<scalar_t, A>(dy + c * HxW, x + c * HxW, planes, pb, {t.pivot + c, t.scale + c, t.shift + c},
                                       sum_gx + c, sum_g + c, g_out ? g_out + c * HxW : nullptr);
  });
}

// dx (as input_grad_run), from g_saved where the sums kept g.
template <typename scalar_t, Activation A>
void input_grad_planes(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t planes,
                       const PlaneBlocks<scalar_t>& pb, const AffineTables<acc_type<scalar_t>>& t,
                       const InputGradTables<acc_type<scalar_t>>& gt, const RunWrite<scalar_t, 2>& write,
                       const acc_type<scalar_t>* g_saved) {
  using IO = VectorIO<scalar_t>;
  using Vec = typename IO::Vec;
  const RunWrite<scalar_t, 2> w = write;  // as in forward_planes
  const auto run = [&](const auto& grad) GNFLEX_ALWAYS_INLINE {
    walk_planes<scalar_t, 6>(planes, pb, {t.pivot, t.scale, t.shift, gt.g_coef, gt.x_coef, gt.bias_coef},
                             [&](int64_t i, auto kind, const auto& coefs, int64_t /*c*/, int64_t split)
                                 GNFLEX_ALWAYS_INLINE {
                                   prefetch_next(w, i);
                                   const Vec xv = IO::load(x + i, kind, split);
                                   const auto a = lane_affine(coefs);
                                   const Vec g = grad(i, kind, split, xv, a);
                                   const Vec v = input_grad_value(coefs[3], g, coefs[4], centered(xv, a, 0), coefs[5]);
                                   IO::store(dx + i, v, kind, split, w.stream);
                                 });
  };
  if (A != Activation::None && g_saved != nullptr) {
    run([&](int64_t i, auto kind, int64_t n, const Vec& /*xv*/, const auto& /*a*/) GNFLEX_ALWAYS_INLINE {
      return kIsLast<decltype(kind)> ? Vec::loadu(g_saved + i, n) : Vec::loadu(g_saved + i);
    });
  } else {
    run([&](int64_t i, auto kind, int64_t n, const Vec& xv, const auto& a)
            GNFLEX_ALWAYS_INLINE { return centered_and_grad<A>(xv, IO::load(dy + i, kind, n), a, 0).second; });
  }
}

// Two-pass passes over plane blocks: fn(ng, c, planes, ahead) for every block
// (planes [c, c + planes) of group ng), in parallel; each thread walks its
// blocks backward where `backward` (walks_back). ahead: in a backward walk,
// the value offset of the block walked next (to fetch); -1 otherwise.
// Where the pass may cross groups (sums: whether it is the gradient sums; see
// PlaneBlocks::crosses_groups), blocks run across group boundaries, as if
// all N * C planes were group 0.
template <typename scalar_t, typename Fn>
void for_each_plane_block(const GroupNormShape& s, const PlaneBlocks<scalar_t>& pb, bool backward, bool sums,
                          const Fn& fn) {
  const bool across = pb.crosses_groups(s.group_size(), sums);
  const int64_t groups = across ? 1 : s.N * s.G;
  const int64_t Cg = across ? s.N * s.C : s.channels_per_group();
  const int64_t per_block = pb.per_block;
  const int64_t blocks = pb.blocks(Cg);
  const auto offset = [&](int64_t item) { return item / blocks * Cg * s.HxW + item % blocks * per_block * s.HxW; };
  at::parallel_for(0, groups * blocks, grain_of(per_block * s.HxW), [&](int64_t begin, int64_t end) {
    for_each_item(begin, end, backward, [&](int64_t item, int64_t ahead) {
      const int64_t c = item % blocks * per_block;
      fn(item / blocks, c, std::min(per_block, Cg - c), ahead >= 0 ? offset(ahead) : int64_t(-1));
    });
    stream_fence();
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gnflex
