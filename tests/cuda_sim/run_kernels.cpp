// Runs gnflex's CUDA kernels on the CPU: the launch sequence of the ops
// (csrc/cuda/group_norm_launch.cuh, unchanged) through cuda_host_sim.h.
//   run_kernels             a case matrix against a long-double reference:
//                           one line per case, "N passed, N failed", exit
//                           status non-zero on a failure;
//     --dtypes float32,float16   only these dtypes (of float32, float64,
//                                float16, bfloat16; default: all four)
//     --no-numerics              only the shape matrix, not the numerics cases
//                                (spikes, large means: the same indexing)
//   run_kernels --traffic   reads cases "label N C HxW G dtype layout" from
//                           stdin (gnflex/bench/cases.py prints them) and
//                           prints the global-memory bytes, launches and
//                           largest grid of each forward and backward;
//   run_kernels --grids     the same input at full size (cases.py --full):
//                           the blocks each launch would use (runs nothing).
// Built and run by .ci/cuda-sim (forward and random thread order, and under
// ASan + UBSan).
#include "cuda_host_sim.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <vector>

// What the kernels report (gload / gstore, GNFLEX_LAUNCH) for --traffic:
// bytes in total and per launch (a launch's bytes are counted until the next).
// Counted only in --traffic mode, which runs one block at a time (the counters
// are plain integers).
inline bool g_count_traffic = false;
inline int64_t g_traffic_bytes = 0, g_launches = 0, g_max_blocks = 0;
inline std::vector<int64_t> g_launch_bytes;
inline void gnflex_sim_count_traffic(size_t bytes) {
  if (!g_count_traffic) return;
  g_traffic_bytes += static_cast<int64_t>(bytes);
  if (!g_launch_bytes.empty()) g_launch_bytes.back() += static_cast<int64_t>(bytes);
}
inline void gnflex_sim_count_launch(unsigned blocks) {
  ++g_launches;
  g_max_blocks = std::max<int64_t>(g_max_blocks, blocks);
  g_launch_bytes.push_back(0);
}

#define GNFLEX_CUDA_SIM 1
#include "cuda/group_norm_launch.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using gnflex::Activation;
using gnflex::GroupNormShape;
using gnflex::Layout;

namespace {

// ---- reference, in long double: float64 data with |mean| / std ~ 1e6 needs
// more than float64 to check float64 results -----------------------------------
using real = long double;

real act_ref(Activation a, real z) {
  switch (a) {
    case Activation::ReLU:
      return z > 0 ? z : 0;
    case Activation::SiLU:
      return z / (1 + std::exp(-z));
    case Activation::GELU:
      return 0.5L * z * (1 + std::erf(z / std::sqrt(2.0L)));
    default:
      return z;
  }
}

real act_grad_ref(Activation a, real z) {
  switch (a) {
    case Activation::ReLU:
      return z > 0 ? 1 : 0;
    case Activation::SiLU: {
      const real sg = 1 / (1 + std::exp(-z));
      return sg * (1 + z * (1 - sg));
    }
    case Activation::GELU:
      return 0.5L * (1 + std::erf(z / std::sqrt(2.0L))) +
             z * std::exp(-0.5L * z * z) / std::sqrt(2 * 3.14159265358979323846L);
    default:
      return 1;
  }
}

// Worst |actual - ref| / tolerance of a quantity.
struct Err {
  double worst = 0;
  void add(real a, real r, double tol) {
    const double e = static_cast<double>(std::abs(a - r) / tol);
    if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
  }
};

template <typename T>
const char* type_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, c10::Half>::value) return "float16";
  return "bfloat16";
}

// Tolerances tied to the reference's own magnitudes: a value the kernels
// compute in the accumulate type from terms whose magnitudes add up to M is
// off by about u * M times a small factor (kUnits units), plus one ulp of the
// type it is stored in (2 u |value|). The reference computes M beside each
// value, so every check sits a few times above what a correct kernel does on
// that case's data, and far below what a wrong one does.
template <typename T>
double unit_roundoff() {
  if (std::is_same<T, double>::value) return 0x1p-53;
  if (std::is_same<T, float>::value) return 0x1p-24;
  if (std::is_same<T, c10::Half>::value) return 0x1p-11;
  return 0x1p-8;  // bfloat16
}
// Smallest normal value of T: below it, an ulp is this size times 2u.
template <typename T>
double min_normal() {
  return std::is_same<T, c10::Half>::value ? 0x1p-14 : std::is_same<T, double>::value ? 0x1p-1022 : 0x1p-126;
}
constexpr double kUnits = 64;

// Tolerance of a value v stored in T and computed from terms of magnitude m.
template <typename T>
real stored_tol(real v, real m, double u_acc) {
  const double u = unit_roundoff<T>();
  return real(2 * u) * std::max<real>(std::abs(v), real(min_normal<T>())) + real(kUnits * u_acc) * m;
}

// n elements at a 16-byte aligned address plus `offset` elements
// (misaligned when offset > 0), with guard bytes around them: intact() says
// whether a kernel wrote outside [p, p + n).
template <typename T>
struct Buf {
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kPattern = 0xa5;
  std::vector<unsigned char> raw;
  T* p;
  size_t n;
  Buf(size_t count, int offset = 0) : raw(kGuard + 16 + (count + offset) * sizeof(T) + kGuard, kPattern), n(count) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + kGuard + 15) / 16 * 16;
    p = reinterpret_cast<T*>(a) + offset;
  }
  T* data() { return p; }
  T& operator[](size_t i) { return p[i]; }
  bool intact() const {
    const unsigned char* lo = reinterpret_cast<const unsigned char*>(p);
    const unsigned char* hi = reinterpret_cast<const unsigned char*>(p + n);
    for (const unsigned char* q = raw.data(); q < raw.data() + raw.size(); ++q) {
      if ((q < lo || q >= hi) && *q != kPattern) return false;
    }
    return true;
  }
};

// The sequence words every launch shares (per stream on a GPU), zeroed once;
// check_words(sequenced) says whether the last launch left them as a launch
// must: every counter back at 0, the epoch one higher after a launch that
// takes tickets (sequenced), else unchanged.
struct Words {
  Buf<unsigned> buf{1};
  int64_t capacity = 0;
  gnflex::cuda::Epoch epoch = 0;
  gnflex::cuda::SequenceWords get(int64_t domains) {
    if (capacity < domains) {
      capacity = std::max<int64_t>(domains, 2 * capacity);
      buf = Buf<unsigned>(gnflex::cuda::SequenceWords::size(capacity));
      std::fill(buf.p, buf.p + buf.n, 0u);
      epoch = 0;
    }
    return {buf.p, capacity};
  }
  bool check_words(bool sequenced) {
    const gnflex::cuda::SequenceWords sw{buf.p, capacity};
    if (sequenced) ++epoch;
    bool ok = buf.intact() && *sw.ticket() == 0 && *sw.done() == 0 && *sw.finished() == 0 && *sw.epoch() == epoch;
    for (int level = 0; level < gnflex::cuda::SequenceWords::kLevels; ++level) {
      for (int64_t d = 0; d < capacity; ++d) ok = ok && *sw.arrivals(level, d) == 0 && *sw.ready(level, d) <= epoch;
    }
    return ok;
  }
};
Words g_words;

template <typename T>
gnflex::cuda::ParamType param_type_of() {
  if (std::is_same<T, c10::Half>::value) return gnflex::cuda::ParamType::Half;
  if (std::is_same<T, c10::BFloat16>::value) return gnflex::cuda::ParamType::BFloat16;
  return gnflex::cuda::ParamType::Acc;
}

enum class Spike { None, First, Middle, Last, Plane };
// Parameters: in the accumulate type, in the input's dtype (16-bit inputs),
// or absent (null weight and bias).
enum class Params { Acc, Input, None };
// Which gradients the backward computes: all, dx only, or dweight / dbias only.
enum class Grads { All, InputOnly, ParamsOnly };

struct Case {
  int64_t N, C, HxW, G;
  Layout layout;
  Activation act = Activation::None;
  int x_off = 0, dy_off = 0;      // misalignment in elements
  double center = 0, spread = 2;  // x = center + spread * randn
  Spike spike = Spike::None;
  double spike_size = 0;  // in units of spread
  bool affine = true;     // random weight / bias (else 1 / 0)
  Params params = Params::Acc;
  Grads grads = Grads::All;
  double eps = 1e-5;
  // weight / bias per sample, (N, C) (AdaGN / FiLM), instead of (C,)
  bool sample_weight = false, sample_bias = false;
};

int passed = 0, failed = 0;

template <typename scalar_t>
void run_case(const Case& k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = k.N, C = k.C, HxW = k.HxW, G = k.G, Cg = C / G, D = Cg * HxW;
  const GroupNormShape s{N, C, HxW, G};
  const int64_t numel = N * C * HxW;
  const auto idx = [&](int64_t n, int64_t c, int64_t r) {
    return k.layout == Layout::ChannelsFirst ? (n * C + c) * HxW + r : (n * HxW + r) * C + c;
  };
  std::mt19937 rng(static_cast<unsigned>(N * 1000003 + C * 1009 + HxW * 7 + G));
  std::normal_distribution<double> nd(0, 1);
  Buf<scalar_t> x(numel, k.x_off), dy(numel, k.dy_off), y(numel, k.x_off), dx(numel, k.x_off);
  Buf<acc_t> mean(N * G), rstd(N * G);
  // Parameters and their gradients are stored (N, C) (each sample_* flag)
  // or (C,); entry (n, c) at wi(n, c) / bi(n, c).
  const int64_t ws = k.sample_weight ? C : 0, bs = k.sample_bias ? C : 0;
  const int64_t w_len = k.sample_weight ? N * C : C, b_len = k.sample_bias ? N * C : C;
  const auto wi = [&](int64_t n, int64_t c) { return n * ws + c; };
  const auto bi = [&](int64_t n, int64_t c) { return n * bs + c; };
  std::vector<acc_t> w(w_len, acc_t(1)), b(b_len, acc_t(0));
  for (int64_t i = 0; i < numel; ++i) x.p[i] = scalar_t(k.center + k.spread * nd(rng));
  for (int64_t i = 0; i < numel; ++i) dy.p[i] = scalar_t(nd(rng));
  if (k.affine && k.params != Params::None) {
    for (auto& v : w) v = acc_t(1 + 0.3 * nd(rng));
    for (auto& v : b) v = acc_t(0.2 * nd(rng));
  }
  // The parameters as the kernels get them, and their gradients' storage.
  namespace gc = gnflex::cuda;
  const bool narrow = k.params == Params::Input && sizeof(scalar_t) == 2;
  const gc::ParamType ptype = narrow ? param_type_of<scalar_t>() : gc::ParamType::Acc;
  Buf<acc_t> w_acc(w_len), b_acc(b_len), dw_acc(w_len), db_acc(b_len);
  Buf<scalar_t> w_in(w_len), b_in(b_len), dw_in(w_len), db_in(b_len);
  for (int64_t i = 0; i < w_len; ++i) {
    w_in[i] = scalar_t(w[i]);
    if (narrow) w[i] = acc_t(w_in[i]);  // the reference uses the rounded values
    w_acc[i] = w[i];
  }
  for (int64_t i = 0; i < b_len; ++i) {
    b_in[i] = scalar_t(b[i]);
    if (narrow) b[i] = acc_t(b_in[i]);
    b_acc[i] = b[i];
  }
  const void* w_data = k.params == Params::None ? nullptr : narrow ? static_cast<void*>(w_in.p) : w_acc.p;
  const void* b_data = k.params == Params::None ? nullptr : narrow ? static_cast<void*>(b_in.p) : b_acc.p;
  const gc::ChannelParam<acc_t> wp{w_data, ptype, ws}, bp{b_data, ptype, bs};
  const bool want_dx = k.grads != Grads::ParamsOnly, want_params = k.grads != Grads::InputOnly;
  void* dw_data = !want_params ? nullptr : narrow ? static_cast<void*>(dw_in.p) : dw_acc.p;
  void* db_data = !want_params ? nullptr : narrow ? static_cast<void*>(db_in.p) : db_acc.p;
  const auto grad_at = [&](void* data, int64_t c) {
    return narrow ? acc_t(static_cast<scalar_t*>(data)[c]) : static_cast<acc_t*>(data)[c];
  };
  // Spikes in the first group of every sample: at its first, middle or last
  // value (in the layout's group order), or a whole plane (channel).
  const double spike = k.center + k.spike_size * k.spread;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t last = Cg * HxW - 1;
    const auto at = [&](int64_t j) { return idx(n, j / HxW, j % HxW); };  // j-th value of group 0
    switch (k.spike) {
      case Spike::First:
        x.p[at(0)] = scalar_t(spike);
        break;
      case Spike::Middle:
        x.p[at(last / 2)] = scalar_t(spike);
        break;
      case Spike::Last:
        x.p[at(last)] = scalar_t(spike);
        break;
      case Spike::Plane:
        for (int64_t r = 0; r < HxW; ++r) x.p[idx(n, 0, r)] = scalar_t(spike + nd(rng) * k.spread);
        break;
      default:
        break;
    }
  }
  const double eps = k.eps;

  const auto t0 = std::chrono::steady_clock::now();
  const gc::LaunchNeeds needs = gc::launch_needs<scalar_t>(s, k.layout);
  Buf<unsigned char> workspace(needs.workspace_bytes);
  gc::launch_forward<scalar_t>(x.p, y.p, wp, bp, acc_t(eps), k.act, s, k.layout, mean.p, rstd.p, workspace.p,
                               g_words.get(needs.domains), nullptr);
  // The resident forward (channels-first groups that fit a team) takes no tickets.
  const bool resident = gc::make_plan<scalar_t>(s, k.layout, 1).resident;
  bool words_ok = g_words.check_words(!resident);
  gc::launch_backward<scalar_t>(dy.p, x.p, mean.p, rstd.p, wp, bp, k.act, s, k.layout, want_dx ? dx.p : nullptr,
                                gc::ChannelGrad<acc_t>{dw_data, ptype, ws}, gc::ChannelGrad<acc_t>{db_data, ptype, bs},
                                workspace.p, g_words.get(needs.domains), nullptr);
  words_ok = g_words.check_words(true) && words_ok;
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const bool guards_ok = x.intact() && dy.intact() && y.intact() && dx.intact() && mean.intact() && rstd.intact() &&
                         workspace.intact() && w_acc.intact() && b_acc.intact() && dw_acc.intact() && db_acc.intact() &&
                         w_in.intact() && b_in.intact() && dw_in.intact() && db_in.intact();

  const double u = unit_roundoff<acc_t>();
  const bool act = k.act != Activation::None;
  Err e_y, e_mean, e_rstd, e_dx, e_dw, e_db;
  std::vector<real> rdw(w_len, 0), rdb(b_len, 0), mag_dw(w_len, 0), mag_db(b_len, 0), kink_dw(w_len, 0),
      kink_db(b_len, 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const auto value = [&](int64_t c, int64_t r) { return real(x.p[idx(n, c, r)]); };
      // The mean as m0 + m1: m0 a plain mean, m1 the mean of x - m0 (exact
      // in long double near the mean). float64 data with |mean| / std ~ 1e6
      // need both: a plain sum's rounding and even long double's half ulp of
      // the mean are more than the kernels' error there.
      real m0 = 0, m1 = 0, v = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t r = 0; r < HxW; ++r) m0 += value(c, r);
      m0 /= D;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t r = 0; r < HxW; ++r) m1 += value(c, r) - m0;
      m1 /= D;
      const real m = m0 + m1;
      const auto centered = [&](int64_t c, int64_t r) { return (value(c, r) - m0) - m1; };  // x - mean
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t r = 0; r < HxW; ++r) v += centered(c, r) * centered(c, r);
      const real rs = 1 / std::sqrt(v / D + eps);
      // The mean: one ulp of itself plus units of the spread (the rounding
      // of the statistics, not of |mean|: they are exact for any mean).
      e_mean.add(mean[n * G + g], m, static_cast<double>(stored_tol<acc_t>(m, std::sqrt(v / D + eps), u)));
      e_rstd.add(rstd[n * G + g], rs, static_cast<double>(kUnits * u * rs));
      // Per value: z = xhat * w + b has terms of magnitude zmag (xhat's own
      // error is ~units of |xhat| + 1); an activation's derivative moves with
      // z, by about 1 + zmag units.
      const auto wv = [&](int64_t c) { return real(w[wi(n, c)]); };
      const auto bv = [&](int64_t c) { return real(b[bi(n, c)]); };
      const auto zmag = [&](int64_t c, real xh) { return std::abs(wv(c)) * (std::abs(xh) + 1) + std::abs(bv(c)); };
      // Magnitude of g = dy * act'(z), and whether z is within rounding of
      // ReLU's kink at 0 (where act' may take either side).
      const auto grad_mag = [&](int64_t c, real xh, real dyv) { return std::abs(dyv) * (act ? 1 + zmag(c, xh) : 1); };
      const auto near_kink = [&](int64_t c, real xh, real z) {
        return k.act == Activation::ReLU && std::abs(z) <= kUnits * u * zmag(c, xh);
      };
      real s_gw = 0, s_gwxh = 0, a_gw = 0, a_gwxh = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t r = 0; r < HxW; ++r) {
          const real xh = centered(c, r) * rs;
          const real z = xh * wv(c) + bv(c);
          const real dyv = real(dy.p[idx(n, c, r)]);
          const real gz = dyv * act_grad_ref(k.act, z);
          const real gmag = grad_mag(c, xh, dyv);
          rdw[wi(n, c)] += gz * xh;
          rdb[bi(n, c)] += gz;
          mag_dw[wi(n, c)] += gmag * (std::abs(xh) + 1);
          mag_db[bi(n, c)] += gmag;
          // Near the kink, the sums may move by that value's whole term.
          if (near_kink(c, xh, z)) {
            kink_dw[wi(n, c)] += std::abs(dyv * xh);
            kink_db[bi(n, c)] += std::abs(dyv);
          }
          s_gw += gz * wv(c);
          s_gwxh += gz * wv(c) * xh;
          a_gw += gmag * std::abs(wv(c));
          a_gwxh += gmag * std::abs(wv(c)) * (std::abs(xh) + 1);
        }
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t r = 0; r < HxW; ++r) {
          const real xh = centered(c, r) * rs;
          const real z = xh * wv(c) + bv(c);
          const real ry = act_ref(k.act, z);
          e_y.add(real(y.p[idx(n, c, r)]), ry,
                  static_cast<double>(stored_tol<scalar_t>(ry, zmag(c, xh) + std::abs(ry), u)));
          if (!want_dx) continue;
          if (near_kink(c, xh, z)) continue;  // either side of the kink is right
          const real dyv = real(dy.p[idx(n, c, r)]);
          const real gz = dyv * act_grad_ref(k.act, z);
          const real rdx = rs * (gz * wv(c) - s_gw / D - xh * s_gwxh / D);
          const real gmag = grad_mag(c, xh, dyv);
          const real dx_mag = rs * (gmag * std::abs(wv(c)) + (a_gw + (std::abs(xh) + 1) * a_gwxh) / D);
          e_dx.add(real(dx.p[idx(n, c, r)]), rdx, static_cast<double>(stored_tol<scalar_t>(rdx, dx_mag, u)));
        }
    }
  }
  // dweight / dbias are stored in the parameters' dtype.
  const auto tol = [&](real v, real mag, real kink) {
    return static_cast<double>(kink + (narrow ? stored_tol<scalar_t>(v, mag, u) : stored_tol<acc_t>(v, mag, u)));
  };
  for (int64_t i = 0; i < w_len && want_params; ++i) {
    e_dw.add(grad_at(dw_data, i), rdw[i], tol(rdw[i], mag_dw[i], kink_dw[i]));
  }
  for (int64_t i = 0; i < b_len && want_params; ++i) {
    e_db.add(grad_at(db_data, i), rdb[i], tol(rdb[i], mag_db[i], kink_db[i]));
  }
  const double worst = std::max({e_y.worst, e_mean.worst, e_rstd.worst, e_dx.worst, e_dw.worst, e_db.worst});
  const bool ok = worst <= 1 && guards_ok && words_ok;
  static const char* acts[] = {"none", "relu", "silu", "gelu"};
  static const char* spikes[] = {"none", "first", "middle", "last", "plane"};
  static const char* params[] = {"acc", "input", "none"};
  static const char* grads[] = {"all", "dx", "params"};
  static const char* samples[] = {"", "/per-sample-weight", "/per-sample-bias", "/per-sample"};
  std::printf(
      "%s %-8s %s%s N=%ld C=%ld HxW=%ld G=%ld act=%s affine=%d params=%s%s grads=%s eps=%g off=%d/%d x=%g+%g*randn "
      "spike=%s*%g: err/tol y %.2f mean %.2f rstd %.2f dx %.2f dw %.2f db %.2f%s%s (%.0f ms)\n",
      ok ? "PASS" : "FAIL", type_name<scalar_t>(), k.layout == Layout::ChannelsFirst ? "NCHW" : "NHWC",
      resident ? " resident" : "", long(N), long(C), long(HxW), long(G), acts[int(k.act)], int(k.affine),
      params[int(k.params)], samples[int(k.sample_weight) + 2 * int(k.sample_bias)], grads[int(k.grads)], k.eps,
      k.x_off, k.dy_off, k.center, k.spread, spikes[int(k.spike)], k.spike_size, e_y.worst, e_mean.worst, e_rstd.worst,
      e_dx.worst, e_dw.worst, e_db.worst, guards_ok ? "" : " GUARD BYTES OVERWRITTEN",
      words_ok ? "" : " SEQUENCE WORDS NOT RESET", ms);
  (ok ? passed : failed)++;
}

// The matrix: shapes that exercise every block shape and loop of the kernels,
// then the numerics cases (spikes anywhere in a group, a large mean).
std::vector<Case> cases() {
  std::vector<Case> all;
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    all.push_back({2, 6, 5000, 3, l});                                 // several parts per plane / row block
    all.push_back({1, 300, 20, 10, l, Activation::SiLU, 0, 0, 3.0});   // C > 256: two channel tiles, odd C
    all.push_back({2, 608, 45, 32, l, Activation::None, 1, 1, 1.0});   // scalar channels-last: 3 tiles of 203
    all.push_back({1, 2560, 24, 32, l, Activation::SiLU, 0, 0, 1.0});  // vector tiles, groups across tile edges
    all.push_back({3, 4, 33, 2, l, Activation::GELU, 1, 3});           // misaligned, odd sizes
    all.push_back({2, 8, 100, 4, l, Activation::ReLU, 0, 0, 0.5});
    all.push_back(
        {4, 6, 1, 6, l, Activation::None, 0, 0, 0, 1, Spike::None, 0, false});  // one value per group, 2-D input
    all.push_back({2, 16, 7, 1, l, Activation::SiLU});                          // one group (LayerNorm-like)
    all.push_back({2, 12, 60, 12, l, Activation::GELU});                        // InstanceNorm-like
    all.push_back({2, 4, 6 * 5 * 4, 2, l, Activation::None, 2, 2});             // 3-D spatial, same misalignment
    all.push_back({3, 32, 50, 8, l, Activation::SiLU, 0, 1});                   // aligned x, misaligned dy
    all.push_back({2, 16, 30, 4, l, Activation::None, 0, 0, 0, 0.05});          // eps 1e-1 >> variance
    all.back().eps = 0.1;
    all.push_back({2, 16, 30, 4, l, Activation::GELU, 0, 0, 0.5, 1});  // eps 0
    all.back().eps = 0;
    all.push_back({2, 64, 36, 8, l, Activation::GELU});  // parameters in the input dtype
    all.back().params = Params::Input;
    all.push_back({3, 48, 20, 6, l, Activation::SiLU, 1, 1});  // ... misaligned
    all.back().params = Params::Input;
    all.push_back({2, 8, 50, 4, l, Activation::ReLU});  // no weight, no bias
    all.back().params = Params::None;
    all.push_back({2, 24, 40, 3, l, Activation::SiLU});  // dx only
    all.back().grads = Grads::InputOnly;
    all.push_back({2, 24, 40, 3, l, Activation::GELU});  // dweight / dbias only
    all.back().grads = Grads::ParamsOnly;
    all.push_back({5, 40, 49, 8, l, Activation::SiLU});    // 7x7 planes, planes per block
    all.push_back({1, 1024, 4, 32, l, Activation::None});  // tiny planes, many groups
    // The plan's thresholds: groups of kWarpSpan values (a warp each) and one
    // more (a block); planes of kSmallPlane - 1 values (planes per block) and
    // kSmallPlane (parts of a plane).
    all.push_back({2, 4, 256, 1, l, Activation::SiLU});
    all.push_back({2, 4, 257, 1, l, Activation::SiLU});
    all.push_back({2, 6, 1023, 3, l, Activation::GELU});
    all.push_back({2, 6, 1024, 3, l, Activation::GELU});
    // Resident groups: kSpan values (a block's registers) and one more (two
    // passes); a warp's kResidentChannels / 8 channels and one more (its
    // block's table is full: two passes).
    all.push_back({2, 4, 2048, 2, l, Activation::SiLU, 1, 1});
    all.push_back({2, 1, 4097, 1, l, Activation::ReLU});
    all.push_back({3, 256, 3, 2, l, Activation::GELU, 0, 1});
    all.push_back({3, 258, 3, 2, l, Activation::None});
    // Per-sample (N, C) weight and bias: planes per block, two channel tiles
    // (parameters in the input dtype), parts per plane, resident groups,
    // parameter gradients only.
    for (Case c : {Case{2, 64, 36, 8, l, Activation::SiLU}, Case{3, 300, 20, 10, l, Activation::GELU, 1, 1},
                   Case{2, 6, 5000, 3, l, Activation::None}, Case{2, 4, 2048, 2, l, Activation::ReLU},
                   Case{3, 24, 40, 3, l, Activation::SiLU}}) {
      c.sample_weight = c.sample_bias = true;
      all.push_back(c);
    }
    all[all.size() - 4].params = Params::Input;
    all[all.size() - 4].sample_bias = false;
    all[all.size() - 3].sample_weight = false;
    all.back().grads = Grads::ParamsOnly;
  }
  return all;
}

std::vector<Case> numerics_cases() {
  std::vector<Case> all;
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    for (Spike sp : {Spike::First, Spike::Middle, Spike::Last, Spike::Plane}) {
      for (double size : {10.0, 100.0, 1000.0}) {
        all.push_back({1, 4, 4096 + 300, 2, l, Activation::None, 0, 0, 0, 1, sp, size});
      }
    }
    all.push_back({2, 8, 300, 2, l, Activation::SiLU, 0, 0, 0, 1, Spike::First, 100});
    all.push_back({2, 8, 300, 2, l, Activation::GELU, 0, 0, 0, 1, Spike::Middle, 1000});
    all.push_back({2, 8, 300, 4, l, Activation::None, 0, 0, 1e4, 1e-2});  // large mean, a warp per group
    all.push_back({2, 8, 300, 4, l, Activation::SiLU, 0, 0, -3e3, 1e-1});
    all.push_back({2, 8, 1200, 4, l, Activation::None, 0, 0, 1e4, 1e-2});  // large mean, blocks per group split
  }
  return all;
}

// Every case runs on the op's plan and on a scaled-down one: rounds of 600
// bytes (many rounds, stages interleaved and waiting on earlier rounds),
// channels-last blocks of one pass of rows merged 2 row parts at a time
// (two-level merges), channels-first groups on the two-pass path even where
// they fit a team (the op's plan takes the resident path there), output
// rounds reversed where more than 2000 bytes are read between a domain's
// statistics and its output (the "dram" path).
constexpr gnflex::cuda::SimPlanScale kSmallPlan{600, 2, true, true, 2000};

template <typename scalar_t>
void run_matrix(bool numerics) {
  for (const Case& k : numerics ? numerics_cases() : cases()) {
    // Half types: the large-mean cases need their values representable (ulp
    // of 1e4 is 8 in fp16): scale them into range.
    Case c = k;
    if (sizeof(scalar_t) == 2 && std::abs(c.center) > 100) c.center = c.center > 0 ? 100 : -100, c.spread = 1;
    for (bool small : {false, true}) {
      gnflex::cuda::gnflex_sim_plan = small ? kSmallPlan : gnflex::cuda::SimPlanScale{};
      std::printf("rounds=%s ", small ? "small" : "op");
      run_case<scalar_t>(c);
    }
  }
  gnflex::cuda::gnflex_sim_plan = {};
}

// ---- traffic model ---------------------------------------------------------------
// Goals: forward <= 1.55 x the ideal bytes (each input read once, each output
// written once, statistics and parameters included), backward <= 1.7 x; one
// launch per pass; >= 264 blocks (2 waves on 132 SMs) on cases of 8 MB or more.
template <typename scalar_t>
void traffic_case(const std::string& label, int64_t N, int64_t C, int64_t HxW, int64_t G, Layout layout,
                  const std::string& dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape s{N, C, HxW, G};
  const int64_t numel = N * C * HxW;
  std::mt19937 rng(1);
  std::normal_distribution<double> nd(0, 1);
  namespace gc = gnflex::cuda;
  Buf<scalar_t> x(numel, 0), dy(numel, 0), y(numel, 0), dx(numel, 0);
  for (int64_t i = 0; i < numel; ++i) x.p[i] = scalar_t(nd(rng)), dy.p[i] = scalar_t(nd(rng));
  std::vector<acc_t> w(C, acc_t(1)), b(C, acc_t(0)), mean(N * G), rstd(N * G), dw(C), db(C);
  const gc::LaunchNeeds needs = gc::launch_needs<scalar_t>(s, layout);
  std::vector<unsigned char> workspace(needs.workspace_bytes);
  const gc::ChannelParam<acc_t> wp{w.data()}, bp{b.data()};
  const int64_t elem = sizeof(scalar_t), acc = sizeof(acc_t);
  const auto report = [&](const char* pass, int64_t ideal, double ratio_goal, int64_t launch_goal) {
    const double ratio = double(g_traffic_bytes) / double(ideal);
    const bool big = numel * elem >= (8 << 20);
    std::string per_launch;
    for (int64_t b : g_launch_bytes) per_launch += (per_launch.empty() ? "" : " ") + std::to_string(b);
    std::printf(
        "traffic %s %ldx%ldx%ld %s %s G=%ld: bytes %ld ideal %ld ratio %.2f launches %ld max_blocks %ld"
        "  [%s; ratio %s, launches %s, blocks %s; bytes per launch %s]\n",
        pass, long(N), long(C), long(HxW), dtype.c_str(), layout == Layout::ChannelsFirst ? "nchw" : "cl", long(G),
        long(g_traffic_bytes), long(ideal), ratio, long(g_launches), long(g_max_blocks), label.c_str(),
        ratio <= ratio_goal ? "ok" : "OVER", g_launches <= launch_goal ? "ok" : "OVER",
        !big                  ? "-"
        : g_max_blocks >= 264 ? "ok"
                              : "UNDER",
        per_launch.c_str());
    g_traffic_bytes = g_launches = g_max_blocks = 0;
    g_launch_bytes.clear();
  };
  g_traffic_bytes = g_launches = g_max_blocks = 0;
  g_launch_bytes.clear();
  gc::launch_forward<scalar_t>(x.p, y.p, wp, bp, acc_t(1e-5), Activation::None, s, layout, mean.data(), rstd.data(),
                               workspace.data(), g_words.get(needs.domains), nullptr);
  report("fwd", 2 * numel * elem + 2 * C * acc + 2 * N * G * acc, 1.55, 1);
  gc::launch_backward<scalar_t>(dy.p, x.p, mean.data(), rstd.data(), wp, bp, Activation::None, s, layout, dx.p,
                                gc::ChannelGrad<acc_t>{dw.data()}, gc::ChannelGrad<acc_t>{db.data()}, workspace.data(),
                                g_words.get(needs.domains), nullptr);
  report("bwd", 3 * numel * elem + 2 * N * G * acc + 4 * C * acc, 1.7, 1);
}

// Grid report: per launch of the forward and backward, the blocks the plan
// gives a full-size case (aligned pointers), against the goal of >= 264
// blocks (2 waves on 132 SMs) for tensors of 8 MB or more. Runs no kernel.
template <typename scalar_t>
void grid_case(const std::string& label, int64_t N, int64_t C, int64_t HxW, int64_t G, Layout layout,
               const std::string& dtype) {
  namespace gc = gnflex::cuda;
  const GroupNormShape s{N, C, HxW, G};
  const int vec =
      layout == Layout::ChannelsLast && C % gc::PackTraits<scalar_t>::kSize == 0 ? gc::PackTraits<scalar_t>::kSize : 1;
  const gc::Plan plan = gc::make_plan<scalar_t>(s, layout, vec);
  const int64_t bytes = N * C * HxW * int64_t(sizeof(scalar_t));
  const gc::Schedule fwd = gc::forward_schedule<scalar_t>(s, plan);
  const gc::Schedule bwd = gc::backward_schedule<scalar_t>(s, plan, true, true);
  // The resident forward: one kernel of a team per group (its blocks both stages' count).
  const int64_t resident = plan.resident ? gc::resident_blocks(s, plan) : 0;
  const int64_t stats = plan.resident ? resident : fwd.stage[0].blocks;
  const int64_t out = plan.resident ? resident : fwd.stage[1].blocks, grad = bwd.stage[1].blocks;
  const bool big = bytes >= (8 << 20);
  const bool ok = std::min({stats, out, grad}) >= 264;
  std::printf(
      "grid %ldx%ldx%ld %s %s G=%ld%s (%.1f MB): stats %ld output %ld grad_sums %ld; tickets fwd %ld bwd %ld, "
      "rounds fwd %ld"
      "  [%s; %s]\n",
      long(N), long(C), long(HxW), dtype.c_str(), layout == Layout::ChannelsFirst ? "nchw" : "cl", long(G),
      plan.resident ? " resident" : "", bytes / 1048576.0, long(stats), long(out), long(grad),
      long(plan.resident ? resident : fwd.tickets), long(bwd.tickets), long(plan.resident ? 1 : fwd.stage[0].rounds()),
      label.c_str(),
      !big ? "-"
      : ok ? "ok"
           : "UNDER");
}

// Reads cases "label N C HxW G dtype layout" from stdin and calls
// Report<scalar_t>::run(label, N, C, HxW, G, layout, dtype) for each.
template <template <typename> class Report>
int for_each_input_case() {
  std::string label, dtype, layout;
  int64_t N, C, HxW, G;
  while (std::cin >> label >> N >> C >> HxW >> G >> dtype >> layout) {
    const Layout l = layout == "nchw" ? Layout::ChannelsFirst : Layout::ChannelsLast;
    if (dtype == "float32")
      Report<float>::run(label, N, C, HxW, G, l, dtype);
    else if (dtype == "float16")
      Report<c10::Half>::run(label, N, C, HxW, G, l, dtype);
    else if (dtype == "bfloat16")
      Report<c10::BFloat16>::run(label, N, C, HxW, G, l, dtype);
    else
      Report<double>::run(label, N, C, HxW, G, l, dtype);
  }
  return 0;
}

template <typename T>
struct GridReport {
  static void run(const std::string& label, int64_t N, int64_t C, int64_t HxW, int64_t G, Layout l,
                  const std::string& dtype) {
    grid_case<T>(label, N, C, HxW, G, l, dtype);
  }
};
template <typename T>
struct TrafficReport {
  static void run(const std::string& label, int64_t N, int64_t C, int64_t HxW, int64_t G, Layout l,
                  const std::string& dtype) {
    traffic_case<T>(label, N, C, HxW, G, l, dtype);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--traffic") {
    if (cudasim::concurrent_blocks() > 1) {
      std::fprintf(stderr, "--traffic counts one block at a time: unset CUDASIM_BLOCKS\n");
      return 2;
    }
    g_count_traffic = true;
    return for_each_input_case<TrafficReport>();
  }
  if (argc > 1 && std::string(argv[1]) == "--grids") return for_each_input_case<GridReport>();
  const std::string known[] = {type_name<float>(), type_name<double>(), type_name<c10::Half>(),
                               type_name<c10::BFloat16>()};
  std::string all;
  for (const std::string& name : known) all += (all.empty() ? "" : ",") + name;
  std::string dtypes = all;
  bool with_numerics = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--dtypes" && i + 1 < argc) {
      dtypes = argv[++i];
    } else if (arg == "--no-numerics") {
      with_numerics = false;
    } else {
      std::fprintf(stderr, "unknown argument %s (see the comment at the top of run_kernels.cpp)\n", arg.c_str());
      return 2;
    }
  }
  const std::string list = "," + dtypes + ",";
  const auto wanted = [&](const char* name) { return list.find(std::string(",") + name + ",") != std::string::npos; };
  for (size_t start = 1; start < list.size(); start = list.find(',', start) + 1) {
    const std::string name = list.substr(start, list.find(',', start) - start);
    if (std::find(std::begin(known), std::end(known), name) == std::end(known)) {
      std::fprintf(stderr, "--dtypes: unknown dtype '%s' (of %s)\n", name.c_str(), all.c_str());
      return 2;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  try {
    for (bool numerics : {false, true}) {
      if (numerics && !with_numerics) break;
      if (wanted(type_name<float>())) run_matrix<float>(numerics);
      if (wanted(type_name<double>())) run_matrix<double>(numerics);
      if (wanted(type_name<c10::Half>())) run_matrix<c10::Half>(numerics);
      if (wanted(type_name<c10::BFloat16>())) run_matrix<c10::BFloat16>(numerics);
    }
  } catch (const cudasim::KernelError& e) {
    std::printf("FAIL kernel error: %s\n", e.what());
    ++failed;
  }
  std::printf("total %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}
