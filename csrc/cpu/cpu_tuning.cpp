// Cache sizes from the machine and the CPU kernels' budgets (cpu_tuning.h).
#include "cpu_tuning.h"

#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

namespace gnflex {
namespace cpu {
namespace {

// "512K", "32768K", "1M" (sysfs) -> bytes; 0 when unreadable.
int64_t parse_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) return 0;
  switch (*end) {
    case 'K':
    case 'k':
      return value * 1024;
    case 'M':
    case 'm':
      return value * 1024 * 1024;
    case 'G':
    case 'g':
      return value * 1024 * 1024 * 1024;
    default:
      return value;
  }
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Linux sysfs describes the caches cpu0 uses: the L3 it reports is the one
// of its core complex (AMD) or socket (Intel), not the whole package.
CacheSizes from_sysfs() {
  CacheSizes c;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level");
    if (level.empty()) break;
    const std::string type = read_line(dir + "type");
    const int64_t size = parse_size(read_line(dir + "size"));
    if (level == "1" && type == "Data") c.l1d = size;
    if (level == "2" && type != "Instruction") c.l2 = size;
    if (level == "3" && type != "Instruction") c.l3 = size;
  }
  c.source = "sysfs";
  return c;
}

CacheSizes from_sysconf() {
  CacheSizes c;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  c.l1d = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
  c.l2 = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  c.l3 = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
  c.source = "sysconf";
  return c;
}

CacheSizes read_caches() {
  CacheSizes c = from_sysfs();
  if (c.l2 == 0) c = from_sysconf();
  if (c.l2 == 0) {
    c = CacheSizes{};
    c.source = "default";
  }
  // Defaults for what neither source knows: small server-class caches.
  if (c.l1d == 0) c.l1d = 32 * 1024;
  if (c.l2 == 0) c.l2 = 512 * 1024;
  if (c.l3 == 0) c.l3 = 8 * c.l2;
  return c;
}

// A size from the environment variable `name` (for experiments and tests),
// if set.
void size_override(const char* name, int64_t& value) {
  const char* text = std::getenv(name);
  if (text == nullptr) return;
  const int64_t parsed = parse_size(text);
  TORCH_CHECK(parsed > 0, name, " must be a size such as 4194304, 4096K or 64M, got '", text, "'");
  value = parsed;
}

}  // namespace

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_caches();
  return sizes;
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::Fused:
      return "fused";
    case Schedule::TwoPass:
      return "two_pass";
    default:
      return "auto";
  }
}

CpuTuning cpu_tuning() {
  const CacheSizes& c = cache_sizes();
  CpuTuning t;
  // A fused group works within about one core's L2 (what spills is read
  // back from L3, still far cheaper than memory); a channels-last sample
  // within four. Measured on a 512 KiB-L2 EPYC: a 256 KiB group budget left
  // the backward of (2, 512, 64, 64) at 1.0x torch, 512 KiB gave 1.4x.
  t.fused_group_bytes = c.l2;
  t.fused_sample_bytes = 4 * c.l2;
  // What a call's tensors may total and still be read back from L3: half of
  // it, as the L3 is shared with the other cores (on a VM, with other
  // machines too), and at most 16 MiB: an L3 of more than 32 MiB is a server
  // socket's (Intel's sysfs reports the socket's, e.g. 300 MiB for dozens of
  // cores), of which a process on a few cores keeps a few MB. Measured on
  // channels-last backwards whose samples spill L2 (docs/performance.md).
  const int64_t l3_share = std::min<int64_t>(c.l3 / 2, 16 * 1024 * 1024);
  t.l3_reread_bytes = l3_share;
  // Stream outputs that will not stay in the last-level cache: the input and
  // the output together must fit that share (and at least 2 MiB). Streaming
  // an output that would have stayed makes its reader fetch it from memory:
  // with the bound at an eighth of a 32 MiB L3, a 6.4 MB forward ran at 0.80x
  // torch on a 2-core EPYC whose L3 kept both tensors; at half of it, 1.19x
  // (same run). On a socket's L3, not streaming a 32 MB output made the
  // forward 1.3x slower (docs/performance.md).
  t.stream_output_bytes = std::max<int64_t>(l3_share, 2 * 1024 * 1024);
  // What one thread reads before its elementwise pass stays in its L2 up to
  // the L2's size (walks_back in the kernels). Past four L2s, what the L2
  // still holds is under a quarter of the pass, less than a backward walk's
  // weaker prefetching costs: at eight, channels-last backward 0.91-0.95x
  // (AVX2 variant), 0.99-1.01x (AVX-512).
  t.walk_back_bytes = c.l2;
  t.walk_back_max_bytes = 4 * c.l2;
  size_override("GNFLEX_CPU_STREAM_BYTES", t.stream_output_bytes);
  size_override("GNFLEX_CPU_WALK_BACK_BYTES", t.walk_back_bytes);
  const char* env = std::getenv("GNFLEX_CPU_SCHEDULE");
  const std::string schedule = env == nullptr ? "" : env;
  if (schedule == "fused") {
    t.schedule = Schedule::Fused;
  } else if (schedule == "two_pass") {
    t.schedule = Schedule::TwoPass;
  } else {
    TORCH_CHECK(schedule.empty() || schedule == "auto", "GNFLEX_CPU_SCHEDULE must be auto, fused or two_pass, got '",
                schedule, "'");
  }
  return t;
}

}  // namespace cpu
}  // namespace gnflex
