// The device path of the planner (planner.cuh under __CUDA_ARCH__) run on
// the CPU: one block of kPlannerThreads threads, each a cooperative context
// (ucontext), with barriers, warp shuffles and shared atomics emulated. A
// thread runs until it waits at a barrier or a shuffle; the waiting threads
// are then resumed in thread order, in reverse thread order or in a random
// order (Order), every thread also after the barrier it completes. Between
// two barriers each thread thus runs alone, all of its work at once: a read
// of another thread's write that no barrier orders sees it in one of the
// two fixed orders and the stale word in the other, so a test that plans
// in both orders finds it whatever the two threads are. It cannot find a
// lost update (two threads adding to one word with no atomic: each runs
// alone, so no update is lost, and the atomics are plain additions here),
// nor anything of the memory model (no fences, no caching: every write is
// seen at once). A barrier or shuffle that the threads of the block (of
// the warp) reach at different calls, and a thread that exits while
// others wait at one, fail the plan: on a GPU they hang or are undefined.
// tests/test_plan_emulated.py builds it as a shared library (a host C++
// compiler, no CUDA) and calls TmlaPlanEmulated.
//
// Built with -fsanitize-coverage=trace-pc it also measures the plan's
// serial depth (TmlaEmulationDepth; benchmarks/plan_depth.py): the block
// barriers, and per phase between two barriers the most basic blocks (of
// the -O0 host code, an instruction proxy) and shuffles of any thread,
// summed over the phases. Without the flag the counts stay 0.
#include <execinfo.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define __CUDA_ARCH__ 900

namespace emu {

// How the threads waiting at barriers and shuffles are resumed.
enum Order { kRandom = 0, kAscending = 1, kDescending = 2 };

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
  Order order = kRandom;
  std::mt19937 rng;
  // The first failure (empty if none): the threads are then not resumed.
  std::string error;
  // The block barrier: arrivals of this generation, the call they wait at,
  // and the predicate counts of two generations in turn.
  uint64_t generation = 0;
  int arrived = 0;
  const void* site = nullptr;
  int counts[2] = {0, 0};
  // Per warp: a barrier, the call its lanes wait at and the words exchanged
  // by a shuffle.
  std::vector<uint64_t> warp_generation;
  std::vector<int> warp_arrived;
  std::vector<const void*> warp_site;
  std::vector<uint64_t> words;
  // Serial depth: per thread the basic blocks and shuffles of this phase;
  // the barriers and the phases' maxima summed.
  std::vector<int64_t> phase_blocks, phase_shuffles;
  int64_t barriers = 0, depth_blocks = 0, depth_shuffles = 0;
};

Block* block = nullptr;
// Whether the planner's code (not the emulation's) is running: its basic
// blocks count towards the serial depth, in phase_blocks (of the running
// block: the coverage callback calls no instrumented code).
bool counting = false;
int64_t* phase_blocks = nullptr;

// Adds the phase's maxima to the depth and starts the next phase.
void EndPhase(Block& b) {
  b.depth_blocks +=
      *std::max_element(b.phase_blocks.begin(), b.phase_blocks.end());
  b.depth_shuffles +=
      *std::max_element(b.phase_shuffles.begin(), b.phase_shuffles.end());
  std::fill(b.phase_blocks.begin(), b.phase_blocks.end(), 0);
  std::fill(b.phase_shuffles.begin(), b.phase_shuffles.end(), 0);
}

// Pauses the depth count while the emulation runs for the planner.
struct NotCounted {
  bool was = counting;
  NotCounted() { counting = false; }
  ~NotCounted() { counting = was; }
};

Thread& Current() { return block->thread[block->current]; }

void Yield() { swapcontext(&Current().context, &block->scheduler); }

// Records the first failure; the scheduler then stops.
void Fail(const std::string& what) {
  if (block->error.empty()) {
    block->error = "thread " + std::to_string(block->current) + ": " + what;
  }
}

void Entry() {
  Block& b = *block;
  counting = true;
  b.body(b.current);
  counting = false;
  Current().done = true;
  if (b.arrived > 0) Fail("exits while others wait at a barrier");
  if (b.warp_arrived[b.current / 32] > 0) {
    Fail("exits while its warp waits at a shuffle");
  }
  Yield();
}

// Serial depth of the last Run: barriers, basic blocks, shuffles.
int64_t last_depth[3] = {0, 0, 0};

// Runs body(tid) for threads threads; *error: the first failure, or "".
void Run(int threads, Order order, uint32_t seed,
         std::function<void(int)> body, std::string* error) {
  Block b;
  b.threads = threads;
  b.thread.resize(threads);
  b.body = std::move(body);
  b.order = order;
  b.rng.seed(seed);
  b.warp_generation.assign(threads / 32, 0);
  b.warp_arrived.assign(threads / 32, 0);
  b.warp_site.assign(threads / 32, nullptr);
  b.words.assign(threads, 0);
  b.phase_blocks.assign(threads, 0);
  b.phase_shuffles.assign(threads, 0);
  phase_blocks = b.phase_blocks.data();
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
  std::vector<int> turns(threads);
  for (int t = 0; t < threads; ++t) {
    turns[t] = order == kDescending ? threads - 1 - t : t;
  }
  for (bool running = true; running && b.error.empty();) {
    running = false;
    if (order == kRandom) std::shuffle(turns.begin(), turns.end(), b.rng);
    for (int t : turns) {
      if (b.thread[t].done || !b.error.empty()) continue;
      running = true;
      b.current = t;
      swapcontext(&b.scheduler, &b.thread[t].context);
    }
  }
  EndPhase(b);
  last_depth[0] = b.barriers;
  last_depth[1] = b.depth_blocks;
  last_depth[2] = b.depth_shuffles;
  *error = b.error;
  block = nullptr;
}

// Waits until every thread of the block has arrived at the call `site`;
// returns how many arrived with a nonzero predicate. Every thread then
// waits for its turn (the one that completes the barrier too), so the
// threads run the next phase in the scheduler's order.
int BlockBarrier(int predicate, const void* site) {
  Block& b = *block;
  const uint64_t generation = b.generation;
  if (b.arrived == 0) {
    b.site = site;
  } else if (b.site != site) {
    Fail("reaches another __syncthreads than the threads before it");
  }
  b.counts[generation & 1] += predicate != 0;
  if (++b.arrived == b.threads) {
    b.arrived = 0;
    b.counts[(generation + 1) & 1] = 0;
    ++b.generation;
    ++b.barriers;
    EndPhase(b);
  }
  while (b.generation == generation) Yield();
  Yield();
  return b.counts[generation & 1];
}

void WarpBarrier(const void* site) {
  Block& b = *block;
  const int warp = b.current / 32;
  const uint64_t generation = b.warp_generation[warp];
  if (b.warp_arrived[warp] == 0) {
    b.warp_site[warp] = site;
  } else if (b.warp_site[warp] != site) {
    Fail("reaches another shuffle than the lanes of its warp before it");
  }
  if (++b.warp_arrived[warp] == 32) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
  } else {
    while (b.warp_generation[warp] == generation) Yield();
  }
  Yield();  // other warps run in between
}

// Every lane of the warp offers v at the call `site` and receives the value
// of lane `from`.
template <typename T>
T Exchange(T v, int from, const void* site) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Block& b = *block;
  ++b.phase_shuffles[b.current];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.words[b.current] = bits;
  WarpBarrier(site);
  bits = b.words[(b.current & ~31) + from];
  WarpBarrier(site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

int Lane() { return block->current & 31; }

}  // namespace emu

#define threadIdx (::emu::Current().index)

// The intrinsics are not inlined: the address a shuffle returns to names
// the call that a warp's lanes wait at; for a barrier, the addresses of
// the calls that lead to it (built with -O0, no call is copied or inlined).
#define TMLA_EMU_CALL __attribute__((noinline))
#define TMLA_EMU_SITE __builtin_return_address(0)

namespace emu {
// A barrier's call path as one number.
inline const void* Path() {
  void* calls[12];
  const int depth = backtrace(calls, 12);
  uintptr_t h = 0;
  for (int i = 0; i < depth; ++i) {
    h = h * 0x100000001b3u ^ reinterpret_cast<uintptr_t>(calls[i]);
  }
  return reinterpret_cast<const void*>(h);
}
}  // namespace emu

// Counts a basic block of the planner's code (with -fsanitize-coverage).
extern "C" __attribute__((no_sanitize_coverage)) void
__sanitizer_cov_trace_pc() {
  if (emu::counting) ++emu::phase_blocks[emu::block->current];
}

TMLA_EMU_CALL void __syncthreads() {
  const emu::NotCounted paused;
  emu::BlockBarrier(0, emu::Path());
}
TMLA_EMU_CALL int __syncthreads_count(int predicate) {
  const emu::NotCounted paused;
  return emu::BlockBarrier(predicate, emu::Path());
}
template <typename T>
TMLA_EMU_CALL T __shfl_sync(unsigned, T v, int from, int width = 32) {
  const emu::NotCounted paused;
  return emu::Exchange(v, (emu::Lane() & ~(width - 1)) + (from & (width - 1)),
                       TMLA_EMU_SITE);
}
template <typename T>
TMLA_EMU_CALL T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const emu::NotCounted paused;
  const int lane = emu::Lane();
  const int from = lane ^ mask;
  return emu::Exchange(
      v, (from & ~(width - 1)) == (lane & ~(width - 1)) ? from : lane,
      TMLA_EMU_SITE);
}
template <typename T>
TMLA_EMU_CALL T __shfl_up_sync(unsigned, T v, unsigned delta,
                               int width = 32) {
  const emu::NotCounted paused;
  const int lane = emu::Lane();
  const int from = lane - static_cast<int>(delta);
  return emu::Exchange(v, from < (lane & ~(width - 1)) ? lane : from,
                       TMLA_EMU_SITE);
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

namespace {
std::string last_error;
}  // namespace

// The failure of the last TmlaPlanEmulated, or "".
extern "C" const char* TmlaEmulationError() { return last_error.c_str(); }

// The serial depth of the last TmlaPlanEmulated (see the top of the file):
// out[0] barriers, out[1] basic blocks, out[2] shuffles.
extern "C" void TmlaEmulationDepth(int64_t* out) {
  for (int k = 0; k < 3; ++k) out[k] = emu::last_depth[k];
}

namespace {

// planner.h's PlannerParams of TmlaPlanEmulated's arguments.
plan::PlannerParams Params(
    const int32_t* lengths, int32_t batch, int32_t h_kv, int32_t num_tiles,
    int32_t last_tile_rows, int32_t num_sms, int32_t capacity,
    int32_t page_size, int32_t max_seqlen, int64_t partial_fixed_ns,
    int64_t reduce_fixed_ns, int64_t page_ns_full, int64_t page_ns_last,
    const int64_t* input_ns, int32_t* instructions, int32_t* seqlens,
    int32_t* info) {
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
  return p;
}

// Runs body(c, scratch) in every thread of the block over fresh scratch;
// returns 0, or 1 if the threads failed (last_error says how).
template <typename Body>
int RunBlock(const plan::PlannerParams& p, int32_t order, uint32_t seed,
             const Body& body) {
  const int64_t items = int64_t{p.batch} * p.h_kv * p.num_tiles;
  plan::Scratch sizes;
  // Scratch the planner reads before it writes shows up as garbage.
  std::vector<int64_t> scratch(
      plan::Carve(nullptr, plan::SizesOf(items, p.num_sms),
                  static_cast<int>(items), &sizes) / 8 + 1,
      int64_t{0x5a5a5a5a5a5a5a5a});
  plan::Carry carry;
  std::string error;
  emu::Run(plan::kPlannerThreads, static_cast<emu::Order>(order), seed,
           [&](int tid) {
    plan::Ctx c{tid, plan::kPlannerThreads};
    body(c, reinterpret_cast<char*>(scratch.data()), &carry);
  }, &error);
  last_error = error;
  return error.empty() ? 0 : 1;
}

}  // namespace

// Plans as the device planner would: the arguments as planner.h's
// PlannerParams (prices in ns, input_ns[kInputPrices]); the outputs as
// the FFI handler's. `order` (emu::Order) and, for a random order, `seed`
// order the threads. Returns 0, or 1 if the threads failed
// (TmlaEmulationError says how); the outputs are then incomplete.
extern "C" int TmlaPlanEmulated(
    const int32_t* lengths, int32_t batch, int32_t h_kv, int32_t num_tiles,
    int32_t last_tile_rows, int32_t num_sms, int32_t capacity,
    int32_t page_size, int32_t max_seqlen, int64_t partial_fixed_ns,
    int64_t reduce_fixed_ns, int64_t page_ns_full, int64_t page_ns_last,
    const int64_t* input_ns, int32_t* instructions, int32_t* seqlens,
    int32_t* info, int32_t order, uint32_t seed) {
  const plan::PlannerParams p = Params(
      lengths, batch, h_kv, num_tiles, last_tile_rows, num_sms, capacity,
      page_size, max_seqlen, partial_fixed_ns, reduce_fixed_ns, page_ns_full,
      page_ns_last, input_ns, instructions, seqlens, info);
  return RunBlock(p, order, seed,
                  [&](plan::Ctx& c, char* scratch, plan::Carry* carry) {
    plan::Plan(c, p, scratch, carry);
  });
}

// Layout B measured whatever the other layouts' makespans, for the
// arguments of TmlaPlanEmulated (threads in thread order): out[0] its
// makespan, out[1] LowerBoundB's bound of it. Returns as TmlaPlanEmulated.
extern "C" int TmlaLowerBoundB(
    const int32_t* lengths, int32_t batch, int32_t h_kv, int32_t num_tiles,
    int32_t last_tile_rows, int32_t num_sms, int32_t capacity,
    int32_t page_size, int32_t max_seqlen, int64_t partial_fixed_ns,
    int64_t reduce_fixed_ns, int64_t page_ns_full, int64_t page_ns_last,
    const int64_t* input_ns, int32_t* instructions, int32_t* seqlens,
    int32_t* info, int64_t* out) {
  const plan::PlannerParams p = Params(
      lengths, batch, h_kv, num_tiles, last_tile_rows, num_sms, capacity,
      page_size, max_seqlen, partial_fixed_ns, reduce_fixed_ns, page_ns_full,
      page_ns_last, input_ns, instructions, seqlens, info);
  return RunBlock(p, emu::kAscending, 0,
                  [&](plan::Ctx& c, char* scratch, plan::Carry* carry) {
    plan::Scratch s;
    plan::Items it(p, s);
    plan::PriceItems(c, it, s, scratch, carry);
    const int64_t bound = plan::LowerBoundB(c, it);
    const int64_t makespan = plan::MeasureB(c, it, s).makespan;
    if (c.tid == 0) {
      out[0] = makespan;
      out[1] = bound;
    }
  });
}
