// CUDA GroupNorm device code: how one launch sequences its phases. Each pass
// (forward, backward) is one kernel whose blocks take integer tickets in the
// order they start; a ticket names a phase ("stage") and a work block of it.
//
// Stages run in rounds: round r of a stage covers the same run of reduction
// domains (an (n, g) group channels-first, a sample channels-last) in every
// stage, and stage k starts `lag` rounds after stage k - 1. A block of stage
// k only waits for stage k - 1's results on its domains, written by blocks of
// lower tickets, which started before it and never wait for a higher ticket:
// no block waits on one that may not be resident (the forward-progress
// argument of decoupled look-back scans), so there is no cooperative launch
// and no co-residency assumption. The lag keeps a round's x in L2 between
// its statistics pass and its output pass.
//
// Domains signal through a persistent per-(device, stream) word buffer that
// every launch leaves as it found it (the last block resets it): arrival
// counters (the block that completes a domain merges it, in a fixed order),
// ready flags holding the launch's epoch + 1 (no reset needed), and the
// ticket and done counters. Nothing here depends on the GPU's SM count, so
// the work split and every merge order are the same on every GPU.
#pragma once

#include "group_norm_device.cuh"

#ifdef GNFLEX_CUDA_SIM
// The simulator: a wait that cannot be satisfied is reported (a block waiting
// on a later ticket, a deadlock on a GPU) instead of hanging.
#define GNFLEX_SPIN_UNTIL(condition) \
  ::cudasim::spin_until([&] { return static_cast<bool>(condition); }, __FILE__ ":" GNFLEX_STRINGIFY(__LINE__))
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#define GNFLEX_BACK_OFF() ((void)0)
#else
#define GNFLEX_BACK_OFF() __nanosleep(64)
#endif
#define GNFLEX_SPIN_UNTIL(condition) \
  do {                               \
    while (!(condition)) {           \
      GNFLEX_BACK_OFF();             \
    }                                \
  } while (0)
#endif

namespace gnflex {
namespace cuda {

constexpr int kMaxStages = 4;
constexpr int kMaxSegments = 2 * kMaxStages + 1;

// One phase of a launch: `blocks` work blocks, `per_round` of them per round
// (the blocks of one round's domains), from round `first_round` on; a
// reversed stage hands out each round's blocks last first (an output pass
// that re-reads from memory then starts with what its statistics read last,
// still in L2).
struct Stage {
  int64_t blocks = 0;
  int64_t per_round = 1;
  int64_t first_round = 0;
  bool reversed = false;
  __host__ __device__ int64_t rounds() const { return blocks == 0 ? 0 : (blocks + per_round - 1) / per_round; }
  __host__ __device__ int64_t end_round() const { return first_round + rounds(); }
};

// Rounds [first_round, first_round + rounds) in which the same stages are
// active (bit k: stage k): round_tickets tickets a round, from first_ticket.
struct Segment {
  int64_t first_ticket = 0, first_round = 0, rounds = 0, round_tickets = 0;
  unsigned active = 0;
};

struct Schedule {
  Stage stage[kMaxStages];
  Segment segment[kMaxSegments];
  int stages = 0;
  int segments = 0;
  int64_t tickets = 0;
};

// Ticket order: round by round; within a round, stage 0's blocks first.
inline void finish_schedule(Schedule& sc) {
  int64_t bounds[2 * kMaxStages];
  int nb = 0;
  for (int k = 0; k < sc.stages; ++k) {
    bounds[nb++] = sc.stage[k].first_round;
    bounds[nb++] = sc.stage[k].end_round();
  }
  std::sort(bounds, bounds + nb);
  nb = static_cast<int>(std::unique(bounds, bounds + nb) - bounds);
  sc.segments = 0;
  sc.tickets = 0;
  for (int i = 0; i + 1 < nb; ++i) {
    Segment seg;
    seg.first_round = bounds[i];
    seg.rounds = bounds[i + 1] - bounds[i];
    for (int k = 0; k < sc.stages; ++k) {
      const Stage& st = sc.stage[k];
      if (st.blocks > 0 && st.first_round <= seg.first_round && seg.first_round < st.end_round()) {
        seg.active |= 1u << k;
        seg.round_tickets += st.per_round;
      }
    }
    if (seg.active == 0) continue;
    seg.first_ticket = sc.tickets;
    sc.tickets += seg.rounds * seg.round_tickets;
    sc.segment[sc.segments++] = seg;
  }
}

// What a ticket is: block `block` of stage `stage`, or nothing (stage -1:
// a slot past a stage's last block in its last round).
struct Work {
  int stage;
  int64_t block;
};

__host__ __device__ inline Work locate(const Schedule& sc, int64_t ticket) {
  for (int i = 0; i < sc.segments; ++i) {
    const Segment& seg = sc.segment[i];
    const int64_t off = ticket - seg.first_ticket;
    if (off < 0 || off >= seg.rounds * seg.round_tickets) continue;
    const int64_t round = seg.first_round + off / seg.round_tickets;
    int64_t within = off % seg.round_tickets;
    for (int k = 0; k < sc.stages; ++k) {
      if (!((seg.active >> k) & 1u)) continue;
      const Stage& st = sc.stage[k];
      if (within < st.per_round) {
        const int64_t first = (round - st.first_round) * st.per_round;
        const int64_t count = st.blocks - first < st.per_round ? st.blocks - first : st.per_round;
        if (within >= count) return Work{-1, 0};
        return Work{k, st.reversed ? first + count - 1 - within : first + within};
      }
      within -= st.per_round;
    }
  }
  return Work{-1, 0};
}

// The persistent word buffer (32-bit words): ticket, done, a count of
// domains finished, the epoch (64 bits: it never wraps, so a flag left by an
// old launch never reads as ready), then per level an arrival counter per
// domain, then the 64-bit ready flags. The forward signals at level 0, the
// backward at levels 0 and 1; kBandLevel counts the arrivals at the bands
// of a domain (two-level merges; no ready flags).
// The places depend on the buffer's capacity only (a counter must never land
// where an earlier launch of another shape left a flag); a buffer is zeroed
// once, when allocated.
using Epoch = unsigned long long;
constexpr int kBandLevel = 2;

struct SequenceWords {
  static constexpr int64_t kHeader = 6;  // ticket, done, finished, padding, epoch (2 words)
  static constexpr int kLevels = 3;
  unsigned* words;
  int64_t capacity;  // domains per level

  // Words of the arrival counters, even so that the 64-bit flags align.
  __host__ __device__ static int64_t arrival_words(int64_t capacity) { return (kLevels * capacity + 1) / 2 * 2; }
  static int64_t size(int64_t capacity) { return kHeader + arrival_words(capacity) + 2 * kLevels * capacity; }
  __host__ __device__ unsigned* ticket() const { return words; }
  __host__ __device__ unsigned* done() const { return words + 1; }
  __host__ __device__ unsigned* finished() const { return words + 2; }
  __host__ __device__ Epoch* epoch() const { return reinterpret_cast<Epoch*>(words + 4); }
  __host__ __device__ unsigned* arrivals(int level, int64_t d) const { return words + kHeader + level * capacity + d; }
  __host__ __device__ Epoch* ready(int level, int64_t d) const {
    return reinterpret_cast<Epoch*>(words + kHeader + arrival_words(capacity)) + level * capacity + d;
  }
};

template <typename T>
__device__ __forceinline__ T load_volatile(const T* p) {
  return *static_cast<const volatile T*>(p);
}

// This block's ticket and the launch's epoch, in every thread.
struct Ticket {
  int64_t value;
  Epoch epoch;
};
__device__ inline Ticket take_ticket(const SequenceWords& sw) {
  __shared__ unsigned sh_ticket;
  __shared__ Epoch sh_epoch;
  if (threadIdx.x == 0) {
    sh_ticket = atomicAdd(sw.ticket(), 1u);
    sh_epoch = load_volatile(sw.epoch());
  }
  __syncthreads();
  const Ticket t{static_cast<int64_t>(sh_ticket), sh_epoch};
  __syncthreads();
  return t;
}

// One thread, after its team's results are written: counts an arrival at
// the domain's counter; true for the arrival that completes it (which resets
// the counter for the next launch and may read what the others wrote).
__device__ inline bool arrive(unsigned* counter, int64_t expected) {
  __threadfence();
  const unsigned old = atomicAdd(counter, 1u);
  const bool last = static_cast<int64_t>(old) + 1 == expected;
  if (last) {
    atomicExch(counter, 0u);
    __threadfence();
  }
  return last;
}

// A warp's arrival, counted by lane 0; true in every lane for the warp that
// completes the domain, lane 0's acquire then ordered before the other lanes'
// reads (a shuffle orders no memory).
__device__ __forceinline__ bool warp_arrive(unsigned* counter, int64_t expected) {
  bool last = false;
  if (threadIdx.x % 32 == 0) last = arrive(counter, expected);
  last = warp_broadcast(last);
  if (last) __syncwarp();
  return last;
}

// A block's arrival once all its threads' results are written, counted by
// thread 0; true in every thread for the block that completes the domain.
__device__ __forceinline__ bool block_arrive(unsigned* counter, int64_t expected) {
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) last = arrive(counter, expected);
  return block_broadcast(last);
}

// One thread, after the domain's results are written: marks it ready.
__device__ inline void publish(Epoch* flag, Epoch epoch) {
  __threadfence();
  atomicExch(flag, epoch + 1);
}

// One thread: waits until the domain is ready; its results may be read
// (through gload_l2) after this.
__device__ inline void wait_ready(const Epoch* flag, Epoch epoch) {
  GNFLEX_SPIN_UNTIL(load_volatile(flag) == epoch + 1);
  __threadfence();
}

// Every block at its end: the last one resets the buffer for the next launch.
__device__ inline void finish_block(const SequenceWords& sw, int64_t tickets, Epoch epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (static_cast<int64_t>(atomicAdd(sw.done(), 1u)) + 1 == tickets) {
      atomicExch(sw.ticket(), 0u);
      atomicExch(sw.done(), 0u);
      atomicExch(sw.finished(), 0u);
      __threadfence();
      atomicExch(sw.epoch(), epoch + 1);  // 64 bits: no wrap
    }
  }
}

}  // namespace cuda
}  // namespace gnflex
