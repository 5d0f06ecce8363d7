// Turns CUDA errors and failed checks into xla::ffi::Error values.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

namespace tmla::ffi_util {

inline xla::ffi::Error CudaError(cudaError_t status, const char* what) {
  return xla::ffi::Error(
      xla::ffi::ErrorCode::kInternal,
      std::string(what) + ": " + cudaGetErrorName(status) + ": " +
          cudaGetErrorString(status));
}

}  // namespace tmla::ffi_util

// Returns an ffi::Error from the enclosing handler when `expr` fails.
#define TMLA_CUDA_RETURN_IF_ERROR(expr)                                 \
  do {                                                                  \
    cudaError_t tmla_status_ = (expr);                                  \
    if (tmla_status_ != cudaSuccess) {                                  \
      return ::tmla::ffi_util::CudaError(tmla_status_, #expr);          \
    }                                                                   \
  } while (0)

#define TMLA_RETURN_INVALID_IF(cond, message)                           \
  do {                                                                  \
    if (cond) {                                                         \
      return ::xla::ffi::Error::InvalidArgument(message);               \
    }                                                                   \
  } while (0)
