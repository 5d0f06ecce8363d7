// Named constants of the MLA decode megakernel and its shared-memory plan.
#pragma once

#include <cstdint>

#include "isa.h"

namespace tmla::config {

// Head dims the kernel is built for (DeepSeek MLA, absorbed form).
constexpr int kHeadDimV = isa::kHeadDimV;
constexpr int kRopeDim = isa::kRopeDim;
constexpr int kHeadDimQK = kHeadDimV + kRopeDim;

// Tiles: 64 query rows (one wgmma M) against 64 KV tokens per stage.
constexpr int kTileRows = isa::kTileRows;
// KV blocks of 64 tokens in 2 stages (32 tokens in 4 stages measured
// slower on W3, W4 and W6: see benchmarks/RESULTS.md).
constexpr int kBlockTokens = 64;
constexpr int kStages = 2;
// 128-byte swizzled column blocks of 64 bf16/fp16 elements.
constexpr int kColBlock = 64;
constexpr int kNumColBlocks = kHeadDimQK / kColBlock;  // 9
constexpr int kSwizzleBytes = 128;
constexpr int kSwizzleAtomBytes = 8 * kSwizzleBytes;  // 8 rows
// Smallest TMA box (tokens): pages are multiples of it.
constexpr int kMinChunkTokens = isa::kPageSizeMultiple;
constexpr int kMaxPageSize = isa::kMaxPageSize;

// Warp roles: warpgroup 0 loads (one thread issues TMA), warpgroups 1 and 2
// compute; consumer 0 also owns QK^T and the softmax, each consumer owns
// half of the 512 output columns.
constexpr int kWarpgroupThreads = 128;
constexpr int kNumConsumers = 2;
constexpr int kThreads = (1 + kNumConsumers) * kWarpgroupThreads;  // 384
constexpr int kConsumerThreads = kNumConsumers * kWarpgroupThreads;
constexpr int kColsPerConsumer = kHeadDimV / kNumConsumers;  // 256
// Registers per thread after setmaxnreg. The CTA starts with what the
// launch gave every thread (the 64K register file over kThreads, in units
// of 8), and the consumers' increase can only take what the producer's
// decrease handed back: asking for more blocks setmaxnreg.inc forever.
constexpr int kRegisterFile = 65536;
constexpr int kLaunchRegisters = kRegisterFile / kThreads / 8 * 8;  // 168
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
// With an FP8 cache the producer warpgroup also dequantizes (fp8_kv.cuh):
// it keeps more, for chunks converted side by side.
constexpr int kFp8ProducerRegisters = 56;
constexpr int kFp8ConsumerRegisters = 224;
constexpr bool RegisterSplitFits(int producer, int consumer) {
  return producer % 8 == 0 && consumer % 8 == 0 &&
         (kLaunchRegisters - producer) * kWarpgroupThreads >=
             (consumer - kLaunchRegisters) * kConsumerThreads;
}
// setmaxnreg counts registers in units of 8, and the consumers' registers
// must come from the producer's.
static_assert(RegisterSplitFits(kProducerRegisters, kConsumerRegisters) &&
                  RegisterSplitFits(kFp8ProducerRegisters,
                                    kFp8ConsumerRegisters),
              "register split");

// Kernel variants under measurement. Each macro defaults to the variant
// measured fastest; a build with TMLA_KERNEL_DEFINES="NAME=1" in its
// environment (CMakeLists.txt, benchmarks/kernel_test.sh) selects the other,
// and benchmarks/compare.sh times both in one call.
//  TMLA_SIGNAL_RELEASE: an instruction's signal is a barrier, then one
//    thread's release fence and relaxed add, instead of a device-scope fence
//    in every consumer thread before the barrier.
//  TMLA_SIGNAL_BEFORE_Q: a PARTIAL that signals leaves the next PARTIAL's
//    query tile to that PARTIAL instead of loading it under its own
//    epilogue, where the loads sit beside its stores and fence.
//  TMLA_REDUCE_BULK: a REDUCE's partial rows arrive in shared memory by
//    bulk copies, one per thread (ops/reduce.cuh, bulk).
//  TMLA_PV_ASYNC: with a 16-bit cache, when the next block has landed,
//    consumer 0 issues its QK^T before waiting for this block's P V (and
//    releasing its stage), so the two queue back to back on the tensor
//    cores.
//  TMLA_BOX_BARRIERS: with a 16-bit cache each of a stage's nine column
//    blocks lands on its own mbarrier (Smem::box_full), so consumer 0's
//    QK^T starts on the first to land and consumer 1 waits for its own V
//    columns only.
#ifndef TMLA_SIGNAL_RELEASE
#define TMLA_SIGNAL_RELEASE 0
#endif
#ifndef TMLA_SIGNAL_BEFORE_Q
#define TMLA_SIGNAL_BEFORE_Q 0
#endif
#ifndef TMLA_REDUCE_BULK
#define TMLA_REDUCE_BULK 0
#endif
#ifndef TMLA_BOX_BARRIERS
#define TMLA_BOX_BARRIERS 0
#endif
#ifndef TMLA_PV_ASYNC
#define TMLA_PV_ASYNC 0
#endif
constexpr bool kSignalRelease = TMLA_SIGNAL_RELEASE != 0;
constexpr bool kSignalBeforeQ = TMLA_SIGNAL_BEFORE_Q != 0;
constexpr bool kReduceBulk = TMLA_REDUCE_BULK != 0;
constexpr bool kBoxBarriers = TMLA_BOX_BARRIERS != 0;
constexpr bool kPvAsync = TMLA_PV_ASYNC != 0;
// Whether a kernel's stages use box_full (an FP8 cache's converter keeps
// completing `full`).
constexpr bool BoxBarriers(bool fp8) { return kBoxBarriers && !fp8; }

// Named barriers (0 is __syncthreads).
constexpr int kBarConsumers = 1;  // both consumer warpgroups
constexpr int kBarConsumer0 = 2;  // consumer warpgroup c uses 2 + c
constexpr int kBarConverters = 4;  // an FP8 cache's converter threads

// Shared memory plan (bytes from a 1024-byte aligned base).
// A column block: 64 columns (128 bytes, one swizzle row) of every row.
constexpr int kQColBlockBytes = kTileRows * kSwizzleBytes;      // 8 KB
constexpr int kKvColBlockBytes = kBlockTokens * kSwizzleBytes;  // 8 KB
constexpr int kQBytes = kNumColBlocks * kQColBlockBytes;        // 72 KB
constexpr int kStageBytes = kNumColBlocks * kKvColBlockBytes;   // 72 KB
// P: one 128-byte swizzled row (64 tokens) per query row.
constexpr int kPBytes = kTileRows * kSwizzleBytes;              // 8 KB
static_assert(kBlockTokens == 64, "QK^T is one m64n64 MMA per k-step");
constexpr int kSmemQ = 0;
constexpr int kSmemKv = kSmemQ + kQBytes;
constexpr int kSmemP = kSmemKv + kStages * kStageBytes;
constexpr int kSmemRowScale = kSmemP + kPBytes;
// mbarriers: full[kStages], empty[kStages], hand_full, hand_empty,
// raw[kStages] (an FP8 cache's boxes landed, before dequantization), merge
// (a REDUCE's bulk copies landed, TMLA_REDUCE_BULK), box_full[kStages]
// [kNumColBlocks] (a column block landed, TMLA_BOX_BARRIERS).
constexpr int kSmemBarriers = kSmemRowScale + kTileRows * 4;
constexpr int kNumMbarriers = 3 * kStages + 3 + kStages * kNumColBlocks;
// Where the producer's loads end, once it has issued its last one (int32,
// Smem::producer_done).
constexpr int kSmemProducerDone = kSmemBarriers + kNumMbarriers * 8;
// The next instruction's words, staged by consumer 0 during a PARTIAL.
constexpr int kSmemNext = (kSmemProducerDone + 4 + 15) / 16 * 16;
constexpr int kSmemUsed = kSmemNext + isa::kInstructionWords * 4;
constexpr int kSmemAlign = kSwizzleAtomBytes;
constexpr int kSmemBytes = kSmemUsed + kSmemAlign;
constexpr int kMaxSmemPerBlock = 232448;  // 227 KB opt-in limit of sm_90
static_assert(kSmemBytes <= kMaxSmemPerBlock, "shared memory plan too big");
static_assert(kSmemKv == kSmemQ + kQBytes,
              "the query tile's buffer and the stages are one run of bytes");
static_assert(kSmemNext % 16 == 0,
              "cp.async stages the next instruction's words in 16-byte pieces");
static_assert(kSmemKv % kSwizzleAtomBytes == 0 &&
                  kSmemP % kSwizzleAtomBytes == 0 &&
                  kStageBytes % kSwizzleAtomBytes == 0,
              "swizzled buffers must be 1024-byte aligned");

}  // namespace tmla::config
