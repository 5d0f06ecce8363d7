// Instruction set of the MLA decode megakernel: the one source of truth.
//
// Python mirrors these constants in jax_thundermla/isa.py; tests/test_isa.py
// parses this file and checks that both agree, so every constant below is
// written as `constexpr int32_t kName = value;` on one line. The workspace
// layout functions at the end are checked the same way (tests/test_isa.py
// compiles a host program that prints them).
//
// Instruction tensor: int32 [num_sms, max_instructions, kInstructionWords].
// CTA i executes row i in order and stops at the first kOpStop (an all-zero
// row is a STOP, so zero padding is safe).
//
// Query rows: for sequence b and KV head k, the g = h_q / h_kv query heads
// that share k and the s_q new tokens form R = s_q * g rows; row r is query
// token r / g of head k * g + r % g. A tile is up to kTileRows consecutive
// rows [row_start, row_start + num_rows).
//
// PARTIAL: attention of one tile over the KV tokens [kv_start, kv_end) of
//   sequence b (causal masking per row when the kernel runs causal). With
//   dst_slot == kFinalOutput it writes out/lse directly (the range must then
//   be the whole sequence); otherwise it writes a partial (O / l in the
//   element type of out, the LSE in fp32) into slot dst_slot of the
//   workspace.
// REDUCE: LSE-weighted merge of the num_src partials in slots
//   [src_slot, src_slot + num_src) into dst_slot (final output or a slot);
//   1 <= num_src <= kMaxReduceInputs. Its rows may be any run of its
//   partials' tile: row r of the REDUCE is row slot_row + r of every source
//   slot (and of dst_slot when that is a slot), so one tile's merge can be
//   spread over several SMs by rows. slot_row is 0 for a whole tile, and
//   slot_row + num_rows <= kTileRows.
// Any instruction may wait for counter `wait_counter` to reach `wait_count`
// before it starts (acquire) and add 1 to `signal_counter` when its result
// is visible (release), GPU scope. -1 means "none" for both.
//
// Workspace: one buffer of 4-byte words, in this order
//   partial O    [num_slots, kTileRows, d_v] of the 16-bit element type
//                of q and out (two per word): a convex combination of V
//                rows, rounded once as the final output is
//   partial LSE  fp32 [num_slots, kTileRows], base-2 log units
//                (log2 of the sum of 2^(score * scale * log2(e)));
//                -inf for a row that saw no key
//   counters     int32 [num_counters], zeroed before every launch
// (offsets: WorkspacePartialLse, WorkspaceCounters, WorkspaceWords below).
#pragma once

#include <cstdint>

namespace tmla::isa {

constexpr int32_t kIsaVersion = 2;

constexpr int32_t kInstructionWords = 16;
constexpr int32_t kTileRows = 64;

// Limits of the kernel's inputs (the shapes it is built for): value head dim
// (DeepSeek MLA latent), rope dim (d_qk = kHeadDimV + kRopeDim), and cache
// pages of a multiple of kPageSizeMultiple tokens up to kMaxPageSize.
constexpr int32_t kHeadDimV = 512;
constexpr int32_t kRopeDim = 64;
constexpr int32_t kPageSizeMultiple = 16;
constexpr int32_t kMaxPageSize = 256;

// FP8 KV cache entry (FlashMLA's layout, so caches are interchangeable): per
// token and KV head, kFp8EntryBytes bytes holding the kHeadDimV latent values
// as float8_e4m3fn at byte 0, then kFp8NumScales little-endian float32 scales
// at byte kFp8ScalesOffset, scale i for latent values [i * kFp8ScaleGroup,
// (i + 1) * kFp8ScaleGroup) (value = fp8 * scale), then the kRopeDim rope
// values as bfloat16 at byte kFp8RopeOffset. The cache is uint8
// [num_pages, page_size, h_kv, kFp8EntryBytes].
constexpr int32_t kFp8EntryBytes = 656;
constexpr int32_t kFp8ScaleGroup = 128;
constexpr int32_t kFp8NumScales = 4;
constexpr int32_t kFp8ScalesOffset = 512;
constexpr int32_t kFp8RopeOffset = 528;

// Opcodes.
constexpr int32_t kOpStop = 0;
constexpr int32_t kOpPartial = 1;
constexpr int32_t kOpReduce = 2;

// Field offsets shared by every opcode.
constexpr int32_t kFieldOpcode = 0;
constexpr int32_t kFieldBatch = 1;
constexpr int32_t kFieldKvHead = 2;
constexpr int32_t kFieldRowStart = 3;
constexpr int32_t kFieldNumRows = 4;
constexpr int32_t kFieldDstSlot = 7;
constexpr int32_t kFieldSignalCounter = 8;
constexpr int32_t kFieldWaitCounter = 9;
constexpr int32_t kFieldWaitCount = 10;
// Predicted cost of the instruction in nanoseconds (planner's cost model);
// informational: the kernel does not read it.
constexpr int32_t kFieldCost = 11;

// PARTIAL fields.
constexpr int32_t kFieldKvStart = 5;
constexpr int32_t kFieldKvEnd = 6;

// REDUCE fields.
constexpr int32_t kFieldSrcSlot = 5;
constexpr int32_t kFieldNumSrc = 6;
constexpr int32_t kFieldSlotRow = 12;
constexpr int32_t kMaxReduceInputs = 256;

// In-kernel timing (the opt-in timed build of the kernel): one record per
// instruction slot, int32 [num_ctas, max_instructions, kTimingWords]. Times
// are %globaltimer nanoseconds (one clock for all SMs) split in two int32
// words, low word first. Slots a CTA did not execute are all zero.
constexpr int32_t kTimingWords = 9;
constexpr int32_t kTimingOpcode = 0;    // the opcode executed
constexpr int32_t kTimingStart = 1;     // fetched, before any wait
constexpr int32_t kTimingReady = 3;     // dependencies met, first data in smem
constexpr int32_t kTimingComputed = 5;  // last MMA or merge finished
constexpr int32_t kTimingEnd = 7;       // results written and signalled

// Sentinels.
constexpr int32_t kFinalOutput = -1;
constexpr int32_t kNoCounter = -1;

// Workspace layout (see the top of this file), in 4-byte words from its
// start, for num_slots slots of head_dim_v (even) columns; partial O
// starts at 0.
constexpr int64_t WorkspacePartialLse(int64_t num_slots, int64_t head_dim_v) {
  return num_slots * kTileRows * head_dim_v / 2;
}
constexpr int64_t WorkspaceCounters(int64_t num_slots, int64_t head_dim_v) {
  return WorkspacePartialLse(num_slots, head_dim_v) + num_slots * kTileRows;
}
constexpr int64_t WorkspaceWords(int64_t num_slots, int64_t num_counters,
                                 int64_t head_dim_v) {
  return WorkspaceCounters(num_slots, head_dim_v) + num_counters;
}

}  // namespace tmla::isa
