// PARTIAL: attention of a 64-row query tile over a KV token range.
//
// Consumer 0 computes S = Q K^T (wgmma, 36 k-steps over 576 dims), masks it,
// runs the online softmax in registers (base 2, scale folded in), and hands
// P (T, swizzled) and the per-row rescale to consumer 1 through shared
// memory; each consumer then accumulates its 256 output columns with
// O += P V (wgmma, V read transposed from the same stage as K; consumer 0
// takes P from its registers, consumer 1 from shared memory). A warp whose
// rows all kept their running maximum skips rescaling O.
// The P hand-off is a ring of one buffer and two mbarriers: consumer 0 waits
// hand_empty (consumer 1 is done with the previous P), writes, arrives on
// hand_full; consumer 1 waits hand_full, reads, and arrives on hand_empty
// once its PV has finished reading P. Consumer 0's next QK^T overlaps
// consumer 1's PV.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../config.h"
#include "../instruction.cuh"
#include "../params.h"
#include "../ptx.cuh"
#include "../smem.cuh"
#include "../timing.cuh"
#include "../wgmma.cuh"

namespace tmla::ops {

constexpr float kLn2 = 0.69314718055994530942f;

template <typename T>
struct Pack2;
template <>
struct Pack2<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t Of(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 Unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  }
};
template <>
struct Pack2<__half> {
  static __device__ __forceinline__ uint32_t Of(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 Unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<const __half2*>(&x));
  }
};

// Where this thread's accumulator rows and columns are (wgmma m64nN f32
// layout): rows r0 = 16 * warp + lane / 4 and r0 + 8; register i holds
// column 8 * (i / 4) + 2 * (lane % 4) + i % 2 of row (i % 4 < 2 ? r0 : r1).
struct Fragment {
  int r0;
  int r1;
  int col;  // 2 * (lane % 4)
  static __device__ __forceinline__ Fragment Of(int thread_in_wg) {
    const int warp = thread_in_wg / 32;
    const int lane = thread_in_wg % 32;
    return Fragment{16 * warp + lane / 4, 16 * warp + lane / 4 + 8,
                    2 * (lane % 4)};
  }
};

// Scores of one KV block held per thread (wgmma m64nN f32 layout).
constexpr int kScoreRegs = config::kBlockTokens / 2;

// Query row of the tile -> (query token, query head) of the sequence.
struct RowMap {
  int group;  // h_q / h_kv
  __device__ __forceinline__ int Token(const Instruction& in, int r) const {
    return (in.row_start + r) / group;
  }
  __device__ __forceinline__ int Head(const Instruction& in, int r) const {
    return in.kv_head * group + (in.row_start + r) % group;
  }
};

// Zeroes the V columns [col0, col0 + 256) of tokens at or past `valid_hi`
// in a loaded stage, so that P = 0 never meets NaN/garbage in P V.
__device__ __forceinline__ void ZeroTail(uint8_t* stage, int block_start,
                                         int valid_hi, int col0,
                                         int thread_in_wg) {
  const int first = max(valid_hi - block_start, 0);
  if (first >= config::kBlockTokens) return;
  constexpr int kChunksPerRow = config::kSwizzleBytes / 16;  // 8
  constexpr int kBlocksPerConsumer = config::kColsPerConsumer /
                                     config::kColBlock;  // 4
  const int rows = config::kBlockTokens - first;
  const int work = rows * kBlocksPerConsumer * kChunksPerRow;
  const int col_block0 = col0 / config::kColBlock;
  for (int w = thread_in_wg; w < work; w += config::kWarpgroupThreads) {
    const int row = first + w / (kBlocksPerConsumer * kChunksPerRow);
    const int rest = w % (kBlocksPerConsumer * kChunksPerRow);
    const int j = col_block0 + rest / kChunksPerRow;
    const int chunk = rest % kChunksPerRow;
    *reinterpret_cast<int4*>(stage + j * config::kKvColBlockBytes +
                             ptx::Swizzle128(row, chunk)) =
        make_int4(0, 0, 0, 0);
  }
}

// Bits of a 16-bit element that are all ones exactly when it is Inf/NaN.
template <typename T>
struct NonFinite;
template <>
struct NonFinite<__nv_bfloat16> {
  static constexpr uint32_t kExponent = 0x7F80;
};
template <>
struct NonFinite<__half> {
  static constexpr uint32_t kExponent = 0x7C00;
};

// Zeroes the Inf/NaN elements of a 32-bit word of two 16-bit elements.
template <typename T>
__device__ __forceinline__ uint32_t ZeroNonFinite2(uint32_t x) {
  constexpr uint32_t kE = NonFinite<T>::kExponent;
  const uint32_t lo = (x & kE) == kE ? 0xFFFFu : 0u;
  const uint32_t hi = ((x >> 16) & kE) == kE ? 0xFFFF0000u : 0u;
  return x & ~(lo | hi);
}

// First key that some query row of a causal PARTIAL does not see: keys in
// [HiddenFrom, valid_hi) are masked for some rows and seen by others (past
// valid_hi the tail is zeroed anyway). Without a causal mask none is.
__device__ __forceinline__ int HiddenFrom(const MlaDecodeParams& p, int len,
                                          int valid_hi) {
  return p.causal && p.s_q > 1 ? len - p.s_q + 1 : valid_hi;
}

// Whether the block at block_start holds keys of [hidden_from, valid_hi).
__device__ __forceinline__ bool HoldsHiddenKeys(int block_start,
                                                int hidden_from,
                                                int valid_hi) {
  return hidden_from < min(valid_hi, block_start + config::kBlockTokens) &&
         block_start < valid_hi;
}

// Zeroes Inf/NaN in the V columns [col0, col0 + 256) of the block's keys
// [lo, hi). A row that does not see such a key has P = 0 for it, and
// 0 x NaN in P V would still reach it; a row that sees it is NaN through
// its score already, since V columns are key columns. Runs after QK^T has
// read the stage; the caller fences and syncs before P V.
template <typename T>
__device__ __forceinline__ void ZeroNonFiniteV(uint8_t* stage, int block_start,
                                               int lo, int hi, int col0,
                                               int thread_in_wg) {
  const int first = max(lo - block_start, 0);
  const int last = min(hi - block_start, config::kBlockTokens);
  constexpr int kChunksPerRow = config::kSwizzleBytes / 16;  // 8
  constexpr int kBlocksPerConsumer = config::kColsPerConsumer /
                                     config::kColBlock;  // 4
  constexpr int kPerRow = kBlocksPerConsumer * kChunksPerRow;
  const int col_block0 = col0 / config::kColBlock;
  const int work = max(last - first, 0) * kPerRow;
  for (int w = thread_in_wg; w < work; w += config::kWarpgroupThreads) {
    const int row = first + w / kPerRow;
    const int j = col_block0 + (w % kPerRow) / kChunksPerRow;
    const int chunk = w % kChunksPerRow;
    int4* at = reinterpret_cast<int4*>(stage + j * config::kKvColBlockBytes +
                                       ptx::Swizzle128(row, chunk));
    const int4 v = *at;
    const int4 fixed = make_int4(
        static_cast<int>(ZeroNonFinite2<T>(static_cast<uint32_t>(v.x))),
        static_cast<int>(ZeroNonFinite2<T>(static_cast<uint32_t>(v.y))),
        static_cast<int>(ZeroNonFinite2<T>(static_cast<uint32_t>(v.z))),
        static_cast<int>(ZeroNonFinite2<T>(static_cast<uint32_t>(v.w))));
    if (fixed.x != v.x || fixed.y != v.y || fixed.z != v.z ||
        fixed.w != v.w) {
      *at = fixed;
    }
  }
}

// Rescales this thread's rows of O by their new-max factors; skipped by a
// warp whose rows' maxima all stayed (factors exactly 1), which is most
// blocks of a long range.
__device__ __forceinline__ void RescaleRows(float (&o)[128], float alpha0,
                                            float alpha1) {
  if (__all_sync(0xffffffff, alpha0 == 1.f && alpha1 == 1.f)) return;
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] *= (i % 4) >= 2 ? alpha1 : alpha0;
}

// O[64 x 256 of this consumer] += P[64 x kBlockTokens] V[kBlockTokens x 256].
template <typename T>
__device__ __forceinline__ void AccumulatePv(float (&o)[128],
                                             const Smem& smem,
                                             const uint8_t* stage,
                                             int consumer) {
  const uint32_t p_addr = ptx::SmemAddr(smem.p);
  const uint32_t v_addr =
      ptx::SmemAddr(stage) + consumer * (config::kColsPerConsumer /
                                         config::kColBlock) *
                                 config::kKvColBlockBytes;
  ptx::WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < config::kBlockTokens / 16; ++kk) {
    // K-major P: 16 tokens = 32 bytes along the swizzled row.
    // MN-major V: 16 tokens = 16 rows of 128 bytes.
    wgmma::MmaM64N256K16TransB<T>(
        o, ptx::DescKMajor(p_addr + kk * 32),
        ptx::DescMnMajor(v_addr + kk * 16 * config::kSwizzleBytes,
                         config::kKvColBlockBytes),
        true);
  }
  ptx::WgmmaCommit();
  ptx::WgmmaWaitAll();
}

// Consumer 0's O[64 x 256] += P V with P from its registers (pk, see the
// softmax) and V columns [0, 256) of the stage; with kWait false it
// returns with the MMAs in flight (their wgmma group committed).
template <typename T, bool kWait = true>
__device__ __forceinline__ void AccumulatePvFromRegisters(
    float (&o)[128], const uint32_t (&pk)[kScoreRegs / 2],
    const uint8_t* stage) {
  const uint32_t v_addr = ptx::SmemAddr(stage);
  ptx::WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < config::kBlockTokens / 16; ++kk) {
    const uint32_t a[4] = {pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2],
                           pk[4 * kk + 3]};
    wgmma::MmaM64N256K16RegATransB<T>(
        o, a,
        ptx::DescMnMajor(v_addr + kk * 16 * config::kSwizzleBytes,
                         config::kKvColBlockBytes),
        true);
  }
  ptx::WgmmaCommit();
  if constexpr (kWait) ptx::WgmmaWaitAll();
}

// Transposes a 4 x 4 matrix of words held by the 4 lanes of a quad (lane
// `quad` holds row quad in a): afterwards a[k] is lane k's a[quad]. Two
// rounds of pairwise swaps, each of two shuffles.
__device__ __forceinline__ void QuadTranspose(uint32_t (&a)[4], int quad) {
  // Round 1: swap with lane quad ^ 1 the words k whose bit 0 is not quad's.
  const bool odd = quad & 1;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    uint32_t& lo = a[2 * t];
    uint32_t& hi = a[2 * t + 1];
    const uint32_t got = __shfl_xor_sync(0xffffffff, odd ? lo : hi, 1);
    lo = odd ? got : lo;
    hi = odd ? hi : got;
  }
  // Round 2: the same with lane quad ^ 2 and bit 1.
  const bool upper = quad & 2;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    uint32_t& lo = a[t];
    uint32_t& hi = a[t + 2];
    const uint32_t got = __shfl_xor_sync(0xffffffff, upper ? lo : hi, 2);
    lo = upper ? got : lo;
    hi = upper ? hi : got;
  }
}

// Writes this consumer's 64 x 256 slice of O (scaled per row, as T) to the
// final output or to a partial slot.
template <typename T>
__device__ __forceinline__ void StoreO(const MlaDecodeParams& p,
                                       const Instruction& in,
                                       const float (&o)[128],
                                       const Fragment& f, float scale0,
                                       float scale1, int consumer) {
  const RowMap map{p.h_q / p.h_kv};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? f.r1 : f.r0;
    const bool live = r < in.num_rows;
    const float scale = half ? scale1 : scale0;
    // Every lane shuffles; a quad shares its row, so lives or not as one.
    const int r_live = live ? r : 0;
    const int64_t row =
        in.dst_slot == isa::kFinalOutput
            ? (static_cast<int64_t>(in.batch) * p.s_q +
               map.Token(in, r_live)) * p.h_q + map.Head(in, r_live)
            : static_cast<int64_t>(in.dst_slot) * config::kTileRows + r_live;
    T* base = static_cast<T*>(in.dst_slot == isa::kFinalOutput ? p.out
                                                               : p.partial_o);
    // Each group of 4 column chunks of 8 is transposed over the row's 4
    // lanes, so that a lane stores one whole chunk (16 bytes) and the quad
    // 64 contiguous bytes: 4-byte stores, 16 bytes per row per instruction,
    // leave half of each sector to merge in L2.
    const int quad = f.col / 2;  // lane % 4
    uint4* dst = reinterpret_cast<uint4*>(
        base + row * config::kHeadDimV + consumer * config::kColsPerConsumer);
#pragma unroll
    for (int g = 0; g < 8; ++g) {
      uint32_t a[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = (4 * g + k) * 4 + 2 * half;
        a[k] = Pack2<T>::Of(o[i] * scale, o[i + 1] * scale);
      }
      QuadTranspose(a, quad);
      if (live) dst[4 * g + quad] = make_uint4(a[0], a[1], a[2], a[3]);
    }
  }
}

// Starts loading the query tile into shared memory (swizzled, zero rows
// past num_rows) with consumer 0's 128 threads: every 16-byte piece is in
// flight at once (cp.async); the PARTIAL that uses it waits for them.
template <typename T>
__device__ __forceinline__ void IssueQ(const MlaDecodeParams& p,
                                       const Instruction& in, const Smem& smem,
                                       int thread_in_wg) {
  constexpr int kChunksPerRow = config::kHeadDimQK * 2 / 16;  // 72
  constexpr int kPieces = config::kTileRows * kChunksPerRow;
  static_assert(kPieces % config::kWarpgroupThreads == 0, "even split");
  const RowMap map{p.h_q / p.h_kv};
  const T* q = static_cast<const T*>(p.q);
#pragma unroll 4
  for (int k = 0; k < kPieces / config::kWarpgroupThreads; ++k) {
    const int w = k * config::kWarpgroupThreads + thread_in_wg;
    const int r = w / kChunksPerRow;
    const int chunk = w % kChunksPerRow;
    const bool valid = r < in.num_rows;
    // Rows past num_rows read row 0 of the tile (in bounds) with size 0.
    const int src_r = valid ? r : 0;
    const int64_t row =
        (static_cast<int64_t>(in.batch) * p.s_q + map.Token(in, src_r)) *
            p.h_q + map.Head(in, src_r);
    ptx::CpAsync16(smem.q + (chunk / 8) * config::kQColBlockBytes +
                       ptx::Swizzle128(r, chunk % 8),
                   reinterpret_cast<const int4*>(q + row * config::kHeadDimQK) +
                       chunk,
                   valid);
  }
}

// Whether the sequence of this PARTIAL cannot be decoded as planned: its
// length is outside [0, max_pages * page_size] or differs from the length
// the instructions were planned for, or a page the instruction reads (of
// the sequence's first ceil(len / page_size)) is outside [0, num_pages).
// Each of consumer 0's threads checks a share of the pages and returns its
// own verdict (the caller ORs them over the warpgroup). A poisoned PARTIAL
// still runs (out-of-range pages load zeros) and writes NaN, which every
// REDUCE reading it passes on.
__device__ __forceinline__ bool Undecodable(const MlaDecodeParams& p,
                                            const Instruction& in,
                                            const KvRange& range,
                                            int thread_in_wg) {
  const int32_t len = __ldg(p.seqlens + in.batch);
  const int32_t table_tokens = p.max_pages * p.page_size;
  bool bad = len < 0 || len > table_tokens ||
             len != __ldg(p.plan_seqlens + in.batch);
  const int32_t* table = p.block_table +
                         static_cast<int64_t>(in.batch) * p.max_pages;
  const int32_t hi = min(range.hi, max(len, 0));
  const int32_t page_hi = (hi + p.page_size - 1) / p.page_size;
  for (int32_t page = range.lo / p.page_size + thread_in_wg; page < page_hi;
       page += config::kWarpgroupThreads) {
    const int32_t id = __ldg(table + page);
    bad |= id < 0 || id >= p.num_pages;
  }
  return bad;
}

// Last key (exclusive) that tile row r may see, from the range and mask.
__device__ __forceinline__ int RowLimit(const MlaDecodeParams& p,
                                        const Instruction& in, int r,
                                        int valid_hi, int len) {
  if (!p.causal) return valid_hi;
  const int token = (in.row_start + r) / (p.h_q / p.h_kv);
  return min(valid_hi, len - p.s_q + token + 1);
}

__device__ __forceinline__ float QuadMax(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Stages the words of the CTA's instruction `index + 1` (a STOP past the
// end) in shared memory, with cp.async by 4 threads; visible to consumer 0
// after its next cp.async wait and barrier.
__device__ __forceinline__ void IssueNext(const MlaDecodeParams& p,
                                          const Smem& smem, int index,
                                          int thread_in_wg) {
  constexpr int kPieces = isa::kInstructionWords / 4;
  if (thread_in_wg >= kPieces) return;
  const bool exists = index + 1 < p.max_instructions;
  const int4* src = Instruction::Words(p, blockIdx.x, exists ? index + 1 : 0);
  ptx::CpAsync16(smem.next + 4 * thread_in_wg, src + thread_in_wg, exists);
}

// The barrier that column block `col_block` of a stage lands on: its own
// with kBoxes (config::BoxBarriers), else the stage's `full`.
template <bool kBoxes>
__device__ __forceinline__ uint64_t* ColumnBarrier(const Smem& smem, int stage,
                                                   int col_block) {
  return kBoxes ? smem.BoxFull(stage, col_block) : &smem.full[stage];
}

// Waits until column blocks [first, last) of the stage of block
// `block_counter` have landed.
template <bool kBoxes>
__device__ __forceinline__ void WaitColumns(const Smem& smem, int block_counter,
                                            int first, int last) {
  const int stage = StageOf(block_counter);
  const uint32_t phase = PhaseOf(block_counter);
  if constexpr (kBoxes) {
    for (int j = first; j < last; ++j) {
      ptx::MbarWaitWarp(ColumnBarrier<kBoxes>(smem, stage, j), phase);
    }
  } else {
    ptx::MbarWaitWarp(ColumnBarrier<kBoxes>(smem, stage, first), phase);
  }
}

// Consumer 0: QK^T, softmax, P hand-off, its half of PV, LSE, for the
// instruction `in` at position `index` of the CTA's list. The query tile is
// already in flight when `q_issued`; once its last block is done it starts
// loading the query tile of the next instruction when that is a PARTIAL
// too, and returns whether it did. With kBoxes a whole block's QK^T starts
// on its first column block and waits for each next one as it goes; with
// kPvAsync (config::kPvAsync, a 16-bit cache) a block's P V is waited for
// under the next block's QK^T when that block has landed.
template <typename T, bool kBoxes, bool kPvAsync, typename MarksT>
__device__ __forceinline__ bool PartialSoftmaxConsumer(
    const MlaDecodeParams& p, const Instruction& in, int index,
    bool q_issued, const Smem& smem, int thread_in_wg, Pipeline& pipe,
    MarksT& marks) {
  const Fragment f = Fragment::Of(thread_in_wg);
  const KvRange range = KvRange::Of(in, p, config::kBlockTokens);
  const int len = min(max(__ldg(p.seqlens + in.batch), 0),
                      p.max_pages * p.page_size);
  const int valid_hi = min(range.hi, len);
  const int hidden_from = HiddenFrom(p, len, valid_hi);
  const int limit0 = RowLimit(p, in, f.r0, valid_hi, len);
  const int limit1 = RowLimit(p, in, f.r1, valid_hi, len);
  // Keys every row of the tile sees: [range.lo, tile_limit). Row 0 holds
  // the tile's first query token, whose causal limit is the smallest.
  const int tile_limit = RowLimit(p, in, 0, valid_hi, len);

  if (!q_issued) IssueQ<T>(p, in, smem, thread_in_wg);
  IssueNext(p, smem, index, thread_in_wg);
  const bool bad = Undecodable(p, in, range, thread_in_wg);
  ptx::CpAsyncWaitAll();
  ptx::FenceProxyAsync();
  // The query tile is in shared memory for all, and all know the verdict.
  const bool poisoned = ptx::BarSyncOr(config::kBarConsumer0,
                                       config::kWarpgroupThreads, bad);

  const uint32_t q_addr = ptx::SmemAddr(smem.q);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  for (int b = 0; b < range.num_blocks; ++b, ++pipe.block_counter) {
    const int stage = StageOf(pipe.block_counter);
    const int block_start = range.first + b * config::kBlockTokens;
    uint8_t* kv = smem.Stage(stage);
    const bool tail = valid_hi - block_start < config::kBlockTokens;
    // With kPvAsync the previous block's P V may still run: it is waited for
    // here if this block has not landed yet (its stage must go back to the
    // producer before this wait), else under this block's QK^T.
    bool pv_pending = kPvAsync && b > 0;
    if (pv_pending && !ptx::MbarTest(ColumnBarrier<kBoxes>(smem, stage, 0),
                                     PhaseOf(pipe.block_counter))) {
      ptx::WgmmaWaitAll();
      if (thread_in_wg == 0) {
        ptx::MbarArrive(&smem.empty[StageOf(pipe.block_counter - 1)]);
      }
      pv_pending = false;
    }
    // A tail block is zeroed past its keys first, so it waits for all.
    WaitColumns<kBoxes>(smem, pipe.block_counter, 0,
                        tail ? config::kNumColBlocks : 1);
    if (b == 0) marks.Ready();
    if (tail) {
      ZeroTail(kv, block_start, valid_hi, 0, thread_in_wg);
      ptx::FenceProxyAsync();
      ptx::BarSync(config::kBarConsumer0, config::kWarpgroupThreads);
    }

    float s[kScoreRegs];
    const uint32_t k_addr = ptx::SmemAddr(kv);
    ptx::WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < config::kHeadDimQK / 16; ++ks) {
      if (kBoxes && ks > 0 && ks % 4 == 0) {
        // Unconditional (a tail block's columns have all landed: the wait
        // returns at once), so that no MMA sits on a divergent path, which
        // would make ptxas serialize them.
        WaitColumns<kBoxes>(smem, pipe.block_counter, ks / 4, ks / 4 + 1);
        ptx::WgmmaFence();
      }
      // 16 dims = 32 bytes of a swizzled row; 4 k-steps per column block.
      const uint32_t in_row = (ks % 4) * 32;
      wgmma::MmaM64N64K16<T>(
          s,
          ptx::DescKMajor(q_addr + (ks / 4) * config::kQColBlockBytes + in_row),
          ptx::DescKMajor(k_addr + (ks / 4) * config::kKvColBlockBytes +
                          in_row),
          ks > 0);
    }
    ptx::WgmmaCommit();
    if (pv_pending) {
      // The previous block's P V (the group before this QK^T's) is done:
      // its stage goes back to the producer while this QK^T runs.
      ptx::WgmmaWaitAllButLast();
      if (thread_in_wg == 0) {
        ptx::MbarArrive(&smem.empty[StageOf(pipe.block_counter - 1)]);
      }
    }
    ptx::WgmmaWaitAll();
    // Visible to this consumer's P V through the fence and barrier of the
    // P hand-off below.
    if (HoldsHiddenKeys(block_start, hidden_from, valid_hi)) {
      ZeroNonFiniteV<T>(kv, block_start, hidden_from, valid_hi, 0,
                        thread_in_wg);
    }

    // Mask (only a block holding a key that some row does not see: the
    // test is the same for the whole warpgroup), scale to base 2, online
    // softmax.
    float mx0 = -INFINITY, mx1 = -INFINITY;
    if (block_start < range.lo ||
        block_start + config::kBlockTokens > tile_limit) {
#pragma unroll
      for (int i = 0; i < kScoreRegs; ++i) {
        const int key = block_start + 8 * (i / 4) + f.col + (i % 2);
        const bool upper = (i % 4) >= 2;
        const bool ok = key >= range.lo && key < (upper ? limit1 : limit0);
        s[i] = ok ? s[i] * p.scale_log2 : -INFINITY;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kScoreRegs; ++i) s[i] *= p.scale_log2;
    }
#pragma unroll
    for (int i = 0; i < kScoreRegs; ++i) {
      if ((i % 4) >= 2) {
        mx1 = fmaxf(mx1, s[i]);
      } else {
        mx0 = fmaxf(mx0, s[i]);
      }
    }
    const float new0 = fmaxf(m0, QuadMax(mx0));
    const float new1 = fmaxf(m1, QuadMax(mx1));
    const float use0 = new0 == -INFINITY ? 0.f : new0;
    const float use1 = new1 == -INFINITY ? 0.f : new1;
    const float alpha0 = exp2f(m0 - use0);
    const float alpha1 = exp2f(m1 - use1);
    m0 = new0;
    m1 = new1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int i = 0; i < kScoreRegs; ++i) {
      const bool upper = (i % 4) >= 2;
      s[i] = exp2f(s[i] - (upper ? use1 : use0));
      if (upper) {
        sum1 += s[i];
      } else {
        sum0 += s[i];
      }
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;

    // P as T pairs: register i / 2 holds scores i and i + 1, which is the
    // wgmma A-fragment layout of k-step i / 8 (registers 4 k .. 4 k + 3).
    uint32_t pk[kScoreRegs / 2];
#pragma unroll
    for (int i = 0; i < kScoreRegs; i += 2) pk[i / 2] = Pack2<T>::Of(s[i], s[i + 1]);
    // Hand P and the rescale to consumer 1.
    ptx::MbarWaitWarp(smem.hand_empty, (pipe.round & 1) ^ 1);
#pragma unroll
    for (int i = 0; i < kScoreRegs; i += 2) {
      const int r = (i % 4) >= 2 ? f.r1 : f.r0;
      const int key = 8 * (i / 4) + f.col;
      *reinterpret_cast<uint32_t*>(smem.p + ptx::Swizzle128(r, key / 8) +
                                   (key % 8) * 2) = pk[i / 2];
    }
    // The four lanes of a row store the same value: a lane-divergent branch
    // here would make ptxas serialize the wgmma below (warning C7520).
    smem.row_scale[f.r0] = alpha0;
    smem.row_scale[f.r1] = alpha1;
    ptx::FenceProxyAsync();
    ptx::MbarArrive(smem.hand_full);
    ++pipe.round;
    // This consumer's P V takes P from registers; only the V cleaned above
    // must be seen by every warp's wgmma first.
    if (HoldsHiddenKeys(block_start, hidden_from, valid_hi)) {
      ptx::BarSync(config::kBarConsumer0, config::kWarpgroupThreads);
    }

    RescaleRows(o, alpha0, alpha1);
    if constexpr (kPvAsync) {
      // Waited for, and its stage released, under the next block's QK^T
      // (or after the loop).
      AccumulatePvFromRegisters<T, false>(o, pk, kv);
    } else {
      AccumulatePvFromRegisters<T>(o, pk, kv);
      if (thread_in_wg == 0) ptx::MbarArrive(&smem.empty[stage]);
    }
  }
  if constexpr (kPvAsync) {
    ptx::WgmmaWaitAll();
    if (range.num_blocks > 0 && thread_in_wg == 0) {
      ptx::MbarArrive(&smem.empty[StageOf(pipe.block_counter - 1)]);
    }
  }

  marks.Computed();
  // The next PARTIAL's query tile loads under this epilogue, once every
  // warp is past the barrier below: each has waited for its last QK^T, so
  // none reads the tile any more.
  const Instruction next =
      Instruction::Unpack(reinterpret_cast<const int4*>(smem.next), false);
  const bool prefetch = next.opcode == isa::kOpPartial && next.Valid(p) &&
                        !(config::kSignalBeforeQ && in.HasSignal(p));
  // All have read the staged words before the next PARTIAL restages them,
  // and are done with the query tile.
  ptx::BarSync(config::kBarConsumer0, config::kWarpgroupThreads);
  if (prefetch) IssueQ<T>(p, next, smem, thread_in_wg);
  // Epilogue: 1/l to consumer 1, then O and LSE out.
  l0 = QuadSum(l0);
  l1 = QuadSum(l1);
  const float inv0 = poisoned ? NAN : l0 > 0.f ? 1.f / l0 : 0.f;
  const float inv1 = poisoned ? NAN : l1 > 0.f ? 1.f / l1 : 0.f;
  ptx::MbarWaitWarp(smem.hand_empty, (pipe.round & 1) ^ 1);
  smem.row_scale[f.r0] = inv0;
  smem.row_scale[f.r1] = inv1;
  ptx::MbarArrive(smem.hand_full);
  ++pipe.round;
  StoreO<T>(p, in, o, f, inv0, inv1, 0);

  if (f.col == 0) {
    const RowMap map{p.h_q / p.h_kv};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = half ? f.r1 : f.r0;
      if (r >= in.num_rows) continue;
      const float l = half ? l1 : l0;
      const float m = half ? m1 : m0;
      // l is NaN when a key the row sees holds NaN/Inf: its LSE is NaN.
      const float lse2 = poisoned ? NAN
                         : l > 0.f ? m + log2f(l)
                         : l == 0.f ? -INFINITY
                                    : NAN;
      if (in.dst_slot == isa::kFinalOutput) {
        const int64_t at =
            (static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) *
                p.s_q + map.Token(in, r);
        p.lse[at] = l == 0.f && !poisoned ? INFINITY : lse2 * kLn2;
      } else {
        p.partial_lse[static_cast<int64_t>(in.dst_slot) * config::kTileRows +
                      r] = lse2;
      }
    }
  }
  return prefetch;
}

// Consumer 1: its half of PV with consumer 0's P, then its half of O. With
// kBoxes it waits for its own V columns only.
template <typename T, bool kBoxes>
__device__ __forceinline__ void PartialPvConsumer(const MlaDecodeParams& p,
                                                  const Instruction& in,
                                                  const Smem& smem,
                                                  int thread_in_wg,
                                                  Pipeline& pipe) {
  const Fragment f = Fragment::Of(thread_in_wg);
  const KvRange range = KvRange::Of(in, p, config::kBlockTokens);
  const int len = min(max(__ldg(p.seqlens + in.batch), 0),
                      p.max_pages * p.page_size);
  const int valid_hi = min(range.hi, len);
  const int hidden_from = HiddenFrom(p, len, valid_hi);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;

  for (int b = 0; b < range.num_blocks; ++b, ++pipe.block_counter) {
    const int stage = StageOf(pipe.block_counter);
    const int block_start = range.first + b * config::kBlockTokens;
    uint8_t* kv = smem.Stage(stage);
    constexpr int kFirstV = config::kColsPerConsumer / config::kColBlock;
    WaitColumns<kBoxes>(smem, pipe.block_counter, kFirstV,
                        kFirstV + config::kColsPerConsumer / config::kColBlock);
    if (valid_hi - block_start < config::kBlockTokens) {
      ZeroTail(kv, block_start, valid_hi, config::kColsPerConsumer,
               thread_in_wg);
      ptx::FenceProxyAsync();
      ptx::BarSync(config::kBarConsumer0 + 1, config::kWarpgroupThreads);
    }
    ptx::MbarWaitWarp(smem.hand_full, pipe.round & 1);
    if (HoldsHiddenKeys(block_start, hidden_from, valid_hi)) {
      // Consumer 0's QK^T (before the hand-off) is done with the stage.
      ZeroNonFiniteV<T>(kv, block_start, hidden_from, valid_hi,
                        config::kColsPerConsumer, thread_in_wg);
      ptx::FenceProxyAsync();
      ptx::BarSync(config::kBarConsumer0 + 1, config::kWarpgroupThreads);
    }
    const float alpha0 = smem.row_scale[f.r0];
    const float alpha1 = smem.row_scale[f.r1];
    RescaleRows(o, alpha0, alpha1);
    AccumulatePv<T>(o, smem, kv, 1);
    ptx::MbarArrive(smem.hand_empty);
    ++pipe.round;
    if (thread_in_wg == 0) ptx::MbarArrive(&smem.empty[stage]);
  }

  ptx::MbarWaitWarp(smem.hand_full, pipe.round & 1);
  const float inv0 = smem.row_scale[f.r0];
  const float inv1 = smem.row_scale[f.r1];
  ptx::MbarArrive(smem.hand_empty);
  ++pipe.round;
  StoreO<T>(p, in, o, f, inv0, inv1, 1);
}

}  // namespace tmla::ops
