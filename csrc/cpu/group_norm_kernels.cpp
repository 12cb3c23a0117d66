// The portable copy of the CPU kernels (any x86-64 or other CPU).
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
