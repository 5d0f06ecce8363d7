// The producer: one thread that walks its CTA's instructions and streams the
// paged K/V of every PARTIAL through the stage ring with TMA. It runs ahead
// of the consumers by up to kStages blocks, across instruction boundaries.
// A block's page ids are read before the producer waits for its stage, and
// the next instruction's words before the current one's blocks, so no
// dependent global read sits between a stage's release and its refill.
#pragma once

#include <cuda.h>

#include "config.h"
#include "fp8_kv.cuh"
#include "instruction.cuh"
#include "params.h"
#include "ptx.cuh"
#include "smem.cuh"

namespace tmla {

// The cache rows of one block's TMA chunks, read ahead of its copies.
struct BlockRows {
  static constexpr int kMaxChunks =
      config::kBlockTokens / config::kMinChunkTokens;
  int32_t row[kMaxChunks];
  int32_t loaded;  // chunks of the block inside the range

  static __device__ __forceinline__ BlockRows Read(const MlaDecodeParams& p,
                                                   const Instruction& in,
                                                   const KvRange& range,
                                                   int block) {
    const int chunk = p.chunk_tokens;
    const int block_start = range.first + block * config::kBlockTokens;
    const int32_t* table =
        p.block_table + static_cast<int64_t>(in.batch) * p.max_pages;
    const int32_t oob_row = p.num_pages * p.page_size;  // TMA zero-fills
    BlockRows r;
    r.loaded = 0;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int token = block_start + c * chunk;
      const bool live = c * chunk < config::kBlockTokens && token < range.hi;
      r.loaded += live;
      const int32_t page = live ? __ldg(table + token / p.page_size) : -1;
      r.row[c] = (page >= 0 && page < p.num_pages)
                     ? page * p.page_size + token % p.page_size
                     : oob_row;
    }
    return r;
  }
};

__device__ __forceinline__ void LoadBlock(const MlaDecodeParams& p,
                                          const CUtensorMap* kv_map,
                                          const Instruction& in,
                                          const BlockRows& rows,
                                          const Smem& smem, int stage,
                                          uint64_t policy) {
  const int chunk = p.chunk_tokens;
  if constexpr (config::BoxBarriers(false)) {
    // Column block by column block, each on its own barrier.
    uint8_t* dst_stage = smem.Stage(stage);
    const uint32_t box_bytes = rows.loaded * chunk * config::kSwizzleBytes;
#pragma unroll 1
    for (int j = 0; j < config::kNumColBlocks; ++j) {
      uint64_t* bar = smem.BoxFull(stage, j);
      ptx::MbarArriveExpectTx(bar, box_bytes);
#pragma unroll
      for (int c = 0; c < BlockRows::kMaxChunks; ++c) {
        if (c >= rows.loaded) break;
        ptx::TmaLoad3d(dst_stage + c * chunk * config::kSwizzleBytes +
                           j * config::kKvColBlockBytes,
                       kv_map, j * config::kColBlock, in.kv_head, rows.row[c],
                       bar, policy);
      }
    }
    return;
  }
  const uint32_t bytes =
      rows.loaded * config::kNumColBlocks * chunk * config::kSwizzleBytes;
  ptx::MbarArriveExpectTx(&smem.full[stage], bytes);
  uint8_t* dst_stage = smem.Stage(stage);
#pragma unroll
  for (int c = 0; c < BlockRows::kMaxChunks; ++c) {
    if (c >= rows.loaded) break;
    uint8_t* dst = dst_stage + c * chunk * config::kSwizzleBytes;
#pragma unroll
    for (int j = 0; j < config::kNumColBlocks; ++j) {
      ptx::TmaLoad3d(dst + j * config::kKvColBlockBytes, kv_map,
                     j * config::kColBlock, in.kv_head, rows.row[c],
                     &smem.full[stage], policy);
    }
  }
}

// The L2 policy of the K/V stream: a sequence read by one query tile is
// read once per call, so its lines go first (the partials and the table
// stay); with several tiles per sequence the tiles share its lines.
__device__ __forceinline__ uint64_t KvPolicy(const MlaDecodeParams& p) {
  const bool one_tile = p.s_q * (p.h_q / p.h_kv) <= config::kTileRows;
  return one_tile ? ptx::PolicyEvictFirst() : ptx::PolicyEvictNormal();
}

// kFp8: the cache is FP8 (fp8_kv.cuh): its boxes land on the stage's raw
// barrier and the converter completes `full`.
template <bool kFp8>
__device__ __forceinline__ void RunProducer(const MlaDecodeParams& p,
                                            const KvMaps* maps,
                                            const Smem& smem) {
  const CUtensorMap* kv_map = &maps->kv;
  ptx::PrefetchTensorMap(kv_map);
  if constexpr (kFp8) ptx::PrefetchTensorMap(&maps->scales);
  const uint64_t policy = KvPolicy(p);
  int block_counter = 0;
  int last_loaded = -1;  // list position of the last PARTIAL loaded
  Instruction in = Instruction::Fetch(p, blockIdx.x, 0);
  for (int i = 0; i < p.max_instructions; ++i) {
    if (in.opcode == isa::kOpStop) break;
    const Instruction next = Instruction::Fetch(
        p, blockIdx.x, i + 1 < p.max_instructions ? i + 1 : i);
    if (in.opcode == isa::kOpPartial && in.Valid(p)) {
      last_loaded = i;
      const KvRange range = KvRange::Of(in, p, config::kBlockTokens);
      for (int b = 0; b < range.num_blocks; ++b, ++block_counter) {
        const int stage = StageOf(block_counter);
        const BlockRows rows = BlockRows::Read(p, in, range, b);
        // The first pass over a stage finds it free (parity trick).
        ptx::MbarWait(&smem.empty[stage], PhaseOf(block_counter) ^ 1);
        if constexpr (kFp8) {
          fp8::LoadBlock(p, kv_map, &maps->scales, in, rows.row, rows.loaded,
                         smem, stage, policy);
        } else {
          LoadBlock(p, kv_map, in, rows, smem, stage, policy);
        }
      }
    }
    in = next;
  }
  // No load follows (ops/reduce.cuh's bulk REDUCE may then use the stages).
  if constexpr (config::kReduceBulk) {
    *reinterpret_cast<volatile int32_t*>(smem.producer_done) = last_loaded + 2;
  }
}

}  // namespace tmla
