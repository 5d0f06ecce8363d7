// The producer: one thread that walks its CTA's instructions and streams the
// paged K/V of every PARTIAL through the stage ring with TMA. It runs ahead
// of the consumers by up to kStages blocks, across instruction boundaries.
#pragma once

#include <cuda.h>

#include "config.h"
#include "instruction.cuh"
#include "params.h"
#include "ptx.cuh"
#include "smem.cuh"

namespace tmla {

__device__ __forceinline__ void LoadBlock(const MlaDecodeParams& p,
                                          const CUtensorMap* kv_map,
                                          const Instruction& in,
                                          const KvRange& range, int block,
                                          const Smem& smem, int stage) {
  const int chunk = p.chunk_tokens;
  const int chunks = config::kBlockTokens / chunk;
  const int block_start = range.first + block * config::kBlockTokens;
  int loaded = 0;
  for (int c = 0; c < chunks; ++c) loaded += block_start + c * chunk < range.hi;
  const uint32_t bytes =
      loaded * config::kNumColBlocks * chunk * config::kSwizzleBytes;
  ptx::MbarArriveExpectTx(&smem.full[stage], bytes);

  const int32_t* table = p.block_table + static_cast<int64_t>(in.batch) *
                                             p.max_pages;
  const int32_t oob_row = p.num_pages * p.page_size;  // TMA zero-fills
  uint8_t* dst_stage = smem.Stage(stage);
  for (int c = 0; c < loaded; ++c) {
    const int token = block_start + c * chunk;
    const int32_t page = __ldg(table + token / p.page_size);
    const int32_t row = (page >= 0 && page < p.num_pages)
                            ? page * p.page_size + token % p.page_size
                            : oob_row;
    uint8_t* dst = dst_stage + c * chunk * config::kSwizzleBytes;
#pragma unroll
    for (int j = 0; j < config::kNumColBlocks; ++j) {
      ptx::TmaLoad3d(dst + j * config::kKvColBlockBytes, kv_map,
                     j * config::kColBlock, in.kv_head, row,
                     &smem.full[stage]);
    }
  }
}

__device__ __forceinline__ void RunProducer(const MlaDecodeParams& p,
                                            const CUtensorMap* kv_map,
                                            const Smem& smem) {
  ptx::PrefetchTensorMap(kv_map);
  int block_counter = 0;
  for (int i = 0; i < p.max_instructions; ++i) {
    const Instruction in = Instruction::Fetch(p, blockIdx.x, i);
    if (in.opcode == isa::kOpStop) break;
    if (in.opcode != isa::kOpPartial || !in.Valid(p)) continue;
    const KvRange range = KvRange::Of(in, p, config::kBlockTokens);
    for (int b = 0; b < range.num_blocks; ++b, ++block_counter) {
      const int stage = StageOf(block_counter);
      // The first pass over a stage finds it free (parity trick).
      ptx::MbarWait(&smem.empty[stage], PhaseOf(block_counter) ^ 1);
      LoadBlock(p, kv_map, in, range, b, smem, stage);
    }
  }
}

}  // namespace tmla
