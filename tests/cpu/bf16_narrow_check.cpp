// Every float, rounded to bfloat16 by the AVX512-BF16 kernels' conversion
// (VecIO::narrow in csrc/cpu/vec_math.h), against ATen's: the same bits for
// all 2^32 inputs. Built and run by tests/test_cpu_capabilities.py on CPUs
// with AVX512-BF16, with the flags and defines that variant compiles under.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cpu/vec_math.h"

int main() {
  using IO = gnflex::cpu::AVX512BF16::VecIO<c10::BFloat16>;
  using Vec = IO::Vec;
  constexpr int kLanes = Vec::size();
  alignas(64) uint32_t bits[2 * kLanes];
  alignas(64) uint16_t ours[2 * kLanes], aten[2 * kLanes], hardware[2 * kLanes];
  uint64_t mismatches = 0, hardware_differs = 0;
  for (uint64_t base = 0; base < (uint64_t{1} << 32); base += 2 * kLanes) {
    for (int j = 0; j < 2 * kLanes; ++j) bits[j] = static_cast<uint32_t>(base + j);
    const Vec lo = Vec::loadu(bits), hi = Vec::loadu(bits + kLanes);
    IO::narrow(lo, hi).store(ours);
    at::vec::convert_from_float<c10::BFloat16>(lo, hi).store(aten);
    _mm512_storeu_si512(hardware, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    if (std::memcmp(ours, aten, sizeof(ours)) != 0 && mismatches++ < 4) {
      std::printf("differs from ATen in the block at 0x%08llx\n", static_cast<unsigned long long>(base));
    }
    for (int j = 0; j < 2 * kLanes; ++j) hardware_differs += hardware[j] != aten[j];
  }
  // The second count shows the check can see a difference: the instruction
  // alone rounds the denormals and NaNs differently.
  std::printf("blocks differing from ATen: %llu; values the instruction alone rounds differently: %llu\n",
              static_cast<unsigned long long>(mismatches), static_cast<unsigned long long>(hardware_differs));
  return mismatches == 0 ? 0 : 1;
}
