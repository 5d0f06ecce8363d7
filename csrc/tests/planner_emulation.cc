// The device path of the planner (planner.cuh under __CUDA_ARCH__) run on
// the CPU: one block of kPlannerThreads threads, each a cooperative context
// (ucontext), with barriers, warp shuffles and shared atomics emulated. A
// thread runs until it waits at a barrier or a shuffle; the waiting threads
// are then resumed in a random order, so a read that a barrier does not
// order after its write is likely to see stale data. It checks the
// planner's parallel code (shuffles, groups, runs, barriers) without a GPU;
// the memory model is not emulated. tests/test_plan_emulated.py builds it as
// a shared library (a host C++ compiler, no CUDA) and calls TmlaPlanEmulated.
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __CUDA_ARCH__ 900

namespace emu {

struct Dim3 {
  unsigned x, y, z;
};

struct Thread {
  ucontext_t context;
  Dim3 index;
  bool done = false;
  std::vector<char> stack;
};

struct Block {
  int threads = 0;
  std::vector<Thread> thread;
  ucontext_t scheduler;
  int current = 0;
  std::function<void(int)> body;
  std::mt19937 rng;
  // The block barrier: arrivals of this generation, and the predicate
  // counts of two generations in turn.
  uint64_t generation = 0;
  int arrived = 0;
  int counts[2] = {0, 0};
  // Per warp: a barrier and the words exchanged by a shuffle.
  std::vector<uint64_t> warp_generation;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> words;
};

Block* block = nullptr;

Thread& Current() { return block->thread[block->current]; }

void Yield() { swapcontext(&Current().context, &block->scheduler); }

void Entry() {
  block->body(block->current);
  Current().done = true;
  Yield();
}

void Run(int threads, uint32_t seed, std::function<void(int)> body) {
  Block b;
  b.threads = threads;
  b.thread.resize(threads);
  b.body = std::move(body);
  b.rng.seed(seed);
  b.warp_generation.assign(threads / 32, 0);
  b.warp_arrived.assign(threads / 32, 0);
  b.words.assign(threads, 0);
  block = &b;
  for (int t = 0; t < threads; ++t) {
    Thread& x = b.thread[t];
    x.index = {static_cast<unsigned>(t), 0, 0};
    x.stack.resize(256 * 1024);
    getcontext(&x.context);
    x.context.uc_stack.ss_sp = x.stack.data();
    x.context.uc_stack.ss_size = x.stack.size();
    x.context.uc_link = nullptr;
    makecontext(&x.context, Entry, 0);
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  for (bool running = true; running;) {
    running = false;
    std::shuffle(order.begin(), order.end(), b.rng);
    for (int t : order) {
      if (b.thread[t].done) continue;
      running = true;
      b.current = t;
      swapcontext(&b.scheduler, &b.thread[t].context);
    }
  }
  block = nullptr;
}

// Waits until every thread of the block has arrived; returns how many
// arrived with a nonzero predicate.
int BlockBarrier(int predicate) {
  Block& b = *block;
  const uint64_t generation = b.generation;
  b.counts[generation & 1] += predicate != 0;
  if (++b.arrived == b.threads) {
    b.arrived = 0;
    b.counts[(generation + 1) & 1] = 0;
    ++b.generation;
  } else {
    while (b.generation == generation) Yield();
  }
  return b.counts[generation & 1];
}

void WarpBarrier() {
  Block& b = *block;
  const int warp = b.current / 32;
  const uint64_t generation = b.warp_generation[warp];
  if (++b.warp_arrived[warp] == 32) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
  } else {
    while (b.warp_generation[warp] == generation) Yield();
  }
  Yield();  // other warps run in between
}

// Every lane of the warp offers v and receives the value of lane `from`.
template <typename T>
T Exchange(T v, int from) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Block& b = *block;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.words[b.current] = bits;
  WarpBarrier();
  bits = b.words[(b.current & ~31) + from];
  WarpBarrier();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

int Lane() { return block->current & 31; }

}  // namespace emu

#define threadIdx (::emu::Current().index)

inline void __syncthreads() { emu::BlockBarrier(0); }
inline int __syncthreads_count(int predicate) {
  return emu::BlockBarrier(predicate);
}
template <typename T>
T __shfl_sync(unsigned, T v, int from, int width = 32) {
  return emu::Exchange(v, (emu::Lane() & ~(width - 1)) + (from & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = emu::Lane();
  const int from = lane ^ mask;
  return emu::Exchange(
      v, (from & ~(width - 1)) == (lane & ~(width - 1)) ? from : lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = emu::Lane();
  const int from = lane - static_cast<int>(delta);
  return emu::Exchange(v, from < (lane & ~(width - 1)) ? lane : from);
}
inline int atomicAdd(int* at, int v) {
  const int old = *at;
  *at += v;
  return old;
}
inline int atomicMax(int* at, int v) {
  const int old = *at;
  *at = std::max(old, v);
  return old;
}
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

#include "planner.cuh"

namespace plan = tmla::plan;

// Plans as the device planner would: the arguments as planner.h's
// PlannerParams (prices in ns, input_ns[kInputPrices]); the outputs as
// the FFI handler's. `seed` orders the threads. Returns 0.
extern "C" int TmlaPlanEmulated(
    const int32_t* lengths, int32_t batch, int32_t h_kv, int32_t num_tiles,
    int32_t last_tile_rows, int32_t num_sms, int32_t capacity,
    int32_t page_size, int32_t max_seqlen, int64_t partial_fixed_ns,
    int64_t reduce_fixed_ns, int64_t page_ns_full, int64_t page_ns_last,
    const int64_t* input_ns, int32_t* instructions, int32_t* seqlens,
    int32_t* info, uint32_t seed) {
  plan::PlannerParams p{};
  p.lengths = lengths;
  p.instructions = instructions;
  p.seqlens = seqlens;
  p.info = info;
  p.batch = batch;
  p.h_kv = h_kv;
  p.num_tiles = num_tiles;
  p.last_tile_rows = last_tile_rows;
  p.num_sms = num_sms;
  p.capacity = capacity;
  p.page_size = page_size;
  p.max_seqlen = max_seqlen;
  p.partial_fixed_ns = partial_fixed_ns;
  p.reduce_fixed_ns = reduce_fixed_ns;
  p.page_ns_full = page_ns_full;
  p.page_ns_last = page_ns_last;
  for (int r = 0; r < plan::kInputPrices; ++r) p.input_ns[r] = input_ns[r];
  plan::SetDerived(&p);
  const int64_t items = int64_t{batch} * h_kv * num_tiles;
  plan::Scratch sizes;
  // Scratch the planner reads before it writes shows up as garbage.
  std::vector<int64_t> scratch(
      plan::Carve(nullptr, plan::SizesOf(items, num_sms),
                  static_cast<int>(items), &sizes) / 8 + 1,
      int64_t{0x5a5a5a5a5a5a5a5a});
  p.scratch = scratch.data();
  plan::Carry carry;
  emu::Run(plan::kPlannerThreads, seed, [&](int tid) {
    plan::Ctx c{tid, plan::kPlannerThreads};
    plan::Plan(c, p, reinterpret_cast<char*>(scratch.data()), &carry);
  });
  return 0;
}
