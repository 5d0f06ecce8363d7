// The planner of planner.h, written once for one CTA (device) and one thread
// (host). Every phase is a loop over the thread's share of an array ended by
// a barrier; the block-wide scan, reduction, search and sort below have a
// parallel device body and a serial host body with the same integer result.
//
// The device planner runs once per plan from a cold instruction cache, so its
// time follows the code it executes more than the work: loops are not
// unrolled, one scan and one reduction serve every phase (arrays, not
// callbacks), one function writes every instruction row, and a layout whose
// lower bound cannot beat the best one so far is not measured.
#pragma once

#include <cstdint>

#include "isa.h"
#include "planner.h"

#if defined(__CUDACC__)
#define TMLA_HD __host__ __device__
#else
#define TMLA_HD
#endif

#if defined(__CUDA_ARCH__)
#define TMLA_NO_UNROLL _Pragma("unroll 1")
#else
#define TMLA_NO_UNROLL
#endif

// A function whose device code is shared by its callers rather than
// copied into each of them.
#if defined(__CUDACC__)
#define TMLA_SHARED_CODE __noinline__
#else
#define TMLA_SHARED_CODE
#endif

#if !defined(__CUDA_ARCH__)
#include <algorithm>
#endif

namespace tmla::plan {

// Threads of the loops: (0, 1) on the host.
struct Ctx {
  int tid;
  int nt;
  int turn = 0;  // which of Reduce's two buffers is next
};

constexpr int64_t kNever = INT64_MAX;
constexpr int64_t kLowest = INT64_MIN;
// Costs are below 2^31 (the int32 cost word), so this orders them in keys.
constexpr uint64_t kCostKeyBase = uint64_t{1} << 31;
// Lanes that share a warp-level step: a warp on the device, one on the host.
#if defined(__CUDA_ARCH__)
constexpr int kLanes = 32;
#else
constexpr int kLanes = 1;
#endif
// Buckets of each round of layout A's end-time search (a multiple of 32).
constexpr int kSearchBuckets = 256;

TMLA_HD inline void Sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

TMLA_HD inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
TMLA_HD inline int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }
TMLA_HD inline int MinInt(int a, int b) { return a < b ? a : b; }
// a / b for a >= 0, b > 0; in 32 bits when both fit (the device's 64-bit
// division is a long subroutine), with the same result.
TMLA_SHARED_CODE TMLA_HD inline int64_t Div64(int64_t a, int64_t b) {
  if ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32 == 0) {
    return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  }
  return a / b;
}
TMLA_HD inline int64_t CeilDiv(int64_t a, int64_t b) {
  return Div64(a + b - 1, b);
}

// x / d for 0 <= x < 2^31 (planner.h's Divisor).
TMLA_HD inline int Divide(int x, Divisor d) {
  return static_cast<int>((static_cast<uint64_t>(x) * d.m) >> d.shift);
}

// The run [lo, hi) of `count` elements that this thread scans: the threads
// own consecutive runs in thread order. A phase that writes an array
// through its runs may scan it with no barrier between.
struct Run {
  int lo, hi;
  TMLA_HD Run(const Ctx& c, int count) {
    const int per = (count + c.nt - 1) / c.nt;
    lo = MinInt(count, c.tid * per);
    hi = MinInt(count, lo + per);
  }
};

// Sum (or, with a_max, max) of a and max of b over aligned groups of
// `width` lanes (a power of two <= 32); the host's one lane returns them.
struct Reduced {
  int64_t sum, max;  // with a_max, sum holds a's max
};
TMLA_HD inline Reduced GroupReduce(int64_t a, int64_t b, int width,
                                   bool a_max) {
#if defined(__CUDA_ARCH__)
  TMLA_NO_UNROLL
  for (int off = width >> 1; off > 0; off >>= 1) {
    const int64_t y = __shfl_xor_sync(~0u, a, off, width);
    a = a_max ? Max64(a, y) : a + y;
    b = Max64(b, __shfl_xor_sync(~0u, b, off, width));
  }
#else
  (void)width;
  (void)a_max;
#endif
  return Reduced{a, b};
}

// Sum of v over aligned groups of `width` lanes (a power of two <= 32); v
// on the host.
TMLA_HD inline int64_t GroupSum(int64_t v, int width) {
#if defined(__CUDA_ARCH__)
  TMLA_NO_UNROLL
  for (int off = width >> 1; off > 0; off >>= 1) {
    v += __shfl_xor_sync(~0u, v, off, width);
  }
#else
  (void)width;
#endif
  return v;
}

// Minimum of v over the warp's lanes (device); v on the host.
TMLA_HD inline int64_t WarpMin(int64_t v) {
#if defined(__CUDA_ARCH__)
  TMLA_NO_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    v = Min64(v, __shfl_xor_sync(~0u, v, off));
  }
#endif
  return v;
}

// Inclusive sum (or, with is_min, minimum) of x over the lanes up to this
// one in aligned groups of `width` lanes (a power of two <= 32; device); x
// on the host.
TMLA_HD inline int64_t LaneScan(int64_t x, bool is_min, int width = 32) {
#if defined(__CUDA_ARCH__)
  const int lane = threadIdx.x & (width - 1);
  TMLA_NO_UNROLL
  for (int off = 1; off < width; off <<= 1) {
    const int64_t y = __shfl_up_sync(~0u, x, off, width);
    if (lane >= off) x = is_min ? Min64(x, y) : x + y;
  }
#else
  (void)is_min;
  (void)width;
#endif
  return x;
}

// The sum (or, with is_min, minimum) of x over the lanes of its group of
// `width` before this one: 0 (kNever) in the group's first lane and on the
// host.
TMLA_HD inline int64_t LaneScanExclusive(int64_t x, bool is_min, int width) {
  const int64_t none = is_min ? kNever : 0;
#if defined(__CUDA_ARCH__)
  const int64_t y = __shfl_up_sync(~0u, LaneScan(x, is_min, width), 1, width);
  return (threadIdx.x & (width - 1)) == 0 ? none : y;
#else
  (void)x;
  (void)width;
  return none;
#endif
}

// x of the last lane of its group of `width` (device); x on the host.
TMLA_HD inline int64_t LastLane(int64_t x, int width) {
#if defined(__CUDA_ARCH__)
  return __shfl_sync(~0u, x, width - 1, width);
#else
  (void)width;
  return x;
#endif
}

// 32-bit atomics: the device's 64-bit ones on shared memory are
// compare-and-swap loops, slow when many threads hit one word.
TMLA_HD inline void AtomicAdd(int32_t* at, int32_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(at, v);
#else
  *at += v;
#endif
}

TMLA_HD inline void AtomicMax(int32_t* at, int32_t v) {
#if defined(__CUDA_ARCH__)
  atomicMax(at, v);
#else
  *at = *at > v ? *at : v;
#endif
}

// Block-wide sum (or, with a_max, max) of a and max of b. Each warp reduces
// its lanes and writes one word per value to buf (2 * 32 words); after one
// barrier every warp reduces the warps' words.
TMLA_SHARED_CODE TMLA_HD inline Reduced ReduceWords(int64_t a, int64_t b,
                                                    bool a_max, int64_t* buf,
                                                    int tid, int nt) {
#if defined(__CUDA_ARCH__)
  Reduced r = GroupReduce(a, b, 32, a_max);
  const int lane = tid & 31, warps = nt >> 5;
  if (lane == 0) {
    buf[tid >> 5] = r.sum;
    buf[32 + (tid >> 5)] = r.max;
  }
  __syncthreads();
  return GroupReduce(lane < warps ? buf[lane] : (a_max ? kLowest : 0),
                     lane < warps ? buf[32 + lane] : kLowest, 32, a_max);
#else
  (void)buf;
  (void)tid;
  (void)nt;
  (void)a_max;
  return Reduced{a, b};
#endif
}

// ReduceWords into one of two buffers (red, 2 * 64 words) in turn
// (c.turn): the next reduction writes the other one, so one barrier per
// reduction suffices.
TMLA_HD inline Reduced Reduce(Ctx& c, int64_t a, int64_t b, bool a_max,
                              int64_t* red) {
  int64_t* buf = red + 64 * c.turn;
  c.turn ^= 1;
  return ReduceWords(a, b, a_max, buf, c.tid, c.nt);
}

// Up to four arrays a_k[0, n_k), taken in turn: `a` and `n` are the front
// one's, and Next() moves the next one to the front. Registers, where an
// array of pointers indexed by k would live in local memory.
struct ArrayQueue {
  int64_t *a, *a1, *a2, *a3;
  int n, n1, n2, n3;
  TMLA_HD void Next() {
    a = a1, a1 = a2, a2 = a3;
    n = n1, n1 = n2, n2 = n3;
  }
};

// In-place inclusive prefix sums of `count` (<= 4) arrays a_k[0, n_k) at
// once, two barriers for all; tmp holds 32 * count words. Before the first
// barrier each thread scans its Run of each array, scans the runs' totals
// by warp shuffles and adds the warp's lanes before it to its run; after
// it, each warp sums the totals of the warps before it and adds them.
// Nothing passes from one phase to the next in registers. A thread may have
// written its runs just before the call; anything else needs a barrier.
TMLA_SHARED_CODE TMLA_HD inline void ScanArrays(
    int tid, int nt, int count, int64_t* a0, int n0, int64_t* a1, int n1,
    int64_t* a2, int n2, int64_t* a3, int n3, int64_t* tmp) {
  const Ctx c{tid, nt};
  const ArrayQueue all{a0, a1, a2, a3, n0, n1, n2, n3};
#if defined(__CUDA_ARCH__)
  const int lane = tid & 31, warp = tid >> 5;
  ArrayQueue q = all;
  TMLA_NO_UNROLL
  for (int k = 0; k < count; ++k, q.Next()) {
    const Run r(c, q.n);
    int64_t own = 0;
    TMLA_NO_UNROLL
    for (int i = r.lo; i < r.hi; ++i) own += q.a[i];
    const int64_t x = LaneScan(own, false);
    if (lane == 31) tmp[32 * k + warp] = x;
    int64_t sum = x - own;  // the runs of the warp's lanes before this one
    TMLA_NO_UNROLL
    for (int i = r.lo; i < r.hi; ++i) q.a[i] = (sum += q.a[i]);
  }
  __syncthreads();
  q = all;
  TMLA_NO_UNROLL
  for (int k = 0; k < count; ++k, q.Next()) {
    const Run r(c, q.n);
    const int64_t before = GroupSum(lane < warp ? tmp[32 * k + lane] : 0, 32);
    TMLA_NO_UNROLL
    for (int i = r.lo; i < r.hi; ++i) q.a[i] += before;
  }
  __syncthreads();
#else
  (void)c;
  (void)tmp;
  ArrayQueue q = all;
  for (int k = 0; k < count; ++k, q.Next()) {
    int64_t sum = 0;
    for (int i = 0; i < q.n; ++i) q.a[i] = (sum += q.a[i]);
  }
#endif
}

TMLA_HD inline void Scan1(const Ctx& c, int64_t* a, int n, int64_t* tmp) {
  ScanArrays(c.tid, c.nt, 1, a, n, nullptr, 0, nullptr, 0, nullptr, 0, tmp);
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
  int log_g = 0;
  while ((1 << log_g) < g) ++log_g;
  const int parts = c.nt >> log_g, lane = c.tid & (g - 1);
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
    const int q = __syncthreads_count(fails(c.tid >> log_g) && lane == 0);
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
TMLA_HD inline int GroupFor(int n, int cost_each, int budget) {
  int log_g = 0;
  while (log_g < 5 &&
         ((n + (1 << log_g) - 1) >> log_g) * cost_each > budget) {
    ++log_g;
  }
  return 1 << log_g;
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
    TMLA_NO_UNROLL
    for (int k = 64; k <= npad; k <<= 1) {
      TMLA_NO_UNROLL
      for (int j = k >> 1; j >= 32; j >>= 1) turn ^= 1;
    }
    TMLA_NO_UNROLL
    for (int k = 2; k <= npad; k <<= 1) {
      TMLA_NO_UNROLL
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
  TMLA_NO_UNROLL
  for (int k = 2; k <= npad; k <<= 1) {
    TMLA_NO_UNROLL
    for (int j = k >> 1; j > 0; j >>= 1) {
      TMLA_NO_UNROLL
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

// Number of entries of the nondecreasing a[0, n) that are < v (or, with
// inclusive, <= v).
template <typename T>
TMLA_HD inline int Bound(const T* a, int n, int64_t v, bool inclusive) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < v || (inclusive && a[mid] == v)) lo = mid + 1; else hi = mid;
  }
  return lo;
}
template <typename T>
TMLA_HD inline int UpperBound(const T* a, int n, int64_t v) {
  return Bound(a, n, v, true);
}
template <typename T>
TMLA_HD inline int LowerBound(const T* a, int n, int64_t v) {
  return Bound(a, n, v, false);
}

TMLA_HD inline int NextPow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// The planner's scratch: arrays carved from one 8-byte aligned buffer.
// Arrays that are scanned or searched hold int64 (one scan, one search).
struct Scratch {
  int64_t* len;       // [batch] clamped lengths
  int64_t* pages;     // [n] pages of each item
  int32_t* best;      // [n * top] layout A: shortest path with <= k pieces
  int64_t* start_a;   // [n] layout A: inclusive scan of the pieces per item
  int64_t* ctr_a;     // [n] and of "item is cut"
  int64_t* wend;      // [n] layout B: end of each item's weight run
  int64_t* start_b;   // [n] pieces per item, then their inclusive scan
  int64_t* ctr_b;     // [n] 1 if the item is cut, then inclusive scan
  int32_t* cuts_b;    // [n] boundaries that cut the item
  int32_t* ready_b;   // [n] end of the item's pieces other than its first
  int32_t* b_ic;      // [S] per run boundary: the item it falls in
  int32_t* b_cut;     // [S] its cut page
  int32_t* b_smb;     // [S] SM of the piece it starts
  int64_t* b_cuts;    // [S] 1 if it cuts, then inclusive scan
  int32_t* p_item;    // [n + S] per piece: item, first page, SM
  int32_t* p_page;    // [n + S]
  int32_t* p_sm;      // [n + S]
  int32_t* first_b;   // [S + 1] first piece of each SM
  int32_t* run_b;     // [S] 1 if the SM holds a REDUCE (B)
  int64_t* load;      // [S] per SM, its load (B's measure, then C's)
  int64_t* rank;      // [S] C: loads after every other round, then first
                      // poured item
  int64_t* c_cnt;     // [S] its items
  uint64_t* keys;     // [npad] items longest first
  int64_t* c_sm;      // [n] per item: SM and position (C); c_sm and c_pos
  int64_t* c_pos;     // [n] together (2n >= npad words) are the sort's buffer
  int64_t* t_pre;     // [n] prefix of the poured items' costs
  int64_t* t_sm;      // [n] SM of each poured item
  int64_t* room;      // [S] prefix of the SMs' room below the level
  int64_t* tmp;       // [4 * 32] scan carries: Carry, not carved
  int64_t* red;       // [2 * 64] Reduce buffers: Carry, not carved
  int32_t* hist;      // [3 * kSearchBuckets] A's search: Carry, not carved
};

// The words of the scans and reductions, apart from the carved scratch: in
// static shared memory on the device (even when the scratch is in global
// memory), on the stack on the host.
struct Carry {
  int64_t tmp[4 * 32];
  int64_t red[2 * 64];
  int32_t hist[3 * kSearchBuckets];
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

// Carves the arrays from base (or only counts, when base is null: the
// pointers are then not used); returns the bytes used.
TMLA_HD inline int64_t Carve(char* base, const Sizes& z, int batch,
                             Scratch* s) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(base);
  int64_t off = 0;
  auto take = [&](int64_t words) {
    int64_t* p = reinterpret_cast<int64_t*>(at + off);
    off += 8 * words;
    return p;
  };
  // int32 arrays take a word per entry (as int64 arrays).
  auto take32 = [&](int64_t words) {
    return reinterpret_cast<int32_t*>(take(words));
  };
  const int64_t n = z.n, S = z.S;
  s->len = take(batch);
  s->pages = take(n);
  s->best = reinterpret_cast<int32_t*>(take((n * z.top_cap + 1) / 2));
  s->start_a = take(n);
  s->ctr_a = take(n);
  s->wend = take(n);
  s->start_b = take(n);
  s->ctr_b = take(n);
  s->cuts_b = take32(n);
  s->ready_b = take32(n);
  s->b_ic = take32(S);
  s->b_cut = take32(S);
  s->b_smb = take32(S);
  s->b_cuts = take(S);
  s->p_item = take32(n + S);
  s->p_page = take32(n + S);
  s->p_sm = take32(n + S);
  s->first_b = take32(S + 1);
  s->run_b = take32(S);
  s->load = take(S);
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
  const Scratch& s;
  int n;
  int64_t max_pages = 0;  // of any item
  int64_t max_cost = 0;   // of any item as one PARTIAL
  int64_t work = 0;       // layout B's weights before its floor, summed
  int64_t total = 0;      // the items' costs as one PARTIAL each, summed
  TMLA_HD Items(const PlannerParams& params, const Scratch& scratch)
      : p(params), s(scratch),
        n(params.batch * params.h_kv * params.num_tiles) {}
  TMLA_HD int seq(int i) const { return Divide(i, p.per_seq); }
  TMLA_HD int tile(int i) const {
    return i - Divide(i, p.per_head) * p.num_tiles;
  }
  TMLA_HD int head(int i) const {
    return Divide(i, p.per_head) - seq(i) * p.h_kv;
  }
  TMLA_HD int rows(int i) const {
    return tile(i) == p.num_tiles - 1 ? p.last_tile_rows : isa::kTileRows;
  }
  TMLA_HD int64_t page_ns(int i) const {
    return tile(i) == p.num_tiles - 1 ? p.page_ns_last : p.page_ns_full;
  }
  // Item i's pages [page0, page1) as one PARTIAL.
  TMLA_HD int64_t piece_ns(int i, int64_t page0, int64_t page1) const {
    return p.partial_fixed_ns + (page1 - page0) * page_ns(i);
  }
  TMLA_HD int64_t cost(int i) const { return piece_ns(i, 0, s.pages[i]); }
  // REDUCE run j of c over item i's rows, of k inputs: its first row and
  // rows (as *lo, *num) and its cost.
  TMLA_HD int64_t run_ns(int i, int64_t j, int64_t c, int64_t k,
                         int64_t* lo, int64_t* num) const {
    const int64_t r = rows(i);
    *lo = Div64(j * r, c);
    *num = Div64((j + 1) * r, c) - *lo;
    return p.reduce_fixed_ns + k * p.input_ns[*num];
  }
};

// Stores row w at position pos of list sm unless the list is full.
TMLA_HD inline void StoreRow(const PlannerParams& p, int64_t sm, int64_t pos,
                             const int32_t* w) {
  if (pos >= p.capacity) return;
  int32_t* dst_row =
      p.instructions + (sm * p.capacity + pos) * isa::kInstructionWords;
#if defined(__CUDA_ARCH__)
  // Rows are 64 bytes, so 16-byte aligned in the 16-byte aligned tensor.
  static_assert(isa::kInstructionWords % 4 == 0);
  for (int f = 0; f < isa::kInstructionWords; f += 4) {
    *reinterpret_cast<int4*>(dst_row + f) =
        make_int4(w[f], w[f + 1], w[f + 2], w[f + 3]);
  }
#else
  for (int f = 0; f < isa::kInstructionWords; ++f) dst_row[f] = w[f];
#endif
}

// Writes one instruction row of item `item` at position pos of list sm:
// words 5 and 6 are a PARTIAL's KV range or a REDUCE's first slot and
// inputs; lo is the first row (0 for a PARTIAL) and num the rows.
TMLA_HD inline void WriteRow(const Items& it, int64_t sm, int64_t pos,
                             int item, int32_t opcode, int64_t w5, int64_t w6,
                             int64_t lo, int64_t num, int64_t dst,
                             int64_t signal, int64_t wait, int64_t count,
                             int64_t cost) {
  int32_t w[isa::kInstructionWords] = {};
  w[isa::kFieldOpcode] = opcode;
  w[isa::kFieldBatch] = it.seq(item);
  w[isa::kFieldKvHead] = it.head(item);
  w[isa::kFieldRowStart] =
      it.tile(item) * isa::kTileRows + static_cast<int32_t>(lo);
  w[isa::kFieldNumRows] = static_cast<int32_t>(num);
  w[isa::kFieldKvStart] = static_cast<int32_t>(w5);
  w[isa::kFieldKvEnd] = static_cast<int32_t>(w6);
  w[isa::kFieldDstSlot] = static_cast<int32_t>(dst);
  w[isa::kFieldSignalCounter] = static_cast<int32_t>(signal);
  w[isa::kFieldWaitCounter] = static_cast<int32_t>(wait);
  w[isa::kFieldWaitCount] = static_cast<int32_t>(count);
  w[isa::kFieldCost] = static_cast<int32_t>(cost);
  w[isa::kFieldSlotRow] = static_cast<int32_t>(lo);
  StoreRow(it.p, sm, pos, w);
}

// Ends list sm at position pos (an all-zero row: kOpStop) unless it is
// full.
TMLA_HD inline void WriteStop(const Items& it, int64_t sm, int64_t pos) {
  static_assert(isa::kOpStop == 0);
  const int32_t zero[isa::kInstructionWords] = {};
  StoreRow(it.p, sm, pos, zero);
}

// The PARTIAL of item pages [page0, page1), writing slot dst (or the final
// output) and signalling counter `signal` (or none).
TMLA_HD inline void WritePiece(const Items& it, int64_t sm, int64_t pos,
                               int item, int64_t page0, int64_t page1,
                               int64_t dst, int64_t signal) {
  const int64_t len = it.s.len[it.seq(item)];
  const int64_t ps = it.p.page_size;
  WriteRow(it, sm, pos, item, isa::kOpPartial, Min64(page0 * ps, len),
           Min64(page1 * ps, len), 0, it.rows(item), dst, signal,
           isa::kNoCounter, 0, it.piece_ns(item, page0, page1));
}

// REDUCE run j of c over an item's rows: its k slots from slot0, once
// counter ctr has k signals.
TMLA_HD inline void WriteMerge(const Items& it, int64_t sm, int64_t pos,
                               int item, int64_t j, int64_t c, int64_t k,
                               int64_t slot0, int64_t ctr) {
  int64_t lo, num;
  const int64_t cost = it.run_ns(item, j, c, k, &lo, &num);
  WriteRow(it, sm, pos, item, isa::kOpReduce, slot0, k, lo, num,
           isa::kFinalOutput, isa::kNoCounter, ctr, k, cost);
}

// Predicted end of an item of `pages` pages cut into k pieces with its merge
// spread over min(k, rows) REDUCEs (layout A's critical path), or kNever.
TMLA_HD inline int64_t PathA(const PlannerParams& p, int64_t pages,
                             int64_t page_ns, int64_t rows, int64_t k) {
  if (k > Max64(pages, 1)) return kNever;
  // pages < 2^31 and rows <= 64: 32-bit divisions.
  const uint32_t k32 = static_cast<uint32_t>(k);
  int64_t path = p.partial_fixed_ns +
                 (static_cast<uint32_t>(pages) + k32 - 1) / k32 * page_ns;
  if (k > 1) {
    const uint32_t runs = static_cast<uint32_t>(Min64(k, rows));
    path += p.reduce_fixed_ns +
            k * p.input_ns[(static_cast<uint32_t>(rows) + runs - 1) / runs];
  }
  return path;
}

}  // namespace tmla::plan

#include "planner_layouts.cuh"
