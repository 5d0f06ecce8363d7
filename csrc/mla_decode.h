// Host entry point of the MLA decode megakernel: builds the K/V tensor map,
// zeroes the dependency counters and launches, all on the given stream.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "params.h"

namespace tmla {

enum class ElementType { kBFloat16, kFloat16 };

struct MlaDecodeLaunch {
  MlaDecodeParams params;  // params.kv: the cache
  ElementType dtype;       // of q and out (and of the cache unless kv_fp8)
  // The cache is FP8: uint8 [num_pages, page_size, h_kv, 656] (isa.h);
  // dtype must then be bf16.
  bool kv_fp8;
  int32_t num_ctas;        // rows of the instruction tensor
};

// Launches the timed build of the kernel when launch.params.timings is set.
cudaError_t LaunchMlaDecode(const MlaDecodeLaunch& launch,
                            cudaStream_t stream);

}  // namespace tmla
