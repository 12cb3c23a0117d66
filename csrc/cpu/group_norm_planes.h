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
// included (a partial vector through a buffer), is computed by the same
// vector code, so it comes out the same wherever block and vector boundaries
// fall; the per-plane sums, which depend on where the lanes fall, come from
// the same blocks in every schedule (docs/performance.md has the timings).
// Planes under one vector (tiny: 2x2, 3x3) go in rounds of planes that fill
// whole vectors (simd_for_tiny_planes).
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

// Whether channels-first planes of HxW values are walked in blocks: under
// kShortPlaneVectors. Planes under one vector (tiny: see
// simd_for_tiny_planes) only where a value costs more than a few scalar
// operations: with an activation (an exp or erf each) or converting fp16 /
// bf16; plain fp32 / fp64 values cost less one plane at a time, scalar, than
// the lane permutations of the walk.
template <typename scalar_t, Activation A>
bool walks_short_planes(int64_t HxW) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t lanes = IO::Vec::size();
  if (HxW < 1 || HxW >= kShortPlaneVectors * lanes) return false;
  return HxW >= lanes || A != Activation::None || IO::kVecs == 2;
}

// The backward walks them all in blocks. The forward only those of up to
// half kShortPlaneVectors which end inside a step: a plane of whole steps
// runs as fast on its own, and on longer planes the per-plane walk's steps
// of two vectors (fp16 / bf16) beat the block walk's one (bf16 SiLU 12x12 to
// 15x15).
template <typename scalar_t, Activation A>
bool forward_walks_plane_blocks(int64_t HxW) {
  using IO = VecIO<scalar_t>;
  return walks_short_planes<scalar_t, A>(HxW) && HxW % IO::kStep != 0 &&
         HxW <= kShortPlaneVectors / 2 * IO::Vec::size();
}
template <typename scalar_t, Activation A>
bool backward_walks_plane_blocks(int64_t HxW) {
  return walks_short_planes<scalar_t, A>(HxW);
}

// Planes per block: about kChunk values, whole vectors (so that only a
// group's last block ends inside one).
template <typename scalar_t>
int64_t planes_per_block(int64_t HxW) {
  constexpr int64_t lanes = VecIO<scalar_t>::Vec::size();
  const int64_t unit = lanes / std::gcd(HxW, lanes);
  return unit * std::max<int64_t>(1, kChunk / (unit * HxW));
}

// The walk goes one accumulate-type vector at a time (fp16 / bf16: half a
// VecIO step). Loads and stores of one vector of values, or of its first n
// through a buffer (zeros past them), for a block's last values.
template <typename scalar_t>
struct VectorIO {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t kLanes = Vec::size();
  static Vec load(const scalar_t* p) {
    if constexpr (IO::kVecs == 1) {
      return Vec::loadu(p);
    } else {
      Vec v(0);
      IO::load_half(p, v);
      return v;
    }
  }
  static Vec load(const scalar_t* p, int64_t n) {
    scalar_t buf[kLanes];
    std::fill(std::copy(p, p + n, buf), buf + kLanes, scalar_t(0));
    return load(buf);
  }
  static void store(scalar_t* p, const Vec& v, bool stream) {
    if constexpr (IO::kVecs == 1) {
      if (stream) return stream_vector(p, v);
      v.store(p);
    } else {
      IO::store_half(p, v);
    }
  }
  static void store(scalar_t* p, const Vec& v, int64_t n) {
    scalar_t buf[kLanes];
    store(buf, v, false);
    std::copy(buf, buf + n, p);
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

// Where a vector of a block walk lies: inside plane c (Interior); across the
// end of plane c, its first `split` lanes in c and the others in c + 1
// (Edge; split == lanes where c ends with the vector); or at the block's end,
// only its first `split` lanes in the block, all in c (Last).
struct Interior {};
struct Edge {};
struct Last {};

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
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)));
  }
#endif
  using T = typename V::value_type;
  T in[V::size()], out[V::size()];
  v.store(in);
  for (int64_t j = 0; j < V::size(); ++j) out[j] = in[idx[j]];
  return V::loadu(out);
}

// The walk of planes shorter than a vector (tiny), in rounds of q = L /
// gcd(HxW, L) planes, which fill m = HxW / gcd(HxW, L) vectors exactly: lane
// j of the round's vector k holds its value k * L + j, of its plane
// (k * L + j) / HxW. body(i, kind, coefs, c, valid) as simd_for_planes's
// (Interior or, for a group's last round, Last with `valid` lanes), c the
// round's first plane; round_done(c, n) after each round of n planes. The
// coefficients of a round's planes load as one vector, spread to the lanes
// by one permutation per vector.
template <typename scalar_t, size_t N, typename Body, typename RoundDone>
GNFLEX_ALWAYS_INLINE inline void simd_for_tiny_planes(int64_t planes, int64_t HxW,
                                                      const std::array<const acc_type<scalar_t>*, N>& tables,
                                                      const Body& body, const RoundDone& round_done) {
  using Vec = typename VecIO<scalar_t>::Vec;
  constexpr int64_t L = Vec::size();
  const int64_t q = L / std::gcd(HxW, L);
  int32_t lane_plane[L][L];
  for (int32_t v = 0, plane = 0, at = 0; v < q * HxW; ++v) {
    lane_plane[v / L][v % L] = plane;
    if (++at == HxW) {
      at = 0;
      ++plane;
    }
  }
  for (int64_t c = 0; c < planes; c += q) {
    const int64_t n = std::min(q, planes - c), values = n * HxW;
    const auto round = array_of<N>([&](int t) { return Vec::loadu(tables[t] + c, n); });
    for (int64_t k = 0; k * L < values; ++k) {
      const auto coefs = array_of<N>([&](int t) { return spread_lanes(round[t], lane_plane[k]); });
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
GNFLEX_ALWAYS_INLINE inline void walk_planes(int64_t planes, int64_t HxW,
                                             const std::array<const acc_type<scalar_t>*, N>& tables, const Body& body) {
  if (HxW < VecIO<scalar_t>::Vec::size()) {
    return simd_for_tiny_planes<scalar_t, N>(planes, HxW, tables, body, [](int64_t, int64_t) {});
  }
  simd_for_planes<scalar_t, N>(planes, HxW, tables, body);
}

template <typename V, size_t N>
inline RunAffine<Broadcast<V>> lane_affine(const std::array<V, N>& coefs) {
  return {{coefs[0]}, {coefs[1]}, {coefs[2]}};
}

template <typename Kind>
constexpr bool kIsLast = std::is_same_v<Kind, Last>;

// ---- passes over a block -------------------------------------------------------
// The forward's output (as forward_run).
template <typename scalar_t, Activation A>
void forward_planes(const scalar_t* x, scalar_t* y, int64_t planes, int64_t HxW,
                    const AffineTables<acc_type<scalar_t>>& t, const RunWrite<scalar_t, 1>& write) {
  using IO = VectorIO<scalar_t>;
  const RunWrite<scalar_t, 1> w = write;  // a local copy: vector stores may alias `write`
  walk_planes<scalar_t, 3>(
      planes, HxW, {t.pivot, t.scale, t.shift},
      [&](int64_t i, auto kind, const auto& coefs, int64_t /*c*/, int64_t split) GNFLEX_ALWAYS_INLINE {
        constexpr bool last = kIsLast<decltype(kind)>;
        prefetch_next(w, i);
        const auto a = lane_affine(coefs);
        const auto v =
            math::activate<A>(pre_activation(centered(last ? IO::load(x + i, split) : IO::load(x + i), a, 0), a, 0));
        if constexpr (last) {
          IO::store(y + i, v, split);
        } else {
          IO::store(y + i, v, w.stream);
        }
      });
}

// plane_block_grad_sums of tiny planes: a round's terms go to a buffer, each
// plane's sums add them in order.
template <typename scalar_t, Activation A>
void tiny_plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t planes, int64_t HxW,
                          const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* sum_gx,
                          acc_type<scalar_t>* sum_g, acc_type<scalar_t>* g_out) {
  using acc_t = acc_type<scalar_t>;
  using IO = VectorIO<scalar_t>;
  using Vec = typename IO::Vec;
  acc_t round_gx[IO::kLanes * IO::kLanes], round_g[IO::kLanes * IO::kLanes];
  simd_for_tiny_planes<scalar_t, 3>(
      planes, HxW, {t.pivot, t.scale, t.shift},
      [&](int64_t i, auto kind, const auto& coefs, int64_t c, int64_t valid) GNFLEX_ALWAYS_INLINE {
        constexpr bool last = kIsLast<decltype(kind)>;
        const Vec xv = last ? IO::load(x + i, valid) : IO::load(x + i);
        const Vec dv = last ? IO::load(dy + i, valid) : IO::load(dy + i);
        const auto [d, g] = centered_and_grad<A>(xv, dv, lane_affine(coefs), 0);
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
void plane_block_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t planes, int64_t HxW,
                           const AffineTables<acc_type<scalar_t>>& t, acc_type<scalar_t>* sum_gx,
                           acc_type<scalar_t>* sum_g, acc_type<scalar_t>* g_out) {
  using IO = VectorIO<scalar_t>;
  using Vec = typename IO::Vec;
  if (HxW < IO::kLanes) return tiny_plane_grad_sums<scalar_t, A>(dy, x, planes, HxW, t, sum_gx, sum_g, g_out);
  const Vec zero(0);
  Vec part_gx = zero, part_g = zero;  // of the plane in progress
  simd_for_planes<scalar_t, 3>(planes, HxW, {t.pivot, t.scale, t.shift},
                               [&](int64_t i, auto kind, const auto& coefs, int64_t c, int64_t split)
                                   GNFLEX_ALWAYS_INLINE {
                                     using Kind = decltype(kind);
                                     constexpr bool last = kIsLast<Kind>;
                                     const Vec xv = last ? IO::load(x + i, split) : IO::load(x + i);
                                     const Vec dv = last ? IO::load(dy + i, split) : IO::load(dy + i);
                                     const auto [d, g] = centered_and_grad<A>(xv, dv, lane_affine(coefs), 0);
                                     if (A != Activation::None && g_out != nullptr)
                                       g.store(g_out + i, last ? split : IO::kLanes);
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

// dx (as input_grad_run), from g_saved where the sums kept g.
template <typename scalar_t, Activation A>
void input_grad_planes(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t planes, int64_t HxW,
                       const AffineTables<acc_type<scalar_t>>& t, const InputGradTables<acc_type<scalar_t>>& gt,
                       const RunWrite<scalar_t, 2>& write, const acc_type<scalar_t>* g_saved) {
  using IO = VectorIO<scalar_t>;
  using Vec = typename IO::Vec;
  const RunWrite<scalar_t, 2> w = write;  // as in forward_planes
  const auto run = [&](const auto& grad) GNFLEX_ALWAYS_INLINE {
    walk_planes<scalar_t, 6>(planes, HxW, {t.pivot, t.scale, t.shift, gt.g_coef, gt.x_coef, gt.bias_coef},
                             [&](int64_t i, auto kind, const auto& coefs, int64_t /*c*/, int64_t split)
                                 GNFLEX_ALWAYS_INLINE {
                                   constexpr bool last = kIsLast<decltype(kind)>;
                                   prefetch_next(w, i);
                                   const Vec xv = last ? IO::load(x + i, split) : IO::load(x + i);
                                   const auto a = lane_affine(coefs);
                                   const Vec g = grad(i, last ? split : IO::kLanes, xv, a);
                                   const Vec v = coefs[3] * g + coefs[4] * centered(xv, a, 0) + coefs[5];
                                   if constexpr (last) {
                                     IO::store(dx + i, v, split);
                                   } else {
                                     IO::store(dx + i, v, w.stream);
                                   }
                                 });
  };
  if (A != Activation::None && g_saved != nullptr) {
    run([&](int64_t i, int64_t n, const Vec& /*xv*/, const auto& /*a*/)
            GNFLEX_ALWAYS_INLINE { return Vec::loadu(g_saved + i, n); });
  } else {
    run([&](int64_t i, int64_t n, const Vec& xv, const auto& a) GNFLEX_ALWAYS_INLINE {
      const Vec dv = n < IO::kLanes ? IO::load(dy + i, n) : IO::load(dy + i);
      return centered_and_grad<A>(xv, dv, a, 0).second;
    });
  }
}

// Two-pass passes over plane blocks: fn(ng, c, planes, ahead) for every block
// (planes [c, c + planes) of group ng), in parallel; each thread walks its
// blocks backward where `backward` (walks_back). ahead: in a backward walk,
// the value offset of the block walked next (to fetch); -1 otherwise.
template <typename scalar_t, typename Fn>
void for_each_plane_block(const GroupNormShape& s, bool backward, const Fn& fn) {
  const int64_t Cg = s.channels_per_group();
  const int64_t per_block = planes_per_block<scalar_t>(s.HxW);
  const int64_t blocks = ceil_div(Cg, per_block);
  const auto offset = [&](int64_t item) { return item / blocks * s.group_size() + item % blocks * per_block * s.HxW; };
  at::parallel_for(0, s.N * s.G * blocks, grain_of(per_block * s.HxW), [&](int64_t begin, int64_t end) {
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
