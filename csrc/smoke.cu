#include "smoke.h"

namespace tmla {
namespace {

constexpr int kScaleThreads = 256;

__global__ void ScaleKernel(const float* __restrict__ x, float* __restrict__ y,
                            int64_t n, float scale) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = x[i] * scale;
  }
}

}  // namespace

cudaError_t LaunchScale(const float* x, float* y, int64_t n, float scale,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int64_t kMaxBlocks = 4096;
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (n + kScaleThreads - 1) / kScaleThreads);
  ScaleKernel<<<static_cast<int>(blocks), kScaleThreads, 0, stream>>>(
      x, y, n, scale);
  return cudaGetLastError();
}

}  // namespace tmla
