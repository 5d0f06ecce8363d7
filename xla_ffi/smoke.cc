#include <cstdint>

#include "csrc/smoke.h"
#include "xla_ffi/check.h"
#include "xla_ffi/handlers.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error SmokeScaleImpl(cudaStream_t stream, float scale,
                          ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::F32> y) {
  TMLA_RETURN_INVALID_IF(x.element_count() != y->element_count(),
                         "tmla_smoke_scale: x and y differ in size");
  TMLA_CUDA_RETURN_IF_ERROR(tmla::LaunchScale(
      x.typed_data(), y->typed_data(),
      static_cast<int64_t>(x.element_count()), scale, stream));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TmlaSmokeScale, SmokeScaleImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Attr<float>("scale")
        .Arg<ffi::Buffer<ffi::F32>>()   // x: [n]
        .Ret<ffi::Buffer<ffi::F32>>(),  // y: [n]
    {ffi::Traits::kCmdBufferCompatible});
