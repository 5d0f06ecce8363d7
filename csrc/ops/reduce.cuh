// REDUCE: the LSE-weighted merge of partials (fp32 slots, base-2 LSE) into
// the final output or another slot. Each consumer merges its 256 columns;
// partials are read through L2 (ld.global.cg), never a stale L1 line.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.h"
#include "../instruction.cuh"
#include "../params.h"
#include "partial.cuh"

namespace tmla::ops {

template <typename T>
__device__ __forceinline__ void Reduce(const MlaDecodeParams& p,
                                       const Instruction& in, int consumer,
                                       int thread_in_wg) {
  constexpr int kVecPerRow = config::kColsPerConsumer / 4;  // float4s
  const RowMap map{p.h_q / p.h_kv};
  const int src = in.arg0;
  const int num_src = in.arg1;
  for (int w = thread_in_wg; w < in.num_rows * kVecPerRow;
       w += config::kWarpgroupThreads) {
    const int r = w / kVecPerRow;
    const int col = consumer * config::kColsPerConsumer + (w % kVecPerRow) * 4;
    float m = -INFINITY;
    for (int i = 0; i < num_src; ++i) {
      m = fmaxf(m, __ldcg(p.partial_lse +
                          static_cast<int64_t>(src + i) * config::kTileRows +
                          r));
    }
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float sum = 0.f;
    if (m != -INFINITY) {
      for (int i = 0; i < num_src; ++i) {
        const int64_t slot_row =
            static_cast<int64_t>(src + i) * config::kTileRows + r;
        const float weight = exp2f(__ldcg(p.partial_lse + slot_row) - m);
        const float4 v = __ldcg(reinterpret_cast<const float4*>(
            p.partial_o + slot_row * config::kHeadDimV + col));
        sum += weight;
        acc.x += weight * v.x;
        acc.y += weight * v.y;
        acc.z += weight * v.z;
        acc.w += weight * v.w;
      }
      const float inv = 1.f / sum;
      acc = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    }
    const float lse2 = m != -INFINITY ? m + log2f(sum) : -INFINITY;
    const bool writes_lse = consumer == 0 && col == 0;
    if (in.dst_slot == isa::kFinalOutput) {
      const int64_t row =
          (static_cast<int64_t>(in.batch) * p.s_q + map.Token(in, r)) *
              p.h_q + map.Head(in, r);
      uint2 packed;
      packed.x = Pack2<T>::Of(acc.x, acc.y);
      packed.y = Pack2<T>::Of(acc.z, acc.w);
      *reinterpret_cast<uint2*>(static_cast<T*>(p.out) +
                                row * config::kHeadDimV + col) = packed;
      if (writes_lse) {
        const int64_t at =
            (static_cast<int64_t>(in.batch) * p.h_q + map.Head(in, r)) *
                p.s_q + map.Token(in, r);
        p.lse[at] = m != -INFINITY ? lse2 * kLn2 : INFINITY;
      }
    } else {
      const int64_t slot_row =
          static_cast<int64_t>(in.dst_slot) * config::kTileRows + r;
      *reinterpret_cast<float4*>(p.partial_o + slot_row * config::kHeadDimV +
                                 col) = acc;
      if (writes_lse) p.partial_lse[slot_row] = lse2;
    }
  }
}

}  // namespace tmla::ops
