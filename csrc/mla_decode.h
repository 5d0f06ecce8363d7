// Host entry point of the MLA decode megakernel: builds the K/V tensor map,
// zeroes the dependency counters and launches, all on the given stream.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "params.h"

namespace tmla {

enum class ElementType { kBFloat16, kFloat16 };

struct MlaDecodeLaunch {
  MlaDecodeParams params;
  const void* kv_cache;  // T [num_pages, page_size, h_kv, 576]
  ElementType dtype;
  int32_t num_ctas;      // rows of the instruction tensor
};

// Launches the timed build of the kernel when launch.params.timings is set.
cudaError_t LaunchMlaDecode(const MlaDecodeLaunch& launch,
                            cudaStream_t stream);

}  // namespace tmla
