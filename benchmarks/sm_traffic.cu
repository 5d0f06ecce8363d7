// How fast one SM moves the kernel's epilogue and merge traffic: the
// per-SM store and load rates of the partial write-out, the final bf16
// write-out and the REDUCE's reads, alone, beside 131 SMs streaming from
// DRAM, and with every SM doing the same; then the REDUCE's case proper,
// partials read right after six other SMs wrote and signalled them.
// Stand-alone CUDA (no JAX):
//
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 -Icsrc \
//     -o /tmp/sm_traffic benchmarks/sm_traffic.cu -lcuda && /tmp/sm_traffic
//
// The mbarrier, bulk-copy, fence and timer wrappers are the kernel's own
// (ptx.cuh, timing.cuh).
//
// Times are %globaltimer spans inside the measured CTA (median of 4 runs
// after a warm-up); the SM clock is printed beside them.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ptx.cuh"
#include "timing.cuh"

#define CHECK(x)                                                      \
  do {                                                                \
    const int e = static_cast<int>(x);                                \
    if (e != 0) {                                                     \
      std::printf("error %d: %s (line %d)\n", e, #x, __LINE__);       \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

namespace {

constexpr int kThreads = 256;
constexpr int kCols = 512;                    // fp32 columns of a slot row
constexpr int64_t kSlotFloats = 64 * kCols;  // one 128 KB partial slot
constexpr int kSmemBytes = 200 * 1024;
__device__ float g_sink;

using tmla::ptx::SmemAddr;

__device__ __forceinline__ uint64_t Now() {
  return static_cast<uint64_t>(tmla::GlobalTimerNs());
}
using tmla::ptx::BulkLoad;
__device__ __forceinline__ void InitBar(uint64_t* bar) {
  if (threadIdx.x == 0) {
    tmla::ptx::MbarInit(bar, 1);
    tmla::ptx::FenceMbarInit();
  }
  __syncthreads();
}

enum Pattern {
  kStoreFragmentF32,   // the partial write-out: float2, 8 rows per warp store
  kStoreFragmentBf16,  // the old final write-out: 4 bytes, 8 rows per store
  kStoreRowsF32,       // float4 along rows (coalesced)
  kStoreBulkF32,       // rows staged in smem, bulk-copied out
  kLoadMerge,          // the REDUCE's LDG: 16 float4 in flight per thread
  kLoadBulk,           // 2 KB rows bulk-copied in, every thread issuing
  kNumPatterns
};
const char* const kNames[] = {"store fp32 fragment", "store bf16 fragment",
                              "store fp32 rows", "store fp32 bulk rows",
                              "load merge (LDG)", "load bulk rows"};

// The pattern over slot `slot` (stores: 128 KB, bf16 64 KB) or, for loads,
// `rows` rows of `inputs` slots.
__device__ void Run(int pattern, float* ws, int slot, int inputs, int rows,
                    uint8_t* smem, uint64_t* bar) {
  const int t = threadIdx.x;
  float* dst = ws + static_cast<int64_t>(slot) * kSlotFloats;
  const int wg = t / 128, warp = t % 128 / 32, lane = t % 32;
  const int r0 = 16 * warp + lane / 4, col = wg * 256 + 2 * (lane % 4);
  switch (pattern) {
    case kStoreFragmentF32:
      for (int half = 0; half < 2; ++half) {
        float2* d = reinterpret_cast<float2*>(dst + (r0 + 8 * half) * kCols +
                                              col);
#pragma unroll
        for (int i = 0; i < 32; ++i) d[4 * i] = make_float2(i, t);
      }
      __threadfence();
      break;
    case kStoreFragmentBf16:
      for (int half = 0; half < 2; ++half) {
        uint32_t* d = reinterpret_cast<uint32_t*>(
            reinterpret_cast<uint16_t*>(dst) + (r0 + 8 * half) * kCols + col);
#pragma unroll
        for (int i = 0; i < 32; ++i) d[4 * i] = i + t;
      }
      __threadfence();
      break;
    case kStoreRowsF32:
      for (int i = t; i < inputs * kSlotFloats / 4; i += kThreads) {
        reinterpret_cast<float4*>(dst)[i] = make_float4(i, 1, 2, 3);
      }
      __threadfence();
      break;
    case kStoreBulkF32:
      for (int i = t; i < kSlotFloats / 4; i += kThreads) {
        reinterpret_cast<float4*>(smem)[i] = make_float4(i, 1, 2, 3);
      }
      tmla::ptx::FenceProxyAsync();
      __syncthreads();
      if (t < 64) {
        asm volatile(
            "cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                dst + t * kCols),
            "r"(SmemAddr(smem + t * kCols * 4)), "r"(kCols * 4)
            : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
      }
      __threadfence();
      break;
    case kLoadMerge: {
      const int c = (t % 128) * 4;
      float acc = 0.f;
      for (int rr = wg * 4; rr < rows; rr += 8) {
        for (int i0 = 0; i0 < inputs; i0 += 4) {
          float4 v[4][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const bool live = i0 + j < inputs && rr + k < rows;
              const float* s = dst + (live ? i0 + j : 0) * kSlotFloats +
                               (live ? rr + k : 0) * kCols + c;
              v[j][k] = live ? __ldcg(reinterpret_cast<const float4*>(s))
                             : make_float4(0.f, 0.f, 0.f, 0.f);
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int k = 0; k < 4; ++k) acc += v[j][k].x - v[j][k].w;
          }
        }
      }
      if (acc == 1234.5f) g_sink = acc;
      break;
    }
    case kLoadBulk: {
      const int n = rows * inputs;
      if (t == 0) tmla::ptx::MbarArriveExpectTx(bar, n * kCols * 4);
      __syncthreads();
      for (int k = t; k < n; k += kThreads) {
        BulkLoad(smem + k * kCols * 4, dst + (k / rows) * kSlotFloats +
                                           (k % rows) * kCols,
                 kCols * 4, bar);
      }
      tmla::ptx::MbarWait(bar, 0);
      break;
    }
  }
  __syncthreads();
}

// CTAs from `first` on read their share of `stream` (n float4) once.
__device__ void StreamFromDram(const float4* stream, int64_t n, int first) {
  const int64_t per = n / (gridDim.x - first);
  const float4* s = stream + (blockIdx.x - first) * per;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < per; i += kThreads * 4) {
    float4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = i + k * kThreads < per ? __ldcs(s + i + k * kThreads)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) acc += v[k].x;
  }
  if (acc == 1234.5f) g_sink = acc;
}

// CTAs below `measured` run the pattern (slots 8 apart) and record its
// span; the others stream `stream_n` float4 from DRAM when it is nonzero.
__global__ void __launch_bounds__(kThreads, 1)
    PerSm(int pattern, float* ws, int inputs, int rows, int measured,
          const float4* stream, int64_t stream_n, uint64_t* out) {
  extern __shared__ __align__(1024) uint8_t smem[];
  __shared__ uint64_t bar;
  InitBar(&bar);
  if (static_cast<int>(blockIdx.x) < measured) {
    if (stream_n) {  // let the streaming SMs ramp up
      const uint64_t t0 = Now();
      while (Now() - t0 < 5000) {
      }
    }
    const uint64_t t0 = Now();
    const long long c0 = clock64();
    Run(pattern, ws, blockIdx.x * 8, inputs, rows, smem, &bar);
    const long long c1 = clock64();
    const uint64_t t1 = Now();
    if (threadIdx.x == 0) out[blockIdx.x] = t1 - t0;
    if (threadIdx.x == 0 && blockIdx.x == 0) {
      out[255] = (c1 - c0) * 1000 / (t1 - t0);  // MHz
    }
  } else if (stream_n) {
    StreamFromDram(stream, stream_n, measured);
  }
}

// The REDUCE's case: in each group of 7 CTAs, 6 write a 128 KB slot each
// (fragment pattern), fence and signal; the 7th waits, then reads rows
// [0, 11) of the 6 slots (132 KB) twice, timing each read. `way`: 0 bulk
// copies from one thread, 1 bulk copies from 66 threads, 2 LDG.
constexpr int kWriters = 6;
constexpr int kReadRows = 11;

__device__ void ReadPartials(int way, const float* ws, uint8_t* smem,
                             uint64_t* bar, uint32_t parity) {
  const int t = threadIdx.x;
  if (way == 2) {
    Run(kLoadMerge, const_cast<float*>(ws), 0, kWriters, kReadRows, smem, bar);
    return;
  }
  const int n = kWriters * kReadRows;
  if (t == 0) {
    asm volatile("fence.proxy.async;" ::: "memory");
    tmla::ptx::MbarArriveExpectTx(bar, n * kCols * 4);
  }
  __syncthreads();
  const int first = way == 0 ? (t == 0 ? 0 : n) : t;
  const int step = way == 0 ? 1 : kThreads;
  for (int k = first; k < n; k += step) {
    BulkLoad(smem + k * kCols * 4,
             ws + (k / kReadRows) * kSlotFloats + (k % kReadRows) * kCols,
             kCols * 4, bar);
  }
  tmla::ptx::MbarWait(bar, parity);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1)
    FreshPartials(int way, float* ws, int* flags, int groups,
                  const float4* stream, int64_t stream_n, uint64_t* out) {
  const int g = blockIdx.x / (kWriters + 1);
  const int role = blockIdx.x % (kWriters + 1);
  if (g >= groups) {
    if (stream_n) StreamFromDram(stream, stream_n, groups * (kWriters + 1));
    return;
  }
  extern __shared__ __align__(1024) uint8_t smem[];
  __shared__ uint64_t bar;
  InitBar(&bar);
  float* base = ws + static_cast<int64_t>(g) * 8 * kSlotFloats;
  if (role < kWriters) {
    Run(kStoreFragmentF32, base, role, 0, 0, smem, &bar);
    if (threadIdx.x == 0) atomicAdd(flags + g, 1);
    return;
  }
  if (threadIdx.x == 0) {
    while (tmla::ptx::LoadAcquireGpu(flags + g) < kWriters) {
    }
  }
  __syncthreads();
  const uint64_t t0 = Now();
  ReadPartials(way, base, smem, &bar, 0);
  const uint64_t t1 = Now();
  ReadPartials(way, base, smem, &bar, 1);
  const uint64_t t2 = Now();
  if (threadIdx.x == 0) {
    out[2 * g] = t1 - t0;
    out[2 * g + 1] = t2 - t1;
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  CHECK(cudaSetDevice(0));
  const int64_t ws_bytes = 132LL * 8 * kSlotFloats * 4 + (64 << 20);
  float* ws;
  CHECK(cudaMalloc(&ws, ws_bytes));
  CHECK(cudaMemset(ws, 0, ws_bytes));
  const int64_t stream_bytes = 2LL << 30;
  float4* stream;
  CHECK(cudaMalloc(&stream, stream_bytes));
  CHECK(cudaMemset(stream, 1, stream_bytes));
  const int64_t stream_n = stream_bytes / 16;
  uint64_t* out;
  CHECK(cudaMalloc(&out, 256 * sizeof(uint64_t)));
  int* flags;
  CHECK(cudaMalloc(&flags, 64 * sizeof(int)));
  CHECK(cudaFuncSetAttribute(PerSm, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmemBytes));
  CHECK(cudaFuncSetAttribute(FreshPartials,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmemBytes));
  for (int i = 0; i < 20; ++i) {  // warm-up: the clock ramps
    PerSm<<<132, kThreads, kSmemBytes>>>(kLoadMerge, ws, 2, 64, 1, stream,
                                         stream_n, out);
  }
  CHECK(cudaDeviceSynchronize());

  struct Case {
    int pattern, inputs, rows;
    int64_t bytes;
  };
  const Case cases[] = {
      {kStoreFragmentF32, 1, 0, 128 << 10}, {kStoreFragmentBf16, 1, 0, 64 << 10},
      {kStoreRowsF32, 1, 0, 128 << 10},     {kStoreBulkF32, 1, 0, 128 << 10},
      {kLoadMerge, 6, 11, 6 * 11 * 2048},   {kLoadMerge, 2, 64, 2 * 64 * 2048},
      {kLoadBulk, 6, 11, 6 * 11 * 2048},    {kLoadBulk, 2, 48, 2 * 48 * 2048}};
  const char* const scenes[] = {"alone", "+131 streaming", "all 132"};
  std::printf("per-SM rates (loads read slots written by an earlier launch)\n");
  for (const Case& c : cases) {
    for (int scene = 0; scene < 3; ++scene) {
      const int measured = scene == 2 ? 132 : 1;
      std::vector<double> us;
      uint64_t mhz = 0;
      for (int rep = 0; rep < 5; ++rep) {
        if (c.pattern == kLoadMerge || c.pattern == kLoadBulk) {
          PerSm<<<132, kThreads, kSmemBytes>>>(kStoreRowsF32, ws, 8, 0, 132,
                                               nullptr, 0, out);
        }
        PerSm<<<scene == 0 ? 1 : 132, kThreads, kSmemBytes>>>(
            c.pattern, ws, c.inputs, c.rows, measured, stream,
            scene == 1 ? stream_n : 0, out);
        CHECK(cudaDeviceSynchronize());
        std::vector<uint64_t> ns(measured);
        CHECK(cudaMemcpy(ns.data(), out, measured * 8, cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(&mhz, out + 255, 8, cudaMemcpyDeviceToHost));
        double sum = 0.0;
        for (uint64_t x : ns) sum += x;
        if (rep > 0) us.push_back(sum / measured / 1e3);
      }
      const double t = Median(us);
      std::printf("%4d MHz  %-20s %2d x %2d rows  %-15s %7.2f us %6.1f GB/s\n",
                  static_cast<int>(mhz), kNames[c.pattern], c.inputs, c.rows,
                  scenes[scene], t, c.bytes / t / 1e3);
    }
  }

  std::printf("partials read right after 6 SMs wrote them (132 KB)\n");
  const char* const ways[] = {"bulk, 1 issuing thread", "bulk, 66 issuing",
                              "LDG 16 per thread"};
  const char* const fresh_scenes[] = {"1 group alone", "1 group +125 streaming",
                                      "18 groups at once"};
  for (int way = 0; way < 3; ++way) {
    for (int scene = 0; scene < 3; ++scene) {
      const int groups = scene == 2 ? 18 : 1;
      std::vector<double> first, second;
      for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaMemset(flags, 0, 64 * sizeof(int)));
        FreshPartials<<<132, kThreads, kSmemBytes>>>(
            way, ws, flags, groups, stream, scene == 1 ? stream_n : 0, out);
        CHECK(cudaDeviceSynchronize());
        std::vector<uint64_t> ns(2 * groups);
        CHECK(cudaMemcpy(ns.data(), out, ns.size() * 8,
                         cudaMemcpyDeviceToHost));
        double a = 0.0, b = 0.0;
        for (int g = 0; g < groups; ++g) {
          a += ns[2 * g];
          b += ns[2 * g + 1];
        }
        if (rep > 0) {
          first.push_back(a / groups / 1e3);
          second.push_back(b / groups / 1e3);
        }
      }
      std::printf("%-24s %-24s first read %6.2f us, again %6.2f us\n",
                  ways[way], fresh_scenes[scene], Median(first),
                  Median(second));
    }
  }
  return 0;
}
