// REDUCE: the LSE-weighted merge of partials (slots of T, base-2 LSE) into
// the final output or another slot, by both consumers (256 threads), in
// fp32. Each thread owns a column of 4 elements and keeps 16 loads in
// flight per batch, issuing a batch's loads before its arithmetic. A
// REDUCE of up to 4 rows splits its inputs between the consumers (consumer
// c merges inputs i with i % 2 == c, then hands its merge to consumer 0
// through shared memory, the query tile's buffer); a wider one splits its
// rows and needs no barrier, so the stores of one batch of rows never wait.
// The column-0 threads write the rows' LSEs. Partials are read through L2
// (ld.global.cg), never a stale L1 line.
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
  const RowMap map{p.h_q / p.h_kv};
  const bool final = in.dst_slot == isa::kFinalOutput;
  const int64_t row =
      final ? (static_cast<int64_t>(in.batch) * p.s_q + map.Token(in, r)) *
                      p.h_q + map.Head(in, r)
            : static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                  in.slot_row + r;
  T* base = static_cast<T*>(final ? p.out : p.partial_o);
  *reinterpret_cast<uint2*>(base + row * config::kHeadDimV + col) =
      make_uint2(Pack2<T>::Of(v.x, v.y), Pack2<T>::Of(v.z, v.w));
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

// Consumer 1's running merges of up to kMaxRows rows, handed to consumer 0.
struct MergeHandoff {
  float4* acc;  // [kMaxRows][128 columns]
  float2* ms;   // [kMaxRows][128 columns]: (m, sum)

  static constexpr int kMaxRows = 4;
  static constexpr int kColumns = config::kWarpgroupThreads;

  static __device__ __forceinline__ MergeHandoff In(const Smem& smem) {
    static_assert(kMaxRows * kColumns * (sizeof(float4) + sizeof(float2)) <=
                      config::kQBytes,
                  "the hand-off fits the query tile's buffer");
    float4* acc = reinterpret_cast<float4*>(smem.q);
    return MergeHandoff{acc,
                        reinterpret_cast<float2*>(acc + kMaxRows * kColumns)};
  }

  __device__ __forceinline__ int At(int row, int column) const {
    return row * kColumns + column;
  }
};

constexpr int64_t kSlotStride =
    static_cast<int64_t>(config::kTileRows) * config::kHeadDimV;

// Where a REDUCE reads: this thread's column of 4 elements of its first
// source slot's row slot_row, and that slot's LSE of the same row.
template <typename T>
struct ReduceSources {
  const T* o;
  const float* lse;

  static __device__ __forceinline__ ReduceSources Of(const MlaDecodeParams& p,
                                                     const Instruction& in,
                                                     int col) {
    return ReduceSources{
        static_cast<const T*>(p.partial_o) +
            static_cast<int64_t>(in.src_slot()) * kSlotStride +
            static_cast<int64_t>(in.slot_row) * config::kHeadDimV + col,
        p.partial_lse +
            static_cast<int64_t>(in.src_slot()) * config::kTileRows +
            in.slot_row};
  }
};

// Adds inputs i0, i0 + stride, ... (kInputsAtOnce of them, those below
// num_src) of rows r0 .. r0 + kRowsAtOnce (those below num_rows) to
// `merge`: all the batch's loads are issued before its arithmetic.
template <typename T, int kRowsAtOnce, int kInputsAtOnce>
__device__ __forceinline__ void MergeBatch(const ReduceSources<T>& src,
                                           int num_rows, int num_src, int r0,
                                           int i0, int stride,
                                           Merge (&merge)[kRowsAtOnce]) {
  float lse[kInputsAtOnce][kRowsAtOnce];
  uint2 v[kInputsAtOnce][kRowsAtOnce];
#pragma unroll
  for (int j = 0; j < kInputsAtOnce; ++j) {
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      const bool live = i0 + stride * j < num_src && r0 + k < num_rows;
      const int i = live ? i0 + stride * j : 0;
      const int r = live ? r0 + k : 0;
      lse[j][k] = live ? __ldcg(src.lse + i * config::kTileRows + r)
                       : -INFINITY;
      v[j][k] = live ? __ldcg(reinterpret_cast<const uint2*>(
                           src.o + i * kSlotStride + r * config::kHeadDimV))
                     : make_uint2(0u, 0u);
    }
  }
#pragma unroll
  for (int j = 0; j < kInputsAtOnce; ++j) {
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      const float2 lo = Pack2<T>::Unpack(v[j][k].x);
      const float2 hi = Pack2<T>::Unpack(v[j][k].y);
      merge[k].Add(lse[j][k], make_float4(lo.x, lo.y, hi.x, hi.y));
    }
  }
}

// Writes row r's merged float4 column, and its LSE from the column-0 thread.
template <typename T>
__device__ __forceinline__ void WriteMerged(const MlaDecodeParams& p,
                                            const Instruction& in, int r,
                                            int col, const Merge& merge) {
  StoreReduced<T>(p, in, r, col, merge.Value());
  if (col != 0) return;
  if (in.dst_slot == isa::kFinalOutput) {
    const RowMap map{p.h_q / p.h_kv};
    p.lse[(static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) * p.s_q +
          map.Token(in, r)] = merge.FinalLse();
  } else {
    p.partial_lse[static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                  in.slot_row + r] = merge.Lse2();
  }
}

// A REDUCE of few rows (at most kRowsAtOnce): consumer c merges the inputs
// i with i % 2 == c, then hands its merge to consumer 0, which writes.
template <typename T, int kRowsAtOnce>
__device__ __forceinline__ void ReduceSplitInputs(const MlaDecodeParams& p,
                                                  const Instruction& in,
                                                  const Smem& smem,
                                                  int consumer,
                                                  int thread_in_wg) {
  constexpr int kInputsAtOnce = 16 / kRowsAtOnce;
  constexpr int kInputStride = config::kNumConsumers;
  static_assert(kRowsAtOnce <= MergeHandoff::kMaxRows, "hand-off size");
  static_assert(config::kHeadDimV == 4 * MergeHandoff::kColumns,
                "one float4 column per thread of a consumer");
  const MergeHandoff handoff = MergeHandoff::In(smem);
  const int col = thread_in_wg * 4;
  const ReduceSources<T> src = ReduceSources<T>::Of(p, in, col);
  Merge merge[kRowsAtOnce];
  for (int i0 = consumer; i0 < in.num_src();
       i0 += kInputStride * kInputsAtOnce) {
    MergeBatch<T, kRowsAtOnce, kInputsAtOnce>(src, in.num_rows, in.num_src(), 0,
                                           i0, kInputStride, merge);
  }
  // Consumer 0 is done with the query tile's buffer (its cp.async loads
  // were waited for, its QK^T finished) before consumer 1 writes there: the
  // order is otherwise carried only by mbarriers and the instruction list.
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
  if (consumer == 1) {
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      const int at = handoff.At(k, thread_in_wg);
      handoff.acc[at] = merge[k].acc;
      handoff.ms[at] = make_float2(merge[k].m, merge[k].sum);
    }
  }
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
  if (consumer == 0) {
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      if (k >= in.num_rows) continue;
      const int at = handoff.At(k, thread_in_wg);
      const float2 ms = handoff.ms[at];
      merge[k].Add(ms.x, ms.y, handoff.acc[at]);
      WriteMerged<T>(p, in, k, col, merge[k]);
    }
  }
  // Consumer 0 is done with the hand-off before anyone reuses the buffer.
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
}

// A REDUCE of more rows: consumer c merges every input of the row batches
// c, c + 2, ... on its own and writes them; no barrier, so one batch's
// stores never wait for another's loads.
template <typename T, int kRowsAtOnce, int kInputsAtOnce>
__device__ __forceinline__ void ReduceSplitRows(const MlaDecodeParams& p,
                                                const Instruction& in,
                                                int consumer,
                                                int thread_in_wg) {
  const int col = thread_in_wg * 4;
  const ReduceSources<T> src = ReduceSources<T>::Of(p, in, col);
  for (int r0 = consumer * kRowsAtOnce; r0 < in.num_rows;
       r0 += config::kNumConsumers * kRowsAtOnce) {
    Merge merge[kRowsAtOnce];
    for (int i0 = 0; i0 < in.num_src(); i0 += kInputsAtOnce) {
      MergeBatch<T, kRowsAtOnce, kInputsAtOnce>(src, in.num_rows, in.num_src(), r0,
                                             i0, 1, merge);
    }
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) {
      if (r0 + k < in.num_rows) WriteMerged<T>(p, in, r0 + k, col, merge[k]);
    }
  }
}

// Each thread keeps 16 loads in flight per batch. Up to 4 rows, the two
// consumers split the inputs (one hand-off); beyond, they split the rows.
template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, const Smem& smem,
                                       int consumer, int thread_in_wg) {
  if (in.num_rows == 1) {
    ReduceSplitInputs<T, 1>(p, in, smem, consumer, thread_in_wg);
  } else if (in.num_rows == 2) {
    ReduceSplitInputs<T, 2>(p, in, smem, consumer, thread_in_wg);
  } else if (in.num_rows <= 4) {
    ReduceSplitInputs<T, 4>(p, in, smem, consumer, thread_in_wg);
  } else if (in.num_src() <= 2) {
    ReduceSplitRows<T, 8, 2>(p, in, consumer, thread_in_wg);
  } else {
    ReduceSplitRows<T, 4, 4>(p, in, consumer, thread_in_wg);
  }
}

}  // namespace tmla::ops
