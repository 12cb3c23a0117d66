// The floor of a fused GroupNorm forward on this CPU, without gnflex or torch:
// memcpy against the fused design's memory pattern (read a group, reduce it,
// then write its outputs from cache), over group sizes, in one process.
//
//   g++ -O3 -march=native -fopenmp bench/cpu_floor.cpp -o /tmp/cpu_floor
//   OMP_NUM_THREADS=2 /tmp/cpu_floor [MB=6] [rounds=9]
//
// Each thread takes a contiguous half (as at::parallel_for does); each round
// times every contender (median of 30 calls), in rotating order; the table
// gives the minimum over rounds of those medians and the ratio to memcpy.
// docs/performance.md ("What a forward near the clone costs") has results.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// Sums of a group, then its outputs: what a fused forward reads and writes.
void fused_groups(const float* x, float* y, long n, long group) {
  for (long g0 = 0; g0 < n; g0 += group) {
    const long m = std::min(group, n - g0);
    const float* gx = x + g0;
    // Lane sums in several independent vectors, as the kernels keep them
    // (one accumulator would make the pass latency-bound).
    constexpr long kLanes = 64;
    float lanes[kLanes] = {}, lanes2[kLanes] = {};
    long i = 0;
    for (; i + kLanes <= m; i += kLanes) {
#pragma omp simd
      for (long j = 0; j < kLanes; ++j) {
        lanes[j] += gx[i + j];
        lanes2[j] += gx[i + j] * gx[i + j];
      }
    }
    float sum = 0, sum2 = 0;
    for (; i < m; ++i) {
      sum += gx[i];
      sum2 += gx[i] * gx[i];
    }
    for (long j = 0; j < kLanes; ++j) {
      sum += lanes[j];
      sum2 += lanes2[j];
    }
    const float mean = sum / m;
    const float rstd = 1.0f / std::sqrt(std::max(sum2 / m - mean * mean, 0.0f) + 1e-5f);
#pragma omp simd
    for (long i = 0; i < m; ++i) y[g0 + i] = (gx[i] - mean) * rstd;
  }
}

double median_us(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const long n = (argc > 1 ? std::atol(argv[1]) : 6) * 1024 * 256;  // MB of fp32
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 9;
  const std::vector<long> groups = {2048, 4096, 6272, 8192, 16384, 65536};  // values per group
  float* x = static_cast<float*>(std::aligned_alloc(64, n * 4));
  float* y = static_cast<float*>(std::aligned_alloc(64, n * 4));
  for (long i = 0; i < n; ++i) x[i] = static_cast<float>(i % 97) * 0.01f;
  std::memset(y, 0, n * 4);
  const int threads = omp_get_max_threads();
  // Contender k: 0 is memcpy, k > 0 the fused pattern with groups[k - 1].
  const int contenders = 1 + static_cast<int>(groups.size());
  const auto run = [&](int k) {
    const long unit = k == 0 ? 16 : groups[k - 1];  // a thread's share is whole groups
#pragma omp parallel
    {
      const long per = (n / threads + unit - 1) / unit * unit;
      const long begin = std::min(n, omp_get_thread_num() * per), end = std::min(n, begin + per);
      if (k == 0) {
        std::memcpy(y + begin, x + begin, (end - begin) * 4);
      } else {
        fused_groups(x + begin, y + begin, end - begin, unit);
      }
    }
  };
  // One untimed call each first: the thread pool starts and y's pages are
  // touched before any contender is timed.
  for (int k = 0; k < contenders; ++k) run(k);
  std::vector<double> best(contenders, 1e30);
  for (int r = 0; r < rounds; ++r) {
    for (int j = 0; j < contenders; ++j) {
      const int k = (j + r) % contenders;
      std::vector<double> times;
      for (int call = 0; call < 30; ++call) {
        const auto t0 = std::chrono::steady_clock::now();
        run(k);
        times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      best[k] = std::min(best[k], median_us(times));
    }
  }
  std::printf("%ld MB fp32, %d threads, %d rounds\n| contender | us | over memcpy |\n|---|---|---|\n", n / 262144,
              threads, rounds);
  std::printf("| memcpy | %.1f | 1.00 |\n", best[0]);
  for (size_t k = 0; k < groups.size(); ++k) {
    std::printf("| fused, groups of %ld KB | %.1f | %.2f |\n", groups[k] * 4 / 1024, best[k + 1], best[k + 1] / best[0]);
  }
  std::free(x);
  std::free(y);
  return 0;
}
