// The lengths-to-instructions planner that runs on the device (one CTA) and
// on the host (one thread), from one source: planner.cuh.
//
// It writes the instruction tensor of csrc/isa.h for the lengths it reads,
// choosing the layout of smallest predicted makespan (cost model of
// jax_thundermla/plan/cost.py, whose prices arrive in PlannerParams) among
//   A. the makespan scheduler's backwards layout (items <= SMs): every piece
//      alone on its SM, each cut item's merge spread by rows over the SMs of
//      its last pieces (jax_thundermla/plan/makespan.py, bit for bit);
//   B. the balanced scheduler's cut into equal-cost runs
//      (jax_thundermla/plan/balanced.py), each cut item merged in one level
//      spread by rows over the SMs of its pieces after the first, so that an
//      SM holds at most one REDUCE, after its PARTIALs;
//   C. no cuts: items longest first, kLptRounds rounds of "the next SMs'
//      worth of items to the least loaded SMs", the rest poured into the SMs
//      up to one common level (prefix sums over the SMs' room).
// A layout is measured only if it could win: B not when A's makespan is at
// most the mean load (the items' total cost over the SMs) or the shortest
// path B's quota allows an item of the longest sequence, or the plan has
// one item, C not when the best so far is at most its lower bound (the
// mean load or the costliest item) or items <= SMs (A is then never
// worse). Ties go to the earlier layout, so the plan is the one the three
// measures would pick. All arithmetic is integer, so the device and the
// host agree bit for bit.
#pragma once

#include <cstdint>

namespace tmla::plan {

// Items are placed as if they cost at least 1 / kAlpha of the mean item
// (layout B; balanced.ALPHA): this bounds the PARTIALs of one SM.
constexpr int32_t kAlpha = 8;
// Rounds of longest-first assignment before the rest is poured (layout C).
constexpr int32_t kLptRounds = 4;
// Threads of the device planner's CTA.
constexpr int32_t kPlannerThreads = 512;
// Most SMs the planner lays out: every merge is then one REDUCE level.
constexpr int32_t kMaxPlannerSms = 256;
// Entries of the REDUCE input price table: one per row count 0..kTileRows.
constexpr int32_t kInputPrices = 65;
// Words of the info output.
constexpr int32_t kInfoWords = 8;
// Info words.
constexpr int32_t kInfoLayout = 0;        // 0, 1, 2: layout A, B, C
constexpr int32_t kInfoLongest = 1;       // longest instruction list
constexpr int32_t kInfoSlots = 2;         // partial slots used
constexpr int32_t kInfoCounters = 3;      // counters used
constexpr int32_t kInfoMakespanLo = 4;    // predicted makespan, ns, low word
constexpr int32_t kInfoMakespanHi = 5;    // high word
constexpr int32_t kInfoOverflow = 6;      // 1 if no layout fit the capacity

// Division of 0 <= x < 2^31 by a divisor d (1 <= d < 2^31) fixed in advance,
// as a multiplication and a shift (Divide in planner.cuh): with l =
// ceil(log2 d) and m = ceil(2^(31 + l) / d) < 2^32, x m / 2^(31 + l) = x / d
// + x (m d - 2^(31 + l)) / (d 2^(31 + l)), whose second term is below 1 / d,
// so the floor is exact.
struct Divisor {
  uint32_t m;
  int32_t shift;
};

inline Divisor MakeDivisor(int32_t d) {
  int32_t l = 0;
  while ((int64_t{1} << l) < d) ++l;
  const uint64_t scale = uint64_t{1} << (31 + l);
  return Divisor{static_cast<uint32_t>((scale + d - 1) / d), 31 + l};
}

struct PlannerParams {
  const int32_t* lengths;     // [batch] tokens per sequence
  int32_t* instructions;      // [num_sms, capacity, kInstructionWords]
  int32_t* seqlens;           // [batch] the lengths clamped to [0, max_seqlen]
  int32_t* info;              // [kInfoWords]
  void* scratch;              // PlannerScratchBytes(...) bytes
  int32_t batch;
  int32_t h_kv;
  int32_t num_tiles;          // tiles per (sequence, KV head)
  int32_t last_tile_rows;     // rows of the last tile (kTileRows if full)
  int32_t num_sms;
  int32_t capacity;           // instructions per SM the tensor holds
  int32_t page_size;
  int32_t max_seqlen;
  int64_t partial_fixed_ns;   // CostModel.partial_fixed()
  int64_t reduce_fixed_ns;    // CostModel.reduce_fixed()
  int64_t page_ns_full;       // CostModel.page_ns(kTileRows, ...)
  int64_t page_ns_last;       // CostModel.page_ns(last_tile_rows, ...)
  int64_t input_ns[kInputPrices];  // reduce_input_ns(r, d_v), r = 0..64
  // Derived from the fields above by SetDerived.
  Divisor per_seq;            // items per sequence: h_kv * num_tiles
  Divisor per_head;           // items per (sequence, KV head): num_tiles
  Divisor per_page;           // page_size
  bool inputs_rise;           // input_ns does not decrease with the rows
};

// Fills p's fields derived from its shapes and prices (on the host, before
// planning).
inline void SetDerived(PlannerParams* p) {
  p->per_seq = MakeDivisor(p->h_kv * p->num_tiles);
  p->per_head = MakeDivisor(p->num_tiles);
  p->per_page = MakeDivisor(p->page_size);
  p->inputs_rise = true;
  for (int r = 1; r < kInputPrices; ++r) {
    p->inputs_rise = p->inputs_rise && p->input_ns[r - 1] <= p->input_ns[r];
  }
}

// Bytes of scratch the planner needs for these shapes (8-byte aligned
// arrays, see planner.cuh's Scratch).
int64_t PlannerScratchBytes(int64_t num_items, int64_t num_sms);

}  // namespace tmla::plan
