// What the CUDA kernels do with a shape, for the benchmark's reports
// (gnflex._C.cuda_plan); defined in group_norm_cuda.cu.
#pragma once

#include <cstdint>
#include <string>

namespace gnflex {
namespace cuda {

struct PlanInfo {
  std::string path;  // "l2": x is re-read from L2 by the output pass; "dram": from memory
  int64_t forward_tickets, backward_tickets, rounds, reuse_bytes;
};

// element_size 2 (float16 / bfloat16), 4 or 8.
PlanInfo plan_info(int64_t N, int64_t C, int64_t HxW, int64_t G, int64_t element_size, bool channels_last);

}  // namespace cuda
}  // namespace gnflex
