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

// Where row r of a REDUCE's output starts: the final output's row, or the
// destination slot's.
template <typename T>
__device__ __forceinline__ T* ReducedRow(const MlaDecodeParams& p,
                                         const Instruction& in, int r) {
  const RowMap map{p.h_q / p.h_kv};
  const bool final = in.dst_slot == isa::kFinalOutput;
  const int64_t row =
      final ? (static_cast<int64_t>(in.batch) * p.s_q + map.Token(in, r)) *
                      p.h_q + map.Head(in, r)
            : static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                  in.slot_row + r;
  return static_cast<T*>(final ? p.out : p.partial_o) +
         row * config::kHeadDimV;
}

template <typename T>
__device__ __forceinline__ void StoreReduced(const MlaDecodeParams& p,
                                             const Instruction& in, int r,
                                             int col, float4 v) {
  T* row = ReducedRow<T>(p, in, r);
  *reinterpret_cast<uint2*>(row + col) =
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

// Writes row r's LSE: the final LSE (natural log) or the slot's (base 2).
__device__ __forceinline__ void StoreRowLse(const MlaDecodeParams& p,
                                            const Instruction& in, int r,
                                            const Merge& merge) {
  if (in.dst_slot == isa::kFinalOutput) {
    const RowMap map{p.h_q / p.h_kv};
    p.lse[(static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) * p.s_q +
          map.Token(in, r)] = merge.FinalLse();
  } else {
    p.partial_lse[static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                  in.slot_row + r] = merge.Lse2();
  }
}

// Writes row r's merged float4 column, and its LSE from the column-0 thread.
template <typename T>
__device__ __forceinline__ void WriteMerged(const MlaDecodeParams& p,
                                            const Instruction& in, int r,
                                            int col, const Merge& merge) {
  StoreReduced<T>(p, in, r, col, merge.Value());
  if (col != 0) return;
  StoreRowLse(p, in, r, merge);
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

// ---- REDUCE fed by bulk copies (config::kReduceBulk) ---------------------
//
// The REDUCE's (row, input) partial rows, 1 KB each, arrive in shared memory
// by 1-D bulk copies, one per thread, as many per round as there are slots:
// the query tile's buffer holds kQSlots rows (with the stages after it
// kRunSlotsFree, when no PARTIAL's load follows in the CTA's list), the P
// buffer kPSlots more and, in its last kilobyte, the weights (so num_rows x
// num_src <= kMaxWeights; a larger REDUCE takes the path of loads). While
// the first round's copies are in flight the LSEs become weights
// (MergeWeights). The threads then merge
// from shared memory, 4 groups of 64 threads with 8 columns each: with
// kGroups rows or more a round holds whole rows and the groups split them;
// with fewer a round holds whole inputs, the groups split the inputs, and
// they hand their sums to group 0, which writes.
namespace bulk {

// Thread groups: a thread owns 8 columns (16 bytes) of a row.
constexpr int kGroups = 4;
constexpr int kGroupThreads = config::kConsumerThreads / kGroups;  // 64
constexpr int kCols = config::kHeadDimV / kGroupThreads;           // 8
static_assert(kCols == 8, "a thread's columns are 16 bytes of a row");
constexpr int kRowBytes = config::kHeadDimV * 2;  // a 16-bit partial row
constexpr int kWeightBytes = 1024;
constexpr int kQSlots = config::kQBytes / kRowBytes;                   // 72
constexpr int kPSlots = (config::kPBytes - kWeightBytes) / kRowBytes;  // 7
constexpr int kRunSlotsFree =
    (config::kQBytes + config::kStages * config::kStageBytes) / kRowBytes;
constexpr int kMaxWeights = kWeightBytes / 4;
static_assert(kRunSlotsFree + kPSlots <= config::kConsumerThreads,
              "a copy per thread");
static_assert((kGroups - 1) * (kGroups - 1) * config::kHeadDimV * 4 <=
                  config::kQBytes,
              "the groups' hand-off fits the query tile's buffer");

// Every consumer thread (t of 256), once the buffer at `w` is free: the
// weights 2^(lse - LSE_row) of each (row, input) into `w`
// ([num_rows][num_src], fp32) and the rows' LSEs into the output; `w` is
// ready when it returns. Base 2: an input that saw no key (LSE -inf) weighs
// 0, a row none of whose inputs saw a key has LSE -inf (final: +inf), and a
// poisoned input (NaN) makes the row's LSE and output NaN.
__device__ __forceinline__ void MergeWeights(const MlaDecodeParams& p,
                                             const Instruction& in, float* w,
                                             int t) {
  const int n = in.num_src();
  const int rows = in.num_rows;
  const float* lse = p.partial_lse +
                     static_cast<int64_t>(in.src_slot()) * config::kTileRows +
                     in.slot_row;
  for (int at = t; at < n * rows; at += config::kConsumerThreads) {
    const int i = at / rows;
    const int r = at - i * rows;
    w[r * n + i] = __ldcg(lse + i * config::kTileRows + r);
  }
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
  const int lane = t % 32;
  for (int r = t / 32; r < rows; r += config::kConsumerThreads / 32) {
    float* row = w + r * n;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    }
    const float base = m == -INFINITY ? 0.f : m;
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) sum += exp2f(row[i] - base);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int i = lane; i < n; i += 32) row[i] = exp2f(row[i] - base) * inv;
    if (lane != 0) continue;
    // The row's merge, weights summed relative to its max.
    Merge row_merge;
    row_merge.m = m;
    row_merge.sum = sum;
    StoreRowLse(p, in, r, row_merge);
  }
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
}

// Where a round's rows land: `run` slots from the query tile's buffer on,
// then the P buffer's.
struct Slots {
  uint8_t* q;
  uint8_t* p;
  int run;

  // Every consumer thread, at the REDUCE at list position `index`, once
  // both consumers are done with the instructions before it: a barrier that
  // also tells all of them whether the stages are free.
  static __device__ __forceinline__ Slots Claim(const Smem& smem, int index,
                                                int t) {
    bool free = false;
    if (t == 0) {
      const int32_t done =
          *reinterpret_cast<volatile const int32_t*>(smem.producer_done);
      free = done != 0 && done - 2 < index;
    }
    free = ptx::BarSyncOr(config::kBarConsumers, config::kConsumerThreads,
                          free);
    return Slots{smem.q, smem.p, free ? kRunSlotsFree : kQSlots};
  }

  __device__ __forceinline__ int Count() const { return run + kPSlots; }

  __device__ __forceinline__ uint8_t* At(int s) const {
    return s < run ? q + s * kRowBytes : p + (s - run) * kRowBytes;
  }
};

__device__ __forceinline__ float* Weights(const Smem& smem) {
  return reinterpret_cast<float*>(smem.p + kPSlots * kRowBytes);
}

// Whether the REDUCE takes this path. A row's inputs then fit one round
// when it has kGroups rows or more.
__device__ __forceinline__ bool Fits(const Instruction& in) {
  return in.num_rows * in.num_src() <= kMaxWeights;
}
static_assert(kMaxWeights / kGroups <= kQSlots + kPSlots, "a row fits a round");

// Starts a round of `count` copies: thread c copies partial row `row` of
// input `input` into slot c. The buffers are free (the caller's barrier).
template <typename T>
__device__ __forceinline__ void IssueRound(const MlaDecodeParams& p,
                                           const Instruction& in,
                                           const Smem& smem,
                                           const Slots& slots, int t,
                                           int count, int row, int input) {
  // Orders the acquired partials and the buffers' earlier generic accesses
  // before this thread's copy.
  ptx::FenceProxyAsyncAll();
  if (t == 0) ptx::MbarArriveExpectTx(smem.merge, count * kRowBytes);
  if (t < count) {
    const T* src = static_cast<const T*>(p.partial_o) +
                   static_cast<int64_t>(in.src_slot() + input) * kSlotStride +
                   static_cast<int64_t>(in.slot_row + row) * config::kHeadDimV;
    ptx::BulkLoad(slots.At(t), src, kRowBytes, smem.merge);
  }
}

// The parity of the `merge` phase a round's copies complete: the phase
// after the last completed one. Read by every thread before the barrier
// that precedes the round's copies (all then see the same phase), so no
// register carries it from one REDUCE to the next.
__device__ __forceinline__ uint32_t RoundParity(const Smem& smem) {
  // A fresh barrier reads as if a phase of parity 1 had completed.
  return ptx::MbarTest(smem.merge, 0) ? 1u : 0u;
}

// Row r's 8 columns from `col` of the REDUCE's output (final or slot).
template <typename T>
__device__ __forceinline__ void Store8(const MlaDecodeParams& p,
                                       const Instruction& in, int r, int col,
                                       const float (&v)[kCols]) {
  T* row = ReducedRow<T>(p, in, r);
  *reinterpret_cast<uint4*>(row + col) =
      make_uint4(Pack2<T>::Of(v[0], v[1]), Pack2<T>::Of(v[2], v[3]),
                 Pack2<T>::Of(v[4], v[5]), Pack2<T>::Of(v[6], v[7]));
}

// acc += w x the 8 values of a row at `slot` + `col` (shared memory).
template <typename T>
__device__ __forceinline__ void Fma8(float (&acc)[kCols], float w,
                                     const uint8_t* slot, int col) {
  const uint4 v = *reinterpret_cast<const uint4*>(slot + col * 2);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = Pack2<T>::Unpack(words[k]);
    acc[2 * k] += w * x.x;
    acc[2 * k + 1] += w * x.y;
  }
}

// kGroups rows or more: a round holds whole rows, slot rr * n + i holding
// input i of row r0 + rr; group g merges rows r0 + g, r0 + g + kGroups, ...
template <typename T>
__device__ __forceinline__ void ReduceRows(const MlaDecodeParams& p,
                                           const Instruction& in,
                                           const Smem& smem,
                                           const Slots& slots, int t,
                                           uint32_t parity) {
  const int n = in.num_src();
  const int g = t / kGroupThreads;
  const int col = t % kGroupThreads * kCols;
  const int rows_per_round = slots.Count() / n;
  const float* w = Weights(smem);
  for (int r0 = 0; r0 < in.num_rows; r0 += rows_per_round) {
    const int rows = min(rows_per_round, in.num_rows - r0);
    // Everyone is done with the previous round's rows (the first round's
    // barrier is Slots::Claim's).
    if (r0 > 0) {
      parity = RoundParity(smem);
      ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
    }
    const int rr = t / n;
    IssueRound<T>(p, in, smem, slots, t, rows * n, r0 + rr, t - rr * n);
    if (r0 == 0) MergeWeights(p, in, Weights(smem), t);
    ptx::MbarWait(smem.merge, parity);
    for (int r = g; r < rows; r += kGroups) {
      float acc[kCols] = {};
      for (int i = 0; i < n; ++i) {
        Fma8<T>(acc, w[(r0 + r) * n + i], slots.At(r * n + i), col);
      }
      Store8<T>(p, in, r0 + r, col, acc);
    }
  }
}

// Fewer than kGroups rows (kRows): a round holds whole inputs, slot
// j * kRows + r holding row r of input i0 + j; group g merges the round's
// inputs j = g, g + kGroups, ..., and groups 1.. hand their sums to group 0.
template <typename T, int kRows>
__device__ __forceinline__ void ReduceInputs(const MlaDecodeParams& p,
                                             const Instruction& in,
                                             const Smem& smem,
                                             const Slots& slots, int t,
                                             uint32_t parity) {
  static_assert(kRows < kGroups, "the hand-off holds kGroups - 1 rows");
  const int inputs_per_round = slots.Count() / kRows;
  const int n = in.num_src();
  const int g = t / kGroupThreads;
  const int col = t % kGroupThreads * kCols;
  const float* w = Weights(smem);
  float acc[kRows][kCols] = {};
  for (int i0 = 0; i0 < n; i0 += inputs_per_round) {
    const int inputs = min(inputs_per_round, n - i0);
    if (i0 > 0) {
      parity = RoundParity(smem);
      ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
    }
    IssueRound<T>(p, in, smem, slots, t, inputs * kRows, t % kRows,
                  i0 + t / kRows);
    if (i0 == 0) MergeWeights(p, in, Weights(smem), t);
    ptx::MbarWait(smem.merge, parity);
    for (int j = g; j < inputs; j += kGroups) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        Fma8<T>(acc[r], w[r * n + i0 + j], slots.At(j * kRows + r), col);
      }
    }
  }
  // The hand-off overwrites the rows' slots once every group has read them.
  float* handoff = reinterpret_cast<float*>(smem.q);
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
  if (g > 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float4* to = reinterpret_cast<float4*>(
          handoff + ((g - 1) * (kGroups - 1) + r) * config::kHeadDimV + col);
      to[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      to[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    }
    // Before a later round of bulk copies overwrites the hand-off.
    ptx::FenceProxyAsync();
  }
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
  if (g != 0) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int from = 0; from < kGroups - 1; ++from) {
      const float4* at = reinterpret_cast<const float4*>(
          handoff + (from * (kGroups - 1) + r) * config::kHeadDimV + col);
      const float4 lo = at[0];
      const float4 hi = at[1];
      acc[r][0] += lo.x;
      acc[r][1] += lo.y;
      acc[r][2] += lo.z;
      acc[r][3] += lo.w;
      acc[r][4] += hi.x;
      acc[r][5] += hi.y;
      acc[r][6] += hi.z;
      acc[r][7] += hi.w;
    }
    Store8<T>(p, in, r, col, acc[r]);
  }
}

// The REDUCE at list position `index`.
template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, int index,
                                       const Smem& smem, int t) {
  const uint32_t parity = RoundParity(smem);
  // Everyone is done with the buffers (the previous instruction's query
  // tile, P and blocks).
  const Slots slots = Slots::Claim(smem, index, t);
  if (in.num_rows == 1) {
    ReduceInputs<T, 1>(p, in, smem, slots, t, parity);
  } else if (in.num_rows == 2) {
    ReduceInputs<T, 2>(p, in, smem, slots, t, parity);
  } else if (in.num_rows == 3) {
    ReduceInputs<T, 3>(p, in, smem, slots, t, parity);
  } else {
    ReduceRows<T>(p, in, smem, slots, t, parity);
  }
  // Everyone is done with the buffers before the next instruction writes
  // them.
  ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
}

}  // namespace bulk

// Each thread keeps 16 loads in flight per batch (or, with
// config::kReduceBulk, bulk above where the REDUCE fits it). Up to 4 rows,
// the two consumers split the inputs (one hand-off); beyond, they split the
// rows.
// The REDUCE `in` at list position `index`.
template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, int index,
                                       const Smem& smem, int consumer,
                                       int thread_in_wg) {
  const int t = consumer * config::kWarpgroupThreads + thread_in_wg;
  if constexpr (config::kReduceBulk) {
    if (bulk::Fits(in)) {
      bulk::Reduce<T>(p, in, index, smem, t);
      return;
    }
  }
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
