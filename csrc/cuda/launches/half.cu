// The half launches of group_norm_launch.cuh and the kernels they run: one
// dtype per translation unit, so a build compiles the dtypes in parallel.
#include "../group_norm_launch.cuh"

namespace gnflex {
namespace cuda {
GNFLEX_LAUNCHES(, c10::Half)
}  // namespace cuda
}  // namespace gnflex
