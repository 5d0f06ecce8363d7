// The producer: one thread that walks its CTA's instructions and streams the
// paged K/V of every PARTIAL through the stage ring with TMA. It runs ahead
// of the consumers by up to kStages blocks, across instruction boundaries.
//
// A stage is refilled group by group as the consumers release it (the rope
// box after QK^T, each consumer's V boxes after its PV), rope box first:
// QK^T starts with it. The page ids of a block are read while the previous
// block still waits for its stage, so no dependent global read sits between
// a release and the copies that refill it.
#pragma once

#include <cuda.h>

#include "config.h"
#include "instruction.cuh"
#include "params.h"
#include "ptx.cuh"
#include "smem.cuh"

namespace tmla {

// The producer's position: block `block` of the PARTIAL at `index`.
struct LoadCursor {
  int index = -1;
  int block = 0;
  Instruction in{};
  KvRange range{0, 0, 0, 0};

  // Moves to the next block to load: the next one of this PARTIAL, else
  // block 0 of the next valid PARTIAL with tokens. False past the end.
  __device__ __forceinline__ bool Advance(const MlaDecodeParams& p) {
    if (++block < range.num_blocks) return true;
    while (++index < p.max_instructions) {
      in = Instruction::Fetch(p, blockIdx.x, index);
      if (in.opcode == isa::kOpStop) break;
      if (in.opcode != isa::kOpPartial || !in.Valid(p)) continue;
      range = KvRange::Of(in, p, config::kBlockTokens);
      block = 0;
      if (range.num_blocks > 0) return true;
    }
    index = p.max_instructions;
    return false;
  }
};

// The cache rows of one block's TMA chunks (the page ids read ahead).
struct BlockRows {
  static constexpr int kMaxChunks =
      config::kBlockTokens / config::kMinChunkTokens;
  int32_t page[kMaxChunks];
  int32_t loaded;  // chunks of the block inside the range
  int32_t start;   // first token of the block

  static __device__ __forceinline__ BlockRows Read(const MlaDecodeParams& p,
                                                   const LoadCursor& c) {
    BlockRows r;
    const int chunk = p.chunk_tokens;
    r.start = c.range.first + c.block * config::kBlockTokens;
    const int32_t* table =
        p.block_table + static_cast<int64_t>(c.in.batch) * p.max_pages;
    r.loaded = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k) {
      const int token = r.start + k * chunk;
      const bool live =
          k * chunk < config::kBlockTokens && token < c.range.hi;
      r.loaded += live;
      r.page[k] = live ? __ldg(table + token / p.page_size) : -1;
    }
    return r;
  }

  // Cache row of chunk k; out-of-range page ids read past the cache, where
  // TMA fills zeros.
  __device__ __forceinline__ int32_t Row(const MlaDecodeParams& p,
                                         int k) const {
    const int token = start + k * p.chunk_tokens;
    const int32_t id = page[k];
    return (id >= 0 && id < p.num_pages)
               ? id * p.page_size + token % p.page_size
               : p.num_pages * p.page_size;
  }
};

// Loads column blocks [box0, box0 + boxes) of one block into `stage`, each
// completing on its own full barrier.
__device__ __forceinline__ void LoadBoxes(const MlaDecodeParams& p,
                                          const CUtensorMap* kv_map,
                                          const LoadCursor& c,
                                          const BlockRows& rows,
                                          const Smem& smem, int stage,
                                          int box0, int boxes) {
  const int chunk = p.chunk_tokens;
  const uint32_t bytes = rows.loaded * chunk * config::kSwizzleBytes;
  uint8_t* dst_stage = smem.Stage(stage);
  for (int j = box0; j < box0 + boxes; ++j) {
    uint64_t* full = smem.Full(stage, j);
    ptx::MbarArriveExpectTx(full, bytes);
    uint8_t* dst = dst_stage + j * config::kKvColBlockBytes;
#pragma unroll
    for (int k = 0; k < BlockRows::kMaxChunks; ++k) {
      if (k >= rows.loaded) break;
      ptx::TmaLoad3d(dst + k * chunk * config::kSwizzleBytes, kv_map,
                     j * config::kColBlock, c.in.kv_head, rows.Row(p, k),
                     full);
    }
  }
}

// Asks L2 for every box of one block, ahead of its loads into a stage.
__device__ __forceinline__ void PrefetchBlock(const MlaDecodeParams& p,
                                              const CUtensorMap* kv_map,
                                              const LoadCursor& c,
                                              const BlockRows& rows) {
#pragma unroll
  for (int k = 0; k < BlockRows::kMaxChunks; ++k) {
    if (k >= rows.loaded) break;
    const int32_t row = rows.Row(p, k);
    for (int j = 0; j < config::kNumColBlocks; ++j) {
      ptx::TmaPrefetchL2(kv_map, j * config::kColBlock, c.in.kv_head, row);
    }
  }
}

__device__ __forceinline__ void RunProducer(const MlaDecodeParams& p,
                                            const CUtensorMap* kv_map,
                                            const Smem& smem) {
  ptx::PrefetchTensorMap(kv_map);
  LoadCursor cur;
  bool more = cur.Advance(p);
  BlockRows rows = more ? BlockRows::Read(p, cur) : BlockRows{};
  for (int block_counter = 0; more; ++block_counter) {
    LoadCursor next = cur;
    const bool more_next = next.Advance(p);
    const BlockRows rows_next =
        more_next ? BlockRows::Read(p, next) : BlockRows{};
    if (more_next) PrefetchBlock(p, kv_map, next, rows_next);
    const int stage = StageOf(block_counter);
    // The first pass over a stage finds it free (parity trick).
    const uint32_t free_parity = PhaseOf(block_counter) ^ 1;
    ptx::MbarWait(smem.Empty(stage, config::kRopeGroup), free_parity);
    LoadBoxes(p, kv_map, cur, rows, smem, stage, config::kRopeBox, 1);
    for (int c = 0; c < config::kNumConsumers; ++c) {
      ptx::MbarWait(smem.Empty(stage, config::kVGroup0 + c), free_parity);
      LoadBoxes(p, kv_map, cur, rows, smem, stage,
                c * config::kVBoxesPerConsumer, config::kVBoxesPerConsumer);
    }
    cur = next;
    rows = rows_next;
    more = more_next;
  }
}

}  // namespace tmla
