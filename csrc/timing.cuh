// Per-instruction timestamps of the opt-in timed kernel build. With
// kEnabled false every member is empty and compiles to nothing.
#pragma once

#include <cstdint>

#include "isa.h"
#include "params.h"

namespace tmla {

__device__ __forceinline__ int64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
}

template <bool kEnabled>
struct Marks {
  int64_t start = 0;
  int64_t ready = 0;
  int64_t computed = 0;

  __device__ __forceinline__ void Start() {
    if constexpr (kEnabled) start = ready = computed = GlobalTimerNs();
  }
  __device__ __forceinline__ void Ready() {
    if constexpr (kEnabled) ready = GlobalTimerNs();
  }
  __device__ __forceinline__ void Computed() {
    if constexpr (kEnabled) computed = GlobalTimerNs();
  }

  // Writes the record of instruction `index` (called by one thread).
  __device__ __forceinline__ void Store(const MlaDecodeParams& p,
                                        int index, int opcode) const {
    if constexpr (kEnabled) {
      int32_t* r = Record(p, index);
      const int64_t end = GlobalTimerNs();
      r[isa::kTimingOpcode] = opcode;
      Put(r + isa::kTimingStart, start);
      Put(r + isa::kTimingReady, ready);
      Put(r + isa::kTimingComputed, computed);
      Put(r + isa::kTimingEnd, end);
    }
  }

  // Zeroes the records of slots [from, max_instructions) of this CTA.
  __device__ __forceinline__ void ClearFrom(const MlaDecodeParams& p,
                                            int from) const {
    if constexpr (kEnabled) {
      for (int i = from; i < p.max_instructions; ++i) {
        int32_t* r = Record(p, i);
        for (int w = 0; w < isa::kTimingWords; ++w) r[w] = 0;
      }
    }
  }

 private:
  static __device__ __forceinline__ int32_t* Record(const MlaDecodeParams& p,
                                                    int index) {
    return p.timings + (static_cast<int64_t>(blockIdx.x) * p.max_instructions +
                        index) * isa::kTimingWords;
  }
  static __device__ __forceinline__ void Put(int32_t* at, int64_t t) {
    at[0] = static_cast<int32_t>(t & 0xFFFFFFFF);
    at[1] = static_cast<int32_t>(t >> 32);
  }
};

}  // namespace tmla
