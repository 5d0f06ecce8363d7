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
  // The P / row_scale hand-off from consumer 0 to consumer 1, one round per
  // KV block and one per PARTIAL epilogue.
  uint64_t* hand_full;   // consumer 0 wrote P and row_scale (128 arrivals)
  uint64_t* hand_empty;  // consumer 1 is done with them (128 arrivals)
  // An FP8 cache's e4m3 and rope boxes landed in the stage (fp8_kv.cuh);
  // `full` then follows the dequantization.
  uint64_t* raw;         // [kStages]
  // A REDUCE's bulk copies landed (ops/reduce.cuh, bulk); one phase per
  // round of copies.
  uint64_t* merge;
  // [kStages][kNumColBlocks]: a stage's column block landed (a 16-bit cache
  // with TMLA_BOX_BARRIERS; `full` is then unused).
  uint64_t* box_full;
  // 0 while the producer runs; once it has issued its last load, 2 + the
  // list position of the last PARTIAL it loaded (1 if none). Past that
  // position, once the consumers are done with its blocks, the stages stay
  // free.
  int32_t* producer_done;
  int32_t* next;         // [16]: words of the CTA's next instruction

  // `raw` is the dynamic shared array itself; offsetting it (rather than
  // rebuilding a pointer from an integer) keeps the shared state space
  // visible to the compiler, so accesses compile to LDS/STS.
  static __device__ __forceinline__ Smem Carve(uint8_t* raw) {
    const uint32_t misalign = static_cast<uint32_t>(
        __cvta_generic_to_shared(raw)) & (config::kSmemAlign - 1);
    uint8_t* s = raw + ((config::kSmemAlign - misalign) &
                        (config::kSmemAlign - 1));
    Smem m;
    m.q = s + config::kSmemQ;
    m.kv = s + config::kSmemKv;
    m.p = s + config::kSmemP;
    m.row_scale = reinterpret_cast<float*>(s + config::kSmemRowScale);
    m.full = reinterpret_cast<uint64_t*>(s + config::kSmemBarriers);
    m.empty = m.full + config::kStages;
    m.hand_full = m.empty + config::kStages;
    m.hand_empty = m.hand_full + 1;
    m.raw = m.hand_empty + 1;
    m.merge = m.raw + config::kStages;
    m.box_full = m.merge + 1;
    m.producer_done = reinterpret_cast<int32_t*>(s + config::kSmemProducerDone);
    m.next = reinterpret_cast<int32_t*>(s + config::kSmemNext);
    return m;
  }

  __device__ __forceinline__ uint8_t* Stage(int stage) const {
    return kv + stage * config::kStageBytes;
  }

  __device__ __forceinline__ uint64_t* BoxFull(int stage, int col_block) const {
    return box_full + stage * config::kNumColBlocks + col_block;
  }
};

// A consumer's position in its two rings: KV blocks consumed, and P
// hand-off rounds (identical in both consumers, which walk the same list).
struct Pipeline {
  int block_counter;
  int round;
};

// Position of a pipeline step: stage buffer and mbarrier phase parity.
__device__ __forceinline__ int StageOf(int block_counter) {
  return block_counter % config::kStages;
}
__device__ __forceinline__ uint32_t PhaseOf(int block_counter) {
  return (block_counter / config::kStages) & 1;
}

}  // namespace tmla
