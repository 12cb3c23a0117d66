// The portable variant of the CPU kernels (any x86-64 or other CPU).
#define CPU_CAPABILITY DEFAULT
#include "group_norm_kernels_impl.h"
