// What the CPU kernels take from the machine: its cache sizes, the work
// budgets derived from them, and the schedule (automatic, or forced for
// tests and experiments with GNFLEX_CPU_SCHEDULE). Budgets only choose
// between schedules that compute the same numbers, so no result depends on
// them. Plain data: the kernel variants (one per CPU capability) receive it in
// their parameters.
#pragma once

#include <cstdint>
#include <string>

namespace gnflex {
namespace cpu {

// The fused schedules finish a group / sample while it is in cache; the
// two-pass schedule computes all statistics first. Auto picks per call.
enum class Schedule { Auto, Fused, TwoPass };

struct CacheSizes {
  int64_t l1d = 0, l2 = 0, l3 = 0;  // bytes
  std::string source;               // "sysfs", "sysconf" or "default"
};

struct CpuTuning {
  // Input bytes one fused item may touch: a channels-first group, a
  // channels-last sample.
  int64_t fused_group_bytes = 0;
  int64_t fused_sample_bytes = 0;
  // Outputs at least this big are written with non-temporal stores
  // (GNFLEX_CPU_STREAM_BYTES overrides it, e.g. 1G or 64K, for experiments).
  int64_t stream_output_bytes = 0;
  // What a call's tensors (inputs and outputs together) may total and still
  // be read back from L3 (backward_schedule in the kernels).
  int64_t l3_reread_bytes = 0;
  // Elementwise passes walk their items last to first where the pass before
  // them read more than walk_back_bytes on one thread
  // (GNFLEX_CPU_WALK_BACK_BYTES overrides it) and at most walk_back_max_bytes.
  int64_t walk_back_bytes = 0;
  int64_t walk_back_max_bytes = 0;
  Schedule schedule = Schedule::Auto;
};

// Read once per process (sysfs for cpu0, then sysconf, then defaults).
const CacheSizes& cache_sizes();

// The budgets for these caches, and the schedule from GNFLEX_CPU_SCHEDULE
// (auto | fused | two_pass; read on every call, so tests can switch it; any
// other value is an error).
CpuTuning cpu_tuning();

const char* schedule_name(Schedule s);

}  // namespace cpu
}  // namespace gnflex
