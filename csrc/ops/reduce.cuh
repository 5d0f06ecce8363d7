// REDUCE: the LSE-weighted merge of partials (fp32 slots, base-2 LSE) into
// the final output or another slot, by both consumers (256 threads) with
// no shared memory and no barrier: each thread owns one float4 column of
// half the rows, merges four rows at a time with a running max (so every
// load is independent of the arithmetic and many are in flight), and the
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

__device__ __forceinline__ void Fma4(float4& acc, float w, const float4& v) {
  acc.x += w * v.x;
  acc.y += w * v.y;
  acc.z += w * v.z;
  acc.w += w * v.w;
}

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

// Running LSE-weighted merge of one row's float4 column, base 2.
struct Merge {
  float m = -INFINITY;
  float sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);

  __device__ __forceinline__ void Add(float lse, const float4& v) {
    if (lse == -INFINITY) return;  // an input that saw no key
    if (lse > m) {
      const float scale = exp2f(m - lse);
      sum *= scale;
      acc = make_float4(acc.x * scale, acc.y * scale, acc.z * scale,
                        acc.w * scale);
      m = lse;
    }
    const float w = exp2f(lse - m);
    sum += w;
    Fma4(acc, w, v);
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
#pragma unroll 2
    for (int i = 0; i < num_src; ++i) {
#pragma unroll
      for (int k = 0; k < kRowsAtOnce; ++k) {
        if (k < rows) {
          const int r = r0 + k;
          merge[k].Add(
              __ldcg(lse_base + i * config::kTileRows + r),
              __ldcg(reinterpret_cast<const float4*>(
                  o_base + i * kSlotStride + r * config::kHeadDimV)));
        }
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
