// Host entry point of the device planner (planner.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "planner.h"

namespace tmla::plan {

// Launches the planner as one CTA on `stream`. Its scratch lives in shared
// memory when scratch_bytes plus the kernel's static shared memory (its
// Carry) fit in max_shared_bytes, else in p.scratch (device
// memory of PlannerScratchBytes bytes).
cudaError_t LaunchPlanner(const PlannerParams& p, int64_t scratch_bytes,
                          int64_t max_shared_bytes, cudaStream_t stream);

}  // namespace tmla::plan
