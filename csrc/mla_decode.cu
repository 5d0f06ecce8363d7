#include "mla_decode.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <numeric>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "config.h"
#include "interpreter.cuh"

namespace tmla {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// K/V as a 3-D tensor [tokens = num_pages * page_size][h_kv][entry]; a box
// is 128 bytes (64 bf16/fp16 columns, or 128 bytes of an FP8 entry) x 1
// head x chunk_tokens tokens, 128-byte swizzled in smem.
cudaError_t EncodeKvMap(const MlaDecodeLaunch& l, CUtensorMap* map) {
  auto encode = TensorMapEncoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  const MlaDecodeParams& p = l.params;
  const uint64_t elem = l.kv_fp8 ? 1 : 2;
  const uint64_t entry = l.kv_fp8 ? isa::kFp8EntryBytes : config::kHeadDimQK;
  const cuuint64_t dims[3] = {
      static_cast<cuuint64_t>(entry), static_cast<cuuint64_t>(p.h_kv),
      static_cast<cuuint64_t>(p.num_pages) * p.page_size};
  const cuuint64_t strides[2] = {entry * elem, entry * elem * p.h_kv};
  const cuuint32_t box[3] = {
      static_cast<cuuint32_t>(config::kSwizzleBytes / elem), 1,
      static_cast<cuuint32_t>(p.chunk_tokens)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      l.kv_fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
      : l.dtype == ElementType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(
      map, type, 3, const_cast<void*>(p.kv), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// An FP8 cache's scales: 16-byte boxes (the entry's 4 float32 scales) x 1
// head x chunk_tokens tokens, unswizzled.
cudaError_t EncodeScaleMap(const MlaDecodeLaunch& l, CUtensorMap* map) {
  auto encode = TensorMapEncoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  const MlaDecodeParams& p = l.params;
  const uint64_t entry = isa::kFp8EntryBytes;
  const cuuint64_t dims[3] = {
      static_cast<cuuint64_t>(entry), static_cast<cuuint64_t>(p.h_kv),
      static_cast<cuuint64_t>(p.num_pages) * p.page_size};
  const cuuint64_t strides[2] = {entry, entry * p.h_kv};
  const cuuint32_t box[3] = {isa::kFp8NumScales * 4, 1,
                             static_cast<cuuint32_t>(p.chunk_tokens)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode(
      map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(p.kv), dims,
      strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, bool kTiming, bool kFp8 = false>
cudaError_t Launch(const MlaDecodeLaunch& l, const KvMaps& maps,
                   cudaStream_t stream) {
  auto kernel = MlaDecodeKernel<T, kTiming, kFp8>;
  cudaError_t status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      config::kSmemBytes);
  if (status != cudaSuccess) return status;
  kernel<<<l.num_ctas, config::kThreads, config::kSmemBytes, stream>>>(
      l.params, maps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchMlaDecode(const MlaDecodeLaunch& l, cudaStream_t stream) {
  MlaDecodeLaunch launch = l;
  launch.params.chunk_tokens =
      std::gcd(launch.params.page_size, config::kBlockTokens);
  KvMaps maps;
  cudaError_t status = EncodeKvMap(launch, &maps.kv);
  if (status != cudaSuccess) return status;
  maps.scales = maps.kv;
  if (launch.kv_fp8) {
    status = EncodeScaleMap(launch, &maps.scales);
    if (status != cudaSuccess) return status;
  }
  if (launch.params.num_counters > 0) {
    status = cudaMemsetAsync(launch.params.counters, 0,
                             sizeof(int32_t) * launch.params.num_counters,
                             stream);
    if (status != cudaSuccess) return status;
  }
  if (launch.num_ctas == 0) return cudaSuccess;
  const bool bf16 = launch.dtype == ElementType::kBFloat16;
  if (launch.kv_fp8) {
    if (!bf16) return cudaErrorInvalidValue;
    return launch.params.timings != nullptr
               ? Launch<__nv_bfloat16, true, true>(launch, maps, stream)
               : Launch<__nv_bfloat16, false, true>(launch, maps, stream);
  }
  if (launch.params.timings != nullptr) {
    return bf16 ? Launch<__nv_bfloat16, true>(launch, maps, stream)
                : Launch<__half, true>(launch, maps, stream);
  }
  return bf16 ? Launch<__nv_bfloat16, false>(launch, maps, stream)
              : Launch<__half, false>(launch, maps, stream);
}

}  // namespace tmla
