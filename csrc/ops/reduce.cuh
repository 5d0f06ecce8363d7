// REDUCE: the LSE-weighted merge of partials (fp32 slots, base-2 LSE) into
// the final output or another slot, by both consumers (256 threads). Each
// thread owns one float4 column; consumer c merges the inputs i with
// i % 2 == c, a few rows at a time, issuing a batch's 16 loads before its
// arithmetic (a narrow REDUCE merges 1 or 2 rows x 16 or 8 inputs per batch,
// a wide one 4 x 4), and consumer 1 hands its running merge to consumer 0
// through shared memory (the query tile's buffer, double-buffered), which
// writes the result. The column-0 threads write the rows' LSEs. Partials
// are read through L2 (ld.global.cg), never a stale L1 line.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.h"
#include "../instruction.cuh"
#include "../params.h"
#include "../ptx.cuh"
#include "../smem.cuh"
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
        p.partial_o + (static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                       in.slot_row + r) *
                          config::kHeadDimV +
        col) = v;
  }
}

// Running LSE-weighted merge of one row's float4 column, base 2. Branch
// free; an input that saw no key (LSE -inf, output 0) adds nothing, and a
// poisoned input (NaN) makes the whole merge NaN.
struct Merge {
  float m = -INFINITY;
  float sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);

  // Adds a merge of weight `other_sum` at max `other_m` (one input: sum 1).
  __device__ __forceinline__ void Add(float other_m, float other_sum,
                                      const float4& v) {
    const float next = fmaxf(m, other_m);
    const float base = next == -INFINITY ? 0.f : next;
    const float scale = exp2f(m - base);
    const float w = exp2f(other_m - base);
    const float wv = w * other_sum;
    sum = sum * scale + wv;
    acc = make_float4(acc.x * scale + w * v.x, acc.y * scale + w * v.y,
                      acc.z * scale + w * v.z, acc.w * scale + w * v.w);
    m = next;
  }

  __device__ __forceinline__ void Add(float lse, const float4& v) {
    Add(lse, 1.f, v);
  }

  __device__ __forceinline__ float4 Value() const {
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    return make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }

  // Base-2 LSE: -inf when no input saw a key, NaN when one was poisoned.
  __device__ __forceinline__ float Lse2() const {
    if (sum > 0.f) return m + log2f(sum);
    return sum == 0.f ? -INFINITY : NAN;
  }

  // Natural-log LSE of a final row: +inf when it saw no key.
  __device__ __forceinline__ float FinalLse() const {
    if (sum > 0.f) return (m + log2f(sum)) * kLn2;
    return sum == 0.f ? INFINITY : NAN;
  }
};

// Consumer 1's running merges of one batch of rows, handed to consumer 0.
struct MergeHandoff {
  float4* acc;  // [2 buffers][kMaxRowsAtOnce][128 columns]
  float2* ms;   // [2 buffers][kMaxRowsAtOnce][128 columns]: (m, sum)

  static constexpr int kMaxRowsAtOnce = 4;
  static constexpr int kColumns = config::kWarpgroupThreads;
  static constexpr int kBufferItems = kMaxRowsAtOnce * kColumns;

  static __device__ __forceinline__ MergeHandoff In(const Smem& smem) {
    static_assert(2 * kBufferItems * (sizeof(float4) + sizeof(float2)) <=
                      config::kQBytes,
                  "the hand-off fits the query tile's buffer");
    float4* acc = reinterpret_cast<float4*>(smem.q);
    return MergeHandoff{acc, reinterpret_cast<float2*>(acc + 2 * kBufferItems)};
  }

  __device__ __forceinline__ int At(int buffer, int row, int column) const {
    return buffer * kBufferItems + row * kColumns + column;
  }
};

template <typename T, int kRowsAtOnce>
__device__ __forceinline__ void ReduceRows(const MlaDecodeParams& p,
                                           const Instruction& in,
                                           const Smem& smem, int consumer,
                                           int thread_in_wg) {
  constexpr int kLoadsAtOnce = 16;
  constexpr int kInputsAtOnce = kLoadsAtOnce / kRowsAtOnce;
  constexpr int kInputStride = config::kNumConsumers;
  constexpr int64_t kSlotStride =
      static_cast<int64_t>(config::kTileRows) * config::kHeadDimV;
  static_assert(kRowsAtOnce <= MergeHandoff::kMaxRowsAtOnce, "hand-off size");
  static_assert(config::kHeadDimV == 4 * MergeHandoff::kColumns,
                "one float4 column per thread of a consumer");
  const MergeHandoff handoff = MergeHandoff::In(smem);
  const int col = thread_in_wg * 4;
  const int num_src = in.arg1;
  const float* o_base = p.partial_o + static_cast<int64_t>(in.arg0) * kSlotStride +
                        static_cast<int64_t>(in.slot_row) * config::kHeadDimV +
                        col;
  const float* lse_base = p.partial_lse +
                          static_cast<int64_t>(in.arg0) * config::kTileRows +
                          in.slot_row;
  int buffer = 0;
  for (int r0 = 0; r0 < in.num_rows; r0 += kRowsAtOnce, buffer ^= 1) {
    Merge merge[kRowsAtOnce];
    const int rows = min(kRowsAtOnce, in.num_rows - r0);
    for (int i0 = consumer; i0 < num_src; i0 += kInputStride * kInputsAtOnce) {
      // All loads of the batch first, then the arithmetic.
      float lse[kInputsAtOnce][kRowsAtOnce];
      float4 v[kInputsAtOnce][kRowsAtOnce];
#pragma unroll
      for (int j = 0; j < kInputsAtOnce; ++j) {
#pragma unroll
        for (int k = 0; k < kRowsAtOnce; ++k) {
          const bool live = i0 + kInputStride * j < num_src && k < rows;
          const int i = live ? i0 + kInputStride * j : 0;
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
    if (consumer == 1) {
#pragma unroll
      for (int k = 0; k < kRowsAtOnce; ++k) {
        const int at = handoff.At(buffer, k, thread_in_wg);
        handoff.acc[at] = merge[k].acc;
        handoff.ms[at] = make_float2(merge[k].m, merge[k].sum);
      }
    }
    // Buffer `buffer` is rewritten two batches later, after consumer 0 has
    // passed the next of these barriers, i.e. finished reading it.
    ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
    if (consumer == 1) continue;
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      if (k >= rows) continue;
      const int at = handoff.At(buffer, k, thread_in_wg);
      const float2 ms = handoff.ms[at];
      merge[k].Add(ms.x, ms.y, handoff.acc[at]);
      const int r = r0 + k;
      StoreReduced<T>(p, in, r, col, merge[k].Value());
      if (col != 0) continue;
      if (in.dst_slot == isa::kFinalOutput) {
        const RowMap map{p.h_q / p.h_kv};
        const int64_t at_lse =
            (static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) *
                p.s_q + map.Token(in, r);
        p.lse[at_lse] = merge[k].FinalLse();
      } else {
        p.partial_lse[static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                      in.slot_row + r] = merge[k].Lse2();
      }
    }
  }
  // Consumer 0 is done with the hand-off before anyone reuses the buffer.
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
}

template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, const Smem& smem,
                                       int consumer, int thread_in_wg) {
  if (in.num_rows >= 4) {
    ReduceRows<T, 4>(p, in, smem, consumer, thread_in_wg);
  } else if (in.num_rows >= 2) {
    ReduceRows<T, 2>(p, in, smem, consumer, thread_in_wg);
  } else {
    ReduceRows<T, 1>(p, in, smem, consumer, thread_in_wg);
  }
}

}  // namespace tmla::ops
