// Decoding one instruction of the tensor (layout in isa.h) and the checks
// that keep a malformed one from touching memory it must not.
#pragma once

#include <cstdint>

#include "isa.h"
#include "params.h"

namespace tmla {

struct Instruction {
  int32_t opcode;
  int32_t batch;
  int32_t kv_head;
  int32_t row_start;
  int32_t num_rows;
  // Words 5 and 6 mean one thing per opcode: read them through the named
  // accessors below (kv_start/kv_end, src_slot/num_src).
  int32_t word5;
  int32_t word6;
  int32_t dst_slot;
  int32_t signal_counter;
  int32_t wait_counter;
  int32_t wait_count;
  int32_t slot_row;  // REDUCE: slot row of its first row

  // PARTIAL: the KV tokens [kv_start, kv_end) it attends to.
  __device__ __forceinline__ int32_t kv_start() const { return word5; }
  __device__ __forceinline__ int32_t kv_end() const { return word6; }
  // REDUCE: it merges slots [src_slot, src_slot + num_src).
  __device__ __forceinline__ int32_t src_slot() const { return word5; }
  __device__ __forceinline__ int32_t num_src() const { return word6; }

  static __device__ __forceinline__ const int4* Words(
      const MlaDecodeParams& p, int cta, int index) {
    return reinterpret_cast<const int4*>(
        p.instructions +
        (static_cast<int64_t>(cta) * p.max_instructions + index) *
            isa::kInstructionWords);
  }

  // Decodes the words at `src` (global or shared memory).
  static __device__ __forceinline__ Instruction Unpack(const int4* src,
                                                       bool global) {
    const int4 w0 = global ? __ldg(src) : src[0];
    const int4 w1 = global ? __ldg(src + 1) : src[1];
    const int4 w2 = global ? __ldg(src + 2) : src[2];
    const int4 w3 = global ? __ldg(src + 3) : src[3];
    static_assert(isa::kFieldOpcode == 0 && isa::kFieldBatch == 1 &&
                      isa::kFieldKvHead == 2 && isa::kFieldRowStart == 3 &&
                      isa::kFieldNumRows == 4 && isa::kFieldKvStart == 5 &&
                      isa::kFieldSrcSlot == 5 && isa::kFieldKvEnd == 6 &&
                      isa::kFieldNumSrc == 6 && isa::kFieldDstSlot == 7 &&
                      isa::kFieldSignalCounter == 8 &&
                      isa::kFieldWaitCounter == 9 &&
                      isa::kFieldWaitCount == 10 &&
                      isa::kFieldSlotRow == 12,
                  "Unpack reads the fields in isa.h order");
    return Instruction{w0.x, w0.y, w0.z, w0.w, w1.x, w1.y,
                       w1.z, w1.w, w2.x, w2.y, w2.z, w3.x};
  }

  static __device__ __forceinline__ Instruction Fetch(
      const MlaDecodeParams& p, int cta, int index) {
    return Unpack(Words(p, cta, index), true);
  }

  __device__ __forceinline__ bool RowsValid(const MlaDecodeParams& p) const {
    const int rows = p.s_q * (p.h_q / p.h_kv);
    return batch >= 0 && batch < p.batch && kv_head >= 0 &&
           kv_head < p.h_kv && num_rows >= 1 &&
           num_rows <= isa::kTileRows && row_start >= 0 &&
           row_start + num_rows <= rows;
  }

  __device__ __forceinline__ bool DstValid(const MlaDecodeParams& p) const {
    return dst_slot == isa::kFinalOutput ||
           (dst_slot >= 0 && dst_slot < p.num_slots);
  }

  // Whether the work of this instruction may run; an invalid one is
  // skipped (it still signals, so that nothing waits forever).
  __device__ __forceinline__ bool Valid(const MlaDecodeParams& p) const {
    if (!RowsValid(p) || !DstValid(p)) return false;
    if (opcode == isa::kOpPartial) return true;
    if (opcode == isa::kOpReduce) {
      return num_src() >= 1 && num_src() <= isa::kMaxReduceInputs &&
             src_slot() >= 0 && src_slot() + num_src() <= p.num_slots &&
             slot_row >= 0 &&
             slot_row + num_rows <= isa::kTileRows;
    }
    return false;
  }

  __device__ __forceinline__ bool HasWait(const MlaDecodeParams& p) const {
    return wait_counter >= 0 && wait_counter < p.num_counters;
  }

  __device__ __forceinline__ bool HasSignal(const MlaDecodeParams& p) const {
    return signal_counter >= 0 && signal_counter < p.num_counters;
  }
};

// The KV tokens a PARTIAL loads: [lo, hi) clamped to the table, walked in
// blocks of kBlockTokens from `first` (lo rounded down to a TMA chunk).
struct KvRange {
  int32_t lo;
  int32_t hi;
  int32_t first;
  int32_t num_blocks;

  static __device__ __forceinline__ KvRange Of(const Instruction& in,
                                               const MlaDecodeParams& p,
                                               int block_tokens) {
    const int32_t table_tokens = p.max_pages * p.page_size;
    KvRange r;
    r.lo = max(in.kv_start(), 0);
    r.hi = min(in.kv_end(), table_tokens);
    r.first = r.lo - r.lo % p.chunk_tokens;
    r.num_blocks =
        r.hi > r.lo ? (r.hi - r.first + block_tokens - 1) / block_tokens : 0;
    return r;
  }
};

}  // namespace tmla
