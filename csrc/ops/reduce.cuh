// REDUCE: the LSE-weighted merge of partials (fp32 slots, base-2 LSE) into
// the final output or another slot, by both consumers (256 threads) with
// no shared memory and no barrier: each thread owns one float4 column of
// half the rows and merges four rows x four inputs at a time with a running
// max, issuing the batch's 16 loads before its arithmetic, and the
// column-0 threads write the rows' LSEs. Partials are read through L2
// (ld.global.cg), never a stale L1 line.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.h"
#include "../instruction.cuh"
#include "../params.h"
#include "partial.cuh"

namespace tmla::ops {

template <typename T>
__device__ __forceinline__ void StoreReduced(const MlaDecodeParams& p,
                                             const Instruction& in, int r,
                                             int col, float4 v) {
  if (in.dst_slot == isa::kFinalOutput) {
    const RowMap map{p.h_q / p.h_kv};
    const int64_t row =
        (static_cast<int64_t>(in.batch) * p.s_q + map.Token(in, r)) * p.h_q +
        map.Head(in, r);
    uint2 packed;
    packed.x = Pack2<T>::Of(v.x, v.y);
    packed.y = Pack2<T>::Of(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<T*>(p.out) +
                              row * config::kHeadDimV + col) = packed;
  } else {
    *reinterpret_cast<float4*>(
        p.partial_o +
        (static_cast<int64_t>(in.dst_slot) * config::kTileRows + r) *
            config::kHeadDimV + col) = v;
  }
}

// Running LSE-weighted merge of one row's float4 column, base 2. Branch
// free; an input that saw no key (LSE -inf, output 0) adds nothing.
struct Merge {
  float m = -INFINITY;
  float sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);

  __device__ __forceinline__ void Add(float lse, const float4& v) {
    const float next = fmaxf(m, lse);
    const float base = next == -INFINITY ? 0.f : next;
    const float scale = exp2f(m - base);
    const float w = exp2f(lse - base);
    sum = sum * scale + w;
    acc = make_float4(acc.x * scale + w * v.x, acc.y * scale + w * v.y,
                      acc.z * scale + w * v.z, acc.w * scale + w * v.w);
    m = next;
  }

  __device__ __forceinline__ float4 Value() const {
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    return make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }

  __device__ __forceinline__ float Lse2() const {
    return sum > 0.f ? m + log2f(sum) : -INFINITY;
  }
};

template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, int consumer,
                                       int thread_in_wg) {
  constexpr int kVecPerRow = config::kHeadDimV / 4;                 // 128
  constexpr int kRowGroups = config::kConsumerThreads / kVecPerRow;  // 2
  constexpr int kRowsAtOnce = 4;
  constexpr int kInputsAtOnce = 4;
  constexpr int64_t kSlotStride =
      static_cast<int64_t>(config::kTileRows) * config::kHeadDimV;
  const int t = consumer * config::kWarpgroupThreads + thread_in_wg;
  const int col = (t % kVecPerRow) * 4;
  const int num_src = in.arg1;
  const float* o_base = p.partial_o +
                        static_cast<int64_t>(in.arg0) * kSlotStride + col;
  const float* lse_base =
      p.partial_lse + static_cast<int64_t>(in.arg0) * config::kTileRows;
  for (int r0 = (t / kVecPerRow) * kRowsAtOnce; r0 < in.num_rows;
       r0 += kRowGroups * kRowsAtOnce) {
    Merge merge[kRowsAtOnce];
    const int rows = min(kRowsAtOnce, in.num_rows - r0);
    for (int i0 = 0; i0 < num_src; i0 += kInputsAtOnce) {
      // All loads of the batch first, then the arithmetic: up to 16
      // independent float4 loads in flight per thread.
      float lse[kInputsAtOnce][kRowsAtOnce];
      float4 v[kInputsAtOnce][kRowsAtOnce];
#pragma unroll
      for (int j = 0; j < kInputsAtOnce; ++j) {
#pragma unroll
        for (int k = 0; k < kRowsAtOnce; ++k) {
          const bool live = i0 + j < num_src && k < rows;
          const int i = live ? i0 + j : 0;
          const int r = live ? r0 + k : 0;
          lse[j][k] = live ? __ldcg(lse_base + i * config::kTileRows + r)
                           : -INFINITY;
          v[j][k] = live ? __ldcg(reinterpret_cast<const float4*>(
                               o_base + i * kSlotStride +
                               r * config::kHeadDimV))
                         : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int j = 0; j < kInputsAtOnce; ++j) {
#pragma unroll
        for (int k = 0; k < kRowsAtOnce; ++k) merge[k].Add(lse[j][k], v[j][k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      if (k >= rows) continue;
      const int r = r0 + k;
      StoreReduced<T>(p, in, r, col, merge[k].Value());
      if (col != 0) continue;
      const float lse2 = merge[k].Lse2();
      if (in.dst_slot == isa::kFinalOutput) {
        const RowMap map{p.h_q / p.h_kv};
        const int64_t at =
            (static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) *
                p.s_q + map.Token(in, r);
        p.lse[at] = merge[k].sum > 0.f ? lse2 * kLn2 : INFINITY;
      } else {
        p.partial_lse[static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                      r] = lse2;
      }
    }
  }
}

}  // namespace tmla::ops
