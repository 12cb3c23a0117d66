// Included by each SIMD variant of the CPU kernels after its target pragma and
// its CPU_CAPABILITY_<X> define: the feature macros g++ does not define for a
// target pragma (see capability_prelude.h), for the headers that test them.
// Not guarded: each variant is its own translation unit and includes it once.
#if defined(CPU_CAPABILITY_AVX512)
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif
