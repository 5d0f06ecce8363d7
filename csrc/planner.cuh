// The planner of planner.h, written once for one CTA (device) and one thread
// (host). Every phase is a loop `for (i = c.tid; i < count; i += c.nt)`
// ended by a barrier; the block-wide scan, reduction, search and sort below
// have a parallel device body and a serial host body with the same integer
// result. The device's time goes to its barriers (about 15-25 per plan for
// up to 512 items), so phases share them: reductions carry two values,
// scans several arrays, and searches test hundreds of candidates at once.
#pragma once

#include <cstdint>

#include "isa.h"
#include "planner.h"

#if defined(__CUDACC__)
#define TMLA_HD __host__ __device__
#else
#define TMLA_HD
#endif

#if !defined(__CUDA_ARCH__)
#include <algorithm>
#endif

namespace tmla::plan {

// Threads of the loops: (0, 1) on the host.
struct Ctx {
  int tid;
  int nt;
  int turn = 0;  // which of BlockReduce's two buffers is next
};

constexpr int64_t kNever = INT64_MAX;
constexpr int64_t kLowest = INT64_MIN;
// Costs are below 2^31 (the int32 cost word), so this orders them in keys.
constexpr uint64_t kCostKeyBase = uint64_t{1} << 31;

TMLA_HD inline void Sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

TMLA_HD inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
TMLA_HD inline int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }
// a / b for a >= 0, b > 0; in 32 bits when both fit (the device's 64-bit
// division is a long subroutine), with the same result.
TMLA_HD inline int64_t Div64(int64_t a, int64_t b) {
  if ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32 == 0) {
    return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  }
  return a / b;
}
TMLA_HD inline int64_t CeilDiv(int64_t a, int64_t b) {
  return Div64(a + b - 1, b);
}

// Block-wide sums and maxima. Each warp reduces its lanes by shuffles and
// writes one word per value to one of two buffers; after one barrier every
// warp reduces the warps' words. The buffers alternate (c.turn), so the next
// reduction writes the other one: one barrier per reduction.
struct Reduced {
  int64_t sum, max;  // with both_max, sum holds the first value's max
};

// Sum (or, with both_max, max) of a and max of b over groups of `width`
// lanes (device); the host returns them.
template <bool both_max = false>
TMLA_HD inline Reduced GroupReduce(int64_t a, int64_t b, int width) {
#if defined(__CUDA_ARCH__)
  for (int off = width >> 1; off > 0; off >>= 1) {
    const int64_t y = __shfl_xor_sync(~0u, a, off, width);
    a = both_max ? Max64(a, y) : a + y;
    b = Max64(b, __shfl_xor_sync(~0u, b, off, width));
  }
#else
  (void)width;
#endif
  return Reduced{a, b};
}

// Block-wide sum (or, with both_max, max) of a and max of b; red holds
// 2 * 64 words.
template <bool both_max = false>
TMLA_HD inline Reduced BlockReduce(Ctx& c, int64_t a, int64_t b,
                                   int64_t* red) {
#if defined(__CUDA_ARCH__)
  Reduced r = GroupReduce<both_max>(a, b, 32);
  int64_t* buf = red + 64 * c.turn;
  c.turn ^= 1;
  const int lane = c.tid & 31, warps = c.nt >> 5;
  if (lane == 0) {
    buf[c.tid >> 5] = r.sum;
    buf[32 + (c.tid >> 5)] = r.max;
  }
  __syncthreads();
  return GroupReduce<both_max>(
      lane < warps ? buf[lane] : (both_max ? kLowest : 0),
      lane < warps ? buf[32 + lane] : kLowest, 32);
#else
  (void)c;
  (void)red;
  return Reduced{a, b};
#endif
}

TMLA_HD inline int64_t BlockSum(Ctx& c, int64_t v, int64_t* red) {
  return BlockReduce(c, v, kLowest, red).sum;
}

TMLA_HD inline int64_t BlockMax(Ctx& c, int64_t v, int64_t* red) {
  return BlockReduce(c, 0, v, red).max;
}

TMLA_HD inline void AtomicAdd(int64_t* at, int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(at),
            static_cast<unsigned long long>(v));
#else
  *at += v;
#endif
}

// *at = max(*at, v) for v >= 0 (and *at >= 0).
TMLA_HD inline void AtomicMax(int64_t* at, int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<unsigned long long*>(at),
            static_cast<unsigned long long>(v));
#else
  *at = Max64(*at, v);
#endif
}

// Inclusive prefix sums of `count` arrays at once, two barriers for all:
// a[k][i] becomes init(k, 0) + ... + init(k, i) for i < n[k]; tmp holds
// 32 * count words. init may read what other threads wrote before the
// call; on the device each thread scans its own run of each array, then
// the runs' totals are scanned by warp shuffles, every warp scanning the
// warps' totals itself.
template <int count, typename Init>
TMLA_HD inline void ScanN(const Ctx& c, int64_t* const (&a)[count],
                          const int (&n)[count], int64_t* tmp,
                          const Init& init) {
#if defined(__CUDA_ARCH__)
  const int lane = c.tid & 31, warp = c.tid >> 5, warps = c.nt >> 5;
  int64_t own[count], x[count];
#pragma unroll
  for (int k = 0; k < count; ++k) {
    const int per = (n[k] + c.nt - 1) / c.nt;
    const int lo = min(n[k], c.tid * per), hi = min(n[k], lo + per);
    own[k] = 0;
    for (int i = lo; i < hi; ++i) a[k][i] = (own[k] += init(k, i));
    x[k] = own[k];
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t y = __shfl_up_sync(~0u, x[k], off);
      if (lane >= off) x[k] += y;
    }
    if (lane == 31) tmp[32 * k + warp] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < count; ++k) {
    int64_t t = lane < warps ? tmp[32 * k + lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t y = __shfl_up_sync(~0u, t, off);
      if (lane >= off) t += y;
    }
    const int64_t carry = __shfl_sync(~0u, t, (warp + 31) & 31);
    const int64_t before = x[k] - own[k] + (warp ? carry : 0);
    const int per = (n[k] + c.nt - 1) / c.nt;
    const int lo = min(n[k], c.tid * per), hi = min(n[k], lo + per);
    for (int i = lo; i < hi; ++i) a[k][i] += before;
  }
  __syncthreads();
#else
  (void)c;
  (void)tmp;
  for (int k = 0; k < count; ++k) {
    int64_t s = 0;
    for (int i = 0; i < n[k]; ++i) a[k][i] = (s += init(k, i));
  }
#endif
}

// In-place inclusive prefix sums of the arrays a[k][0, n[k]).
template <int count>
TMLA_HD inline void ScanN(const Ctx& c, int64_t* const (&a)[count],
                          const int (&n)[count], int64_t* tmp) {
  ScanN<count>(c, a, n, tmp, [&](int k, int i) { return a[k][i]; });
}

TMLA_HD inline void Scan(const Ctx& c, int64_t* a, int n, int64_t* tmp) {
  int64_t* const arrays[1] = {a};
  const int sizes[1] = {n};
  ScanN<1>(c, arrays, sizes, tmp);
}

// The smallest t in [lo, hi] with pass(t), where pass is monotone (false,
// then true) and pass(hi) holds. Each round cuts [lo, hi] into `parts`
// equal parts, tests the last value of each but the last part, and keeps
// the first part that passes. On the device parts = nt / g: groups of g
// threads (g a power of two <= 32, the same in all threads) test one
// candidate each, pass(t, lane, g) returning the group's answer in every
// lane, and one barrier (__syncthreads_count) counts the parts that fail.
// The host's one thread tests 15 candidates of 16 parts in turn (g = 1).
// Every thread must call it, with the same lo and hi.
template <typename Pass>
TMLA_HD inline int64_t Search(const Ctx& c, int g, int64_t lo, int64_t hi,
                              const Pass& pass) {
#if defined(__CUDA_ARCH__)
  const int parts = c.nt / g, lane = c.tid & (g - 1);
#else
  (void)c;
  g = 1;
  const int parts = 16, lane = 0;
#endif
  int shift = 0;
  while ((1 << shift) < parts) ++shift;
  while (lo < hi) {
    // Parts [lo + q step, lo + (q + 1) step - 1], q < parts, cover [lo, hi].
    const int64_t step = (hi - lo + parts) >> shift;
    auto fails = [&](int j) {
      const int64_t t = lo + (j + 1) * step - 1;
      const bool tested = j < parts - 1 && t < hi;
      const bool ok = pass(tested ? t : hi, lane, g);  // by every lane
      return tested && !ok;
    };
#if defined(__CUDA_ARCH__)
    const int q = __syncthreads_count(fails(c.tid / g) && lane == 0);
#else
    int q = 0;
    while (q < parts - 1 && fails(q)) ++q;
#endif
    hi = Min64(hi, lo + (q + 1) * step - 1);
    lo += q * step;
  }
  return lo;
}

// Smallest power of two g <= 32 with ceil(n / g) * cost_each <= budget: the
// group size at which each lane's share of n items is small.
TMLA_HD inline int GroupFor(int64_t n, int64_t cost_each, int64_t budget) {
  int g = 1;
  while (g < 32 && CeilDiv(n, g) * cost_each > budget) g <<= 1;
  return g;
}

// Sorts the distinct keys a[0, n) ascending (bitonic on the device); a has
// room for npad (a power of two >= n) keys and, when npad <= nt, b is a
// second buffer of npad keys. With npad <= nt each thread holds one key in
// a register: partners closer than 32 are exchanged by warp shuffles, the
// others through a and b in turn, one barrier per such step.
TMLA_HD inline void Sort(const Ctx& c, uint64_t* a, uint64_t* b, int n,
                         int npad) {
#if defined(__CUDA_ARCH__)
  if (npad <= c.nt) {
    const int i = c.tid;
    uint64_t v = i < n ? a[i] : ~uint64_t{0};
    // The steps through memory alternate a and b, the last one b, so that
    // writing the result to a races with no read.
    int turn = 0;
    for (int k = 64; k <= npad; k <<= 1) {
      for (int j = k >> 1; j >= 32; j >>= 1) turn ^= 1;
    }
    for (int k = 2; k <= npad; k <<= 1) {
      for (int j = k >> 1; j > 0; j >>= 1) {
        uint64_t y;
        if (j < 32) {
          y = __shfl_xor_sync(~0u, v, j);
        } else {
          uint64_t* buf = turn ? b : a;
          if (i < npad) buf[i] = v;
          __syncthreads();
          y = i < npad ? buf[i ^ j] : v;
          turn ^= 1;
        }
        const bool keep_min = ((i & j) == 0) == ((i & k) == 0);
        v = keep_min ? (y < v ? y : v) : (y > v ? y : v);
      }
    }
    if (i < n) a[i] = v;
    __syncthreads();
    return;
  }
  for (int i = n + c.tid; i < npad; i += c.nt) a[i] = ~uint64_t{0};
  __syncthreads();
  for (int k = 2; k <= npad; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = c.tid; i < npad; i += c.nt) {
        const int partner = i ^ j;
        if (partner > i) {
          const uint64_t x = a[i], y = a[partner];
          if ((x > y) == ((i & k) == 0)) {
            a[i] = y;
            a[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
#else
  (void)c;
  (void)b;
  (void)npad;
  std::sort(a, a + n);
#endif
}

// Number of entries of the nondecreasing a[0, n) that are <= v (or < v).
TMLA_HD inline int UpperBound(const int64_t* a, int n, int64_t v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a[mid] <= v) lo = mid + 1; else hi = mid;
  }
  return lo;
}
TMLA_HD inline int LowerBound(const int64_t* a, int n, int64_t v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

TMLA_HD inline int NextPow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// The planner's scratch: arrays carved from one 8-byte aligned buffer.
struct Scratch {
  int64_t* len;       // [batch] clamped lengths
  int64_t* pages;     // [n] pages of each item
  int64_t* cost;      // [n] each item as one PARTIAL
  int64_t* best;      // [n * top] layout A: shortest path with <= k pieces
  int64_t* k_a;       // [n] layout A pieces per item
  int64_t* start_a;   // [n] inclusive scan of k_a
  int64_t* slot_a;    // [n] first slot (exclusive scan)
  int64_t* ctr_a;     // [n] counter (exclusive scan)
  int64_t* wend;      // [n] layout B: end of each item's weight run
  int64_t* sm0;       // [n] SM of each item's first piece
  int64_t* k_b;       // [n] pieces per item
  int64_t* start_b;   // [n] first piece
  int64_t* slot_b;    // [n]
  int64_t* ctr_b;     // [n]
  int64_t* ready_b;   // [n] end of the item's last piece
  int64_t* b_ic;      // [S] per run boundary: the item it falls in
  int64_t* b_cut;     // [S] its cut page
  int64_t* b_smb;     // [S] SM of the piece it starts
  int64_t* b_eff;     // [S]
  int64_t* b_valid;   // [S] 1 if it cuts, then exclusive scan
  int64_t* p_item;    // [n + S] per piece: item, first page, SM, end time
  int64_t* p_page;    // [n + S]
  int64_t* p_sm;      // [n + S]
  int64_t* p_end;     // [n + S]
  int64_t* first_b;   // [S + 1] first piece of each SM
  int64_t* load;      // [S] per SM: load (B, then C)
  int64_t* run_b;     // [S] 1 if the SM holds a REDUCE (B)
  int64_t* rank;      // [S] SM order by load, then first poured item (C)
  int64_t* c_cnt;     // [S] items per SM (C)
  uint64_t* keys;     // [npad] layout C: items longest first
  int64_t* c_sm;      // [n] per item: SM and position (C); c_sm and c_pos
  int64_t* c_pos;     // [n] together (2n >= npad words) are the sort's buffer
  int64_t* t_pre;     // [n] prefix of the poured items' costs
  int64_t* t_sm;      // [n] SM of each poured item
  int64_t* room;      // [S] prefix of the SMs' room below the level
  int64_t* tmp;       // [4 * 32] scan carries: Carry, not carved
  int64_t* red;       // [2 * 64] BlockReduce buffers: Carry, not carved
};

// The words of the scans and reductions, apart from the carved scratch: in
// static shared memory on the device (even when the scratch is in global
// memory), on the stack on the host.
struct Carry {
  int64_t tmp[4 * 32];
  int64_t red[2 * 64];
};

struct Sizes {
  int n, S, top_cap, npad;
};

TMLA_HD inline Sizes SizesOf(int64_t num_items, int64_t num_sms) {
  Sizes z;
  z.n = static_cast<int>(num_items);
  z.S = static_cast<int>(num_sms);
  z.top_cap = num_items <= num_sms ? static_cast<int>(num_sms - num_items + 1)
                                   : 0;
  z.npad = NextPow2(z.n);
  return z;
}

// Carves the arrays from base (or only counts, when base is null); returns
// the bytes used.
TMLA_HD inline int64_t Carve(char* base, const Sizes& z, int batch,
                             Scratch* s) {
  int64_t off = 0;
  auto take = [&](int64_t words) {
    int64_t* p = base ? reinterpret_cast<int64_t*>(base + off) : nullptr;
    off += 8 * words;
    return p;
  };
  const int64_t n = z.n, S = z.S;
  s->len = take(batch);
  s->pages = take(n);
  s->cost = take(n);
  s->best = take(n * z.top_cap);
  s->k_a = take(n);
  s->start_a = take(n);
  s->slot_a = take(n);
  s->ctr_a = take(n);
  s->wend = take(n);
  s->sm0 = take(n);
  s->k_b = take(n);
  s->start_b = take(n);
  s->slot_b = take(n);
  s->ctr_b = take(n);
  s->ready_b = take(n);
  s->b_ic = take(S);
  s->b_cut = take(S);
  s->b_smb = take(S);
  s->b_eff = take(S);
  s->b_valid = take(S);
  s->p_item = take(n + S);
  s->p_page = take(n + S);
  s->p_sm = take(n + S);
  s->p_end = take(n + S);
  s->first_b = take(S + 1);
  s->load = take(S);
  s->run_b = take(S);
  s->rank = take(S);
  s->c_cnt = take(S);
  s->keys = reinterpret_cast<uint64_t*>(take(z.npad));
  s->c_sm = take(n);
  s->c_pos = take(n);
  s->t_pre = take(n);
  s->t_sm = take(n);
  s->room = take(S);
  return off;
}

// Static facts of the items (b, KV head, tile) and their prices.
struct Items {
  const PlannerParams& p;
  int n;
  int64_t max_pages;  // of any item
  int64_t max_cost;   // of any item as one PARTIAL
  int64_t work;       // layout B's weights before its floor, summed
  TMLA_HD int tile(int i) const { return i % p.num_tiles; }
  TMLA_HD int seq(int i) const { return i / (p.h_kv * p.num_tiles); }
  TMLA_HD int head(int i) const { return (i / p.num_tiles) % p.h_kv; }
  TMLA_HD int rows(int i) const {
    return tile(i) == p.num_tiles - 1 ? p.last_tile_rows : isa::kTileRows;
  }
  TMLA_HD int64_t page_ns(int i) const {
    return tile(i) == p.num_tiles - 1 ? p.page_ns_last : p.page_ns_full;
  }
};

// One instruction row; fields not named are 0.
struct Row {
  int32_t w[isa::kInstructionWords];
  TMLA_HD Row(const Items& it, int item, int32_t opcode) {
    for (int f = 0; f < isa::kInstructionWords; ++f) w[f] = 0;
    w[isa::kFieldOpcode] = opcode;
    w[isa::kFieldBatch] = it.seq(item);
    w[isa::kFieldKvHead] = it.head(item);
    w[isa::kFieldRowStart] = it.tile(item) * isa::kTileRows;
    w[isa::kFieldNumRows] = it.rows(item);
    w[isa::kFieldDstSlot] = isa::kFinalOutput;
    w[isa::kFieldSignalCounter] = isa::kNoCounter;
    w[isa::kFieldWaitCounter] = isa::kNoCounter;
  }
  TMLA_HD void Store(const PlannerParams& p, int64_t sm, int64_t pos) const {
    int32_t* dst = p.instructions +
                   (sm * p.capacity + pos) * isa::kInstructionWords;
    for (int f = 0; f < isa::kInstructionWords; ++f) dst[f] = w[f];
  }
};

TMLA_HD inline Row Piece(const Items& it, const Scratch& s, int item,
                         int64_t page0, int64_t page1, int64_t dst,
                         int64_t signal, int64_t cost) {
  Row r(it, item, isa::kOpPartial);
  const int64_t len = s.len[it.seq(item)];
  r.w[isa::kFieldKvStart] =
      static_cast<int32_t>(Min64(page0 * it.p.page_size, len));
  r.w[isa::kFieldKvEnd] =
      static_cast<int32_t>(Min64(page1 * it.p.page_size, len));
  r.w[isa::kFieldDstSlot] = static_cast<int32_t>(dst);
  r.w[isa::kFieldSignalCounter] = static_cast<int32_t>(signal);
  r.w[isa::kFieldCost] = static_cast<int32_t>(cost);
  return r;
}

// REDUCE run j of c over an item's R rows: rows [j R / c, (j + 1) R / c) of
// its k slots from slot0, once counter ctr has k signals.
TMLA_HD inline Row MergeRun(const Items& it, int item, int64_t j, int64_t c,
                            int64_t k, int64_t slot0, int64_t ctr,
                            int64_t* cost) {
  Row r(it, item, isa::kOpReduce);
  const int64_t rows = it.rows(item);
  const int64_t lo = Div64(j * rows, c), hi = Div64((j + 1) * rows, c);
  *cost = it.p.reduce_fixed_ns + k * it.p.input_ns[hi - lo];
  r.w[isa::kFieldRowStart] += static_cast<int32_t>(lo);
  r.w[isa::kFieldNumRows] = static_cast<int32_t>(hi - lo);
  r.w[isa::kFieldSlotRow] = static_cast<int32_t>(lo);
  r.w[isa::kFieldSrcSlot] = static_cast<int32_t>(slot0);
  r.w[isa::kFieldNumSrc] = static_cast<int32_t>(k);
  r.w[isa::kFieldWaitCounter] = static_cast<int32_t>(ctr);
  r.w[isa::kFieldWaitCount] = static_cast<int32_t>(k);
  r.w[isa::kFieldCost] = static_cast<int32_t>(*cost);
  return r;
}

// Predicted end of an item of `pages` pages cut into k pieces with its merge
// spread over min(k, rows) REDUCEs (layout A's critical path), or kNever.
TMLA_HD inline int64_t PathA(const PlannerParams& p, int64_t pages,
                             int64_t page_ns, int64_t rows, int64_t k) {
  if (k > Max64(pages, 1)) return kNever;
  int64_t path = p.partial_fixed_ns + CeilDiv(pages, k) * page_ns;
  if (k > 1) {
    const int64_t runs = Min64(k, rows);
    path += p.reduce_fixed_ns + k * p.input_ns[CeilDiv(rows, runs)];
  }
  return path;
}

}  // namespace tmla::plan

#include "planner_layouts.cuh"
