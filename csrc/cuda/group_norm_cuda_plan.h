// What the CUDA kernels do with a shape, for the benchmark's reports
// (gnflex._C.cuda_plan); defined in group_norm_cuda.cu.
#pragma once

#include <cstdint>
#include <string>

namespace gnflex {
namespace cuda {

struct PlanInfo {
  // "block": the forward reads x once (a group per warp or block); "l2": its
  // output pass re-reads x from L2; "dram": from memory.
  std::string path;
  int64_t forward_tickets, backward_tickets, rounds, reuse_bytes;  // forward_tickets: blocks where "block"
};

// element_size 2 (float16 / bfloat16), 4 or 8.
PlanInfo plan_info(int64_t N, int64_t C, int64_t HxW, int64_t G, int64_t element_size, bool channels_last);

}  // namespace cuda
}  // namespace gnflex
