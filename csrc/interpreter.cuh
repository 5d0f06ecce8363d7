// The persistent interpreter: one CTA per SM walks its row of the
// instruction tensor; warpgroup 0 produces K/V, warpgroups 1-2 execute.
// Dependencies between CTAs go through counters in the workspace: a
// consumer waits with ld.acquire.gpu, and signals after a device-scope
// fence once all its threads' results are written. Dispatch by opcode is
// listed here and nowhere else.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda.h>
#include <cuda_bf16.h>

#include "config.h"
#include "instruction.cuh"
#include "ops/partial.cuh"
#include "ops/reduce.cuh"
#include "params.h"
#include "producer.cuh"
#include "ptx.cuh"
#include "smem.cuh"
#include "timing.cuh"

namespace tmla {

__device__ __forceinline__ void WaitFor(const MlaDecodeParams& p,
                                        const Instruction& in, int consumer,
                                        int thread_in_wg) {
  if (!in.HasWait(p)) return;
  if (thread_in_wg == 0) {
    const int32_t* counter = p.counters + in.wait_counter;
    while (ptx::LoadAcquireGpu(counter) < in.wait_count) __nanosleep(64);
  }
  ptx::BarSync(config::kBarConsumer0 + consumer, config::kWarpgroupThreads);
}

__device__ __forceinline__ void Signal(const MlaDecodeParams& p,
                                       const Instruction& in,
                                       int consumer_thread) {
  if (!in.HasSignal(p)) return;
  if constexpr (config::kSignalRelease) {
    // The barrier orders every consumer thread's results before one
    // thread's release at GPU scope (cumulativity), so one fence suffices.
    // That thread is consumer 1's first: consumer 0's threads may have the
    // next query tile's loads in flight.
    ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
    if (consumer_thread == config::kWarpgroupThreads) {
      ptx::ReleaseIncrementGpu(p.counters + in.signal_counter);
    }
  } else {
    __threadfence();
    ptx::BarSync(config::kBarConsumers, config::kConsumerThreads);
    if (consumer_thread == 0) atomicAdd(p.counters + in.signal_counter, 1);
  }
}

template <typename T, bool kTiming, bool kFp8>
__device__ __forceinline__ void RunConsumer(const MlaDecodeParams& p,
                                            const Smem& smem, int consumer,
                                            int thread_in_wg) {
  Pipeline pipe{0, 0};
  // Consumer 0's first thread keeps the timing records.
  const bool timer = consumer == 0 && thread_in_wg == 0;
  // Whether consumer 0 already started loading the query tile of `in`.
  bool q_issued = false;
  int i = 0;
  for (; i < p.max_instructions; ++i) {
    const Instruction in = Instruction::Fetch(p, blockIdx.x, i);
    if (in.opcode == isa::kOpStop) break;
    Marks<kTiming> marks;
    marks.Start();
    if (in.Valid(p)) {
      WaitFor(p, in, consumer, thread_in_wg);
      marks.Ready();
      switch (in.opcode) {
        case isa::kOpPartial:
          if (consumer == 0) {
            q_issued = ops::PartialSoftmaxConsumer<
                T, config::BoxBarriers(kFp8), config::kPvAsync && !kFp8>(
                p, in, i, q_issued, smem, thread_in_wg, pipe, marks);
          } else {
            ops::PartialPvConsumer<T, config::BoxBarriers(kFp8)>(p, in, smem,
                                                      thread_in_wg, pipe);
          }
          break;
        case isa::kOpReduce:
          ops::Reduce<T>(p, in, i, smem, consumer, thread_in_wg);
          marks.Computed();
          break;
      }
    }
    Signal(p, in, consumer * config::kWarpgroupThreads + thread_in_wg);
    if (timer) marks.Store(p, i, in.opcode);
  }
  if (timer) Marks<kTiming>().ClearFrom(p, i);
}

// T: the element type of q and out (and of the cache unless kFp8); kFp8:
// the cache is FP8 (fp8_kv.cuh; T is bf16).
template <typename T, bool kTiming, bool kFp8>
__global__ void __launch_bounds__(config::kThreads, 1)
    MlaDecodeKernel(const __grid_constant__ MlaDecodeParams p,
                    const __grid_constant__ KvMaps maps) {
  extern __shared__ uint8_t smem_raw[];
  const Smem smem = Smem::Carve(smem_raw);
  if (threadIdx.x == 0) {
    for (int s = 0; s < config::kStages; ++s) {
      ptx::MbarInit(&smem.full[s], kFp8 ? fp8::kConverterThreads : 1);
      ptx::MbarInit(&smem.empty[s], config::kNumConsumers);
      ptx::MbarInit(&smem.raw[s], 1);
    }
    ptx::MbarInit(smem.hand_full, config::kWarpgroupThreads);
    ptx::MbarInit(smem.hand_empty, config::kWarpgroupThreads);
    if constexpr (config::kReduceBulk) {
      ptx::MbarInit(smem.merge, 1);
      *smem.producer_done = 0;
    }
    if constexpr (config::BoxBarriers(kFp8)) {
      for (int b = 0; b < config::kStages * config::kNumColBlocks; ++b) {
        ptx::MbarInit(&smem.box_full[b], 1);
      }
    }
    ptx::FenceMbarInit();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / config::kWarpgroupThreads;
  const int thread_in_wg = threadIdx.x % config::kWarpgroupThreads;
  if (warpgroup == 0) {
    ptx::SetMaxRegistersDec<kFp8 ? config::kFp8ProducerRegisters
                                  : config::kProducerRegisters>();
    if (thread_in_wg == 0) RunProducer<kFp8>(p, &maps, smem);
    if constexpr (kFp8) {
      static_assert(std::is_same_v<T, __nv_bfloat16>,
                    "an FP8 cache dequantizes to bf16");
      if (thread_in_wg >= fp8::kFirstConverterThread) {
        fp8::RunConverter(p, smem, thread_in_wg - fp8::kFirstConverterThread);
      }
    }
  } else {
    ptx::SetMaxRegistersInc<kFp8 ? config::kFp8ConsumerRegisters
                                  : config::kConsumerRegisters>();
    RunConsumer<T, kTiming, kFp8>(p, smem, warpgroup - 1, thread_in_wg);
  }
}

}  // namespace tmla
