// The kernel's shared memory, carved from one aligned dynamic allocation.
#pragma once

#include <cstdint>

#include "config.h"

namespace tmla {

struct Smem {
  uint8_t* q;          // [9 column blocks][64 rows][128 B], swizzled
  uint8_t* kv;         // [kStages][9 column blocks][64 tokens][128 B]
  uint8_t* p;          // [64 rows][64 tokens] T, swizzled
  float* row_scale;    // [64]: per-row rescale (per block) or 1/l (end)
  uint64_t* full;      // [kStages] mbarriers: stage loaded
  uint64_t* empty;     // [kStages] mbarriers: stage consumed

  static __device__ __forceinline__ Smem Carve(uint8_t* raw) {
    const uintptr_t base =
        (reinterpret_cast<uintptr_t>(raw) + config::kSmemAlign - 1) &
        ~static_cast<uintptr_t>(config::kSmemAlign - 1);
    uint8_t* s = reinterpret_cast<uint8_t*>(base);
    Smem m;
    m.q = s + config::kSmemQ;
    m.kv = s + config::kSmemKv;
    m.p = s + config::kSmemP;
    m.row_scale = reinterpret_cast<float*>(s + config::kSmemRowScale);
    m.full = reinterpret_cast<uint64_t*>(s + config::kSmemBarriers);
    m.empty = m.full + config::kStages;
    return m;
  }

  __device__ __forceinline__ uint8_t* Stage(int stage) const {
    return kv + stage * config::kStageBytes;
  }
};

// Position of a pipeline step: stage buffer and mbarrier phase parity.
__device__ __forceinline__ int StageOf(int block_counter) {
  return block_counter % config::kStages;
}
__device__ __forceinline__ uint32_t PhaseOf(int block_counter) {
  return (block_counter / config::kStages) & 1;
}

}  // namespace tmla
