// The device planner: planner.cuh's Plan run by one CTA.
#include "planner.cuh"
#include "planner_launch.h"

namespace tmla::plan {
namespace {

__global__ void __launch_bounds__(kPlannerThreads)
    PlannerKernel(const PlannerParams p, bool in_shared) {
  extern __shared__ __align__(16) char shared[];
  char* base = in_shared ? shared : static_cast<char*>(p.scratch);
  __shared__ Carry carry;
  // The block size as a constant: divisions by it are shifts.
  Ctx c{static_cast<int>(threadIdx.x), kPlannerThreads};
  Plan(c, p, base, &carry);
}

}  // namespace

int64_t PlannerScratchBytes(int64_t num_items, int64_t num_sms) {
  Scratch s;
  // The lengths array is at most one word per item.
  return Carve(nullptr, SizesOf(num_items, num_sms),
               static_cast<int>(num_items), &s);
}

cudaError_t LaunchPlanner(const PlannerParams& p, int64_t scratch_bytes,
                          int64_t max_shared_bytes, cudaStream_t stream) {
  // The kernel's static shared memory (Carry) counts against the limit.
  const bool in_shared =
      scratch_bytes + static_cast<int64_t>(sizeof(Carry)) <= max_shared_bytes;
  const int shared = in_shared ? static_cast<int>(scratch_bytes) : 0;
  if (shared + static_cast<int>(sizeof(Carry)) > 48 * 1024) {
    cudaError_t status = cudaFuncSetAttribute(
        PlannerKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    if (status != cudaSuccess) return status;
  }
  PlannerKernel<<<1, kPlannerThreads, shared, stream>>>(p, in_shared);
  return cudaGetLastError();
}

}  // namespace tmla::plan
