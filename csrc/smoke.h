// A trivial kernel that proves the build, the FFI registration and the
// launch on XLA's stream end to end: y = x * scale.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace tmla {

// x: [n] fp32, y: [n] fp32 (device pointers). Launches on `stream`.
cudaError_t LaunchScale(const float* x, float* y, int64_t n, float scale,
                        cudaStream_t stream);

}  // namespace tmla
