// The FP8 KV cache (isa.h's 656-byte entry) on the device: how a block of
// it lands in a K/V stage and how it becomes the bf16 stage the consumers
// read.
//
// Per block, the producer's TMA brings the four 128-value latent groups of
// every token as four 8 KB boxes of e4m3 bytes (64 tokens x 128 bytes,
// 128-byte swizzled) into the stage's column blocks 4-7, the bf16 rope
// values straight into column block 8, where the consumers read them, and
// the tokens' scales (16 bytes each, unswizzled) to the start of column
// block 3; all complete on the stage's `raw` mbarrier. The converter (warps
// 2-3 of the producer warpgroup, one thread per token row) reads its
// token's scales, meets the others at a named barrier (column block 3 is
// overwritten next), writes each token's 512 latent values as bf16, value *
// its group's scale, into column blocks 0-7 (the layout of a bf16 cache's
// stage) and arrives on `full`, each thread for its own writes.
//
// In place without a barrier: token row r's e4m3 group g is row r of
// column block 4 + g, which is part of row r's own bf16 footprint (row r of
// every column block), so each thread reads and writes only its own row.
// It writes column block j = 0..7 in order from group j / 2: column block
// 4 + g is overwritten only after group g was read (j = 2g + 1 < 4 + g for
// g < 3), and group 3's column block 7, written last, from its own chunks
// 4-7 in an order that reads each chunk before any write lands on it.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "config.h"
#include "instruction.cuh"
#include "isa.h"
#include "params.h"
#include "ptx.cuh"
#include "smem.cuh"

namespace tmla::fp8 {

// Latent groups of one scale each; each is one 128-byte TMA box row.
constexpr int kGroups = isa::kFp8NumScales;
static_assert(isa::kFp8ScaleGroup == config::kSwizzleBytes,
              "an e4m3 group is one 128-byte swizzled row of a box");
static_assert(kGroups * isa::kFp8ScaleGroup == config::kHeadDimV,
              "the groups cover the latent values");
static_assert(isa::kFp8RopeOffset + config::kRopeDim * 2 ==
                  isa::kFp8EntryBytes,
              "the rope box ends the entry");
// Column block of the stage where group g's box lands: the upper half of
// the latent column blocks.
constexpr int kLatentColBlocks = config::kHeadDimV / config::kColBlock;  // 8
constexpr int kStagingColBlock = kLatentColBlocks - kGroups;            // 4
constexpr int kRopeColBlock = kLatentColBlocks;                         // 8
// Column block whose first bytes hold the block's scales until converted.
constexpr int kScaleColBlock = kStagingColBlock - 1;                     // 3
constexpr int kScaleBytes = kGroups * 4;  // per token
static_assert(isa::kFp8ScalesOffset == kGroups * isa::kFp8ScaleGroup &&
                  config::kBlockTokens * kScaleBytes <=
                      config::kKvColBlockBytes,
              "a block's scales fit the start of one column block");
// 128-byte boxes per chunk of tokens: the latent groups and the rope.
constexpr int kBoxes = kGroups + 1;
// Converter threads: one per token row of a block, warps 2-3 of the
// producer warpgroup (warp 0's lane 0 issues the TMA).
constexpr int kConverterThreads = config::kBlockTokens;
constexpr int kFirstConverterThread =
    config::kWarpgroupThreads - kConverterThreads;
static_assert(kFirstConverterThread >= 32,
              "the converter leaves warp 0 to the TMA thread");

// The producer's part: expects the block's bytes on `raw` and issues its
// boxes (chunks of the block inside the range).
__device__ __forceinline__ void LoadBlock(const MlaDecodeParams& p,
                                          const CUtensorMap* kv_map,
                                          const CUtensorMap* scale_map,
                                          const Instruction& in,
                                          const int32_t* row, int loaded,
                                          const Smem& smem, int stage,
                                          uint64_t policy) {
  const int chunk = p.chunk_tokens;
  const uint32_t bytes =
      loaded * chunk * (kBoxes * config::kSwizzleBytes + kScaleBytes);
  ptx::MbarArriveExpectTx(&smem.raw[stage], bytes);
  uint8_t* dst_stage = smem.Stage(stage);
  constexpr int kMaxChunks = config::kBlockTokens / config::kMinChunkTokens;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    if (c >= loaded) break;
    uint8_t* dst = dst_stage + c * chunk * config::kSwizzleBytes;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      ptx::TmaLoad3d(dst + (kStagingColBlock + g) * config::kKvColBlockBytes,
                     kv_map, g * isa::kFp8ScaleGroup, in.kv_head, row[c],
                     &smem.raw[stage], policy);
    }
    ptx::TmaLoad3d(dst + kRopeColBlock * config::kKvColBlockBytes, kv_map,
                   isa::kFp8RopeOffset, in.kv_head, row[c], &smem.raw[stage],
                   policy);
    ptx::TmaLoad3d(dst_stage + kScaleColBlock * config::kKvColBlockBytes +
                       c * chunk * kScaleBytes,
                   scale_map, isa::kFp8ScalesOffset, in.kv_head, row[c],
                   &smem.raw[stage], policy);
  }
}

// Sixteen e4m3 values (a 16-byte chunk) times `scale`, as sixteen bf16
// (two chunks). Each value is widened exactly to float32, multiplied and
// rounded once to bf16, as dequantize_kv computes it. Exact for any scale,
// but its conversions run at an eighth of the FMA rate: the general path.
__device__ __forceinline__ void Dequantize16(const uint4& in, float scale,
                                             uint4& lo, uint4& hi) {
  const uint32_t w[4] = {in.x, in.y, in.z, in.w};
  uint32_t out[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(
        (k % 2 ? w[k / 2] >> 16 : w[k / 2]) & 0xFFFF);
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    const __nv_bfloat162 b =
        __floats2bfloat162_rn(f.x * scale, f.y * scale);
    out[k] = *reinterpret_cast<const uint32_t*>(&b);
  }
  lo = make_uint4(out[0], out[1], out[2], out[3]);
  hi = make_uint4(out[4], out[5], out[6], out[7]);
}

// The fast path's scale operand: scale * 2^120 in both halves of a bf16x2
// when scale is a power of two in [2^-117, 2^7] (what quantize_kv writes),
// else 0 (the general path). Then every e4m3 value times scale is a bf16
// (3 mantissa bits, exponent in range), so one bf16 multiply is exact.
__device__ __forceinline__ uint32_t FastScale(float scale) {
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t exponent = bits >> 23;  // sign 0 for a positive scale
  if ((bits & 0x7FFFFFu) != 0 || exponent < 127 - 117 || exponent > 127 + 7) {
    return 0;
  }
  const uint32_t bf16 = (exponent + 120) << 7;
  return bf16 | bf16 << 16;
}

// The fast path: sixteen e4m3 values as bf16 by bit moves and one bf16x2
// multiply per pair. An e4m3 byte s.eeee.mmm placed as bf16 bits
// s.0000eeee.mmm0000 is its value times 2^-120 (its subnormals become
// bf16 subnormals of the same scale), so multiplying by scale * 2^120
// gives value * scale exactly. Returns false, writing nothing, if a byte is
// an e4m3 NaN (low 7 bits all ones), which this encoding would not keep.
__device__ __forceinline__ bool Dequantize16Fast(const uint4& in,
                                                 uint32_t scale2, uint4& lo,
                                                 uint4& hi) {
  const uint32_t w[4] = {in.x, in.y, in.z, in.w};
  uint32_t nan = 0;
  uint32_t out[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    nan |= ((w[k] & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // Bytes 2 half and 2 half + 1 at bits 8-15 of the two 16-bit lanes.
      const uint32_t h = __byte_perm(w[k], 0, half ? 0x3424 : 0x1404);
      const uint32_t bits = (h & 0x80008000u) | ((h >> 4) & 0x07F007F0u);
      const __nv_bfloat162 v =
          __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&bits),
                  *reinterpret_cast<const __nv_bfloat162*>(&scale2));
      out[2 * k + half] = *reinterpret_cast<const uint32_t*>(&v);
    }
  }
  lo = make_uint4(out[0], out[1], out[2], out[3]);
  hi = make_uint4(out[4], out[5], out[6], out[7]);
  return nan == 0;
}

// Token row r's 512 latent values: e4m3 in column blocks 4-7 -> bf16 in
// column blocks 0-7 (order: see the top of this file). Two 16-byte chunks
// at a time, their loads and conversions side by side (one thread's chain
// of dependent operations is what bounds the conversion); the general path
// takes a pair only when the fast one cannot.
__device__ __forceinline__ void DequantizeRow(uint8_t* stage, int r,
                                              const float (&scale)[kGroups]) {
  constexpr int kChunks = config::kSwizzleBytes / 16;  // 8 per row
  constexpr int kInPerOut = kChunks / 2;  // e4m3 chunks per bf16 row
  constexpr int kSideBySide = 2;
  static_assert(kInPerOut % kSideBySide == 0, "whole pairs");
#pragma unroll 1
  for (int j = 0; j < kLatentColBlocks; ++j) {
    const int g = j / 2;
    // A select, not scale[g]: a dynamic index would put scale in local
    // memory.
    const float s = g == 0 ? scale[0]
                  : g == 1 ? scale[1]
                  : g == 2 ? scale[2]
                           : scale[3];
    const uint32_t scale2 = FastScale(s);
    const uint8_t* src =
        stage + (kStagingColBlock + g) * config::kKvColBlockBytes;
    uint8_t* dst = stage + j * config::kKvColBlockBytes;
#pragma unroll
    for (int q = 0; q < kInPerOut; q += kSideBySide) {
      const int k = (j % 2) * kInPerOut + q;  // e4m3 chunk of the group
      // Both chunks are read before any of the pair's writes, which land
      // on chunks 2 q .. 2 q + 3 (the in-place order above holds).
      uint4 v[kSideBySide];
#pragma unroll
      for (int c = 0; c < kSideBySide; ++c) {
        v[c] = *reinterpret_cast<const uint4*>(src + ptx::Swizzle128(r, k + c));
      }
      uint4 lo[kSideBySide], hi[kSideBySide];
      bool fast = scale2 != 0;
#pragma unroll
      for (int c = 0; c < kSideBySide; ++c) {
        fast &= Dequantize16Fast(v[c], scale2, lo[c], hi[c]);
      }
      if (!fast) {
#pragma unroll
        for (int c = 0; c < kSideBySide; ++c) Dequantize16(v[c], s, lo[c], hi[c]);
      }
#pragma unroll
      for (int c = 0; c < kSideBySide; ++c) {
        *reinterpret_cast<uint4*>(dst + ptx::Swizzle128(r, 2 * (q + c))) =
            lo[c];
        *reinterpret_cast<uint4*>(dst + ptx::Swizzle128(r, 2 * (q + c) + 1)) =
            hi[c];
      }
    }
  }
}

// Token row r's scales, landed by TMA at the start of column block 3 (zero
// for a chunk of an invalid page, which TMA zero-filled). A non-finite
// scale makes its whole group NaN, as dequantize_kv reads it.
__device__ __forceinline__ void ReadScales(const uint8_t* stage, int r,
                                           float (&scale)[kGroups]) {
  static_assert(kGroups == 4, "a token's scales are one float4");
  const float4 s = *reinterpret_cast<const float4*>(
      stage + kScaleColBlock * config::kKvColBlockBytes + r * kScaleBytes);
  const float v[kGroups] = {s.x, s.y, s.z, s.w};
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    scale[g] = isfinite(v[g]) ? v[g] : NAN;
  }
}

// The converter: walks the CTA's instructions as the producer does and
// dequantizes every block it loaded, one token row per thread (`r`).
__device__ __forceinline__ void RunConverter(const MlaDecodeParams& p,
                                             const Smem& smem, int r) {
  // Row r lies in the TMA chunk of rows [r_chunk, r_chunk + chunk_tokens)
  // of each block (chunk_tokens divides 64: a power of two).
  const int r_chunk = r & ~(p.chunk_tokens - 1);
  int block_counter = 0;
  for (int i = 0; i < p.max_instructions; ++i) {
    const Instruction in = Instruction::Fetch(p, blockIdx.x, i);
    if (in.opcode == isa::kOpStop) break;
    if (in.opcode != isa::kOpPartial || !in.Valid(p)) continue;
    const KvRange range = KvRange::Of(in, p, config::kBlockTokens);
    for (int b = 0; b < range.num_blocks; ++b, ++block_counter) {
      const int stage = StageOf(block_counter);
      // The chunk was loaded when its first token is inside the range
      // (BlockRows::Read).
      const bool loaded =
          range.first + b * config::kBlockTokens + r_chunk < range.hi;
      ptx::MbarWait(&smem.raw[stage], PhaseOf(block_counter));
      // Implied by raw (the producer waited for it before its copies), and
      // said here so that the consumers' last writes to the stage are seen
      // ordered before this thread's.
      ptx::MbarWait(&smem.empty[stage], PhaseOf(block_counter) ^ 1);
      uint8_t* kv = smem.Stage(stage);
      float scale[kGroups];
      ReadScales(kv, r, scale);
      // Every row's scales are read before column block 3 is written.
      ptx::BarSync(config::kBarConverters, kConverterThreads);
      if (loaded) DequantizeRow(kv, r, scale);
      // The consumers' wgmma (async proxy) reads what this thread wrote.
      ptx::FenceProxyAsync();
      ptx::MbarArrive(&smem.full[stage]);
    }
  }
}

}  // namespace tmla::fp8
