// XLA FFI handler of the MLA decode megakernel: decodes buffers and
// attributes, checks what the kernel relies on, fills the launch
// parameters and launches on XLA's stream. No host sync, no allocation.
#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "csrc/config.h"
#include "csrc/isa.h"
#include "csrc/mla_decode.h"
#include "xla_ffi/check.h"
#include "xla_ffi/handlers.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxDevices = 64;

// SM count per device ordinal, read once.
cudaError_t SmCount(int32_t device, int* count) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  if (device < 0 || device >= kMaxDevices) {
    return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount,
                                  device);
  }
  int cached = cache[device].load(std::memory_order_relaxed);
  if (cached == 0) {
    cudaError_t status = cudaDeviceGetAttribute(
        &cached, cudaDevAttrMultiProcessorCount, device);
    if (status != cudaSuccess) return status;
    cache[device].store(cached, std::memory_order_relaxed);
  }
  *count = cached;
  return cudaSuccess;
}

std::string Dims(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return s + "]";
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("tmla_mla_decode: " + message);
}

// Shared by the plain and the timed target; `timings` is null for the
// plain one ([ctas, n, kTimingWords] int32 otherwise).
ffi::Error Decode(cudaStream_t stream, int32_t device, float softmax_scale,
                  int32_t causal, int32_t num_slots, int32_t num_counters,
                  ffi::AnyBuffer q, ffi::AnyBuffer kv_cache,
                  ffi::Buffer<ffi::S32> block_table,
                  ffi::Buffer<ffi::S32> seqlens,
                  ffi::Buffer<ffi::S32> plan_seqlens,
                  ffi::Buffer<ffi::S32> instructions,
                  ffi::Result<ffi::AnyBuffer> out,
                  ffi::Result<ffi::Buffer<ffi::F32>> lse,
                  ffi::Result<ffi::Buffer<ffi::F32>> workspace,
                  int32_t* timings, size_t timing_words) {
  namespace config = tmla::config;
  namespace isa = tmla::isa;
  const auto qd = q.dimensions();
  const auto kd = kv_cache.dimensions();
  const auto td = block_table.dimensions();
  const auto id = instructions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 ||
      seqlens.dimensions().size() != 1 ||
      plan_seqlens.dimensions().size() != 1 || id.size() != 3) {
    return Invalid("expected q [b, s_q, h_q, 576], kv_cache [pages, "
                   "page_size, h_kv, 576] (or uint8 [pages, page_size, h_kv, "
                   "656], FP8), block_table [b, max_pages], seqlens [b], "
                   "plan_seqlens [b], instructions [ctas, n, 16]");
  }
  const int64_t batch = qd[0], s_q = qd[1], h_q = qd[2];
  const int64_t num_pages = kd[0], page_size = kd[1], h_kv = kd[2];
  const bool kv_fp8 = kv_cache.element_type() == ffi::DataType::U8;
  if (kv_fp8 ? q.element_type() != ffi::DataType::BF16
             : q.element_type() != kv_cache.element_type()) {
    return Invalid(kv_fp8 ? "an FP8 (uint8) kv_cache needs q of dtype bf16"
                          : "q and kv_cache must share dtype bf16 or f16");
  }
  if (out->element_type() != q.element_type() ||
      (q.element_type() != ffi::DataType::BF16 &&
       q.element_type() != ffi::DataType::F16)) {
    return Invalid("q and out must share dtype bf16 or f16");
  }
  const int64_t entry = kv_fp8 ? isa::kFp8EntryBytes : config::kHeadDimQK;
  if (qd[3] != config::kHeadDimQK || kd[3] != entry) {
    return Invalid("head dims must be 576 (an FP8 cache's entries " +
                   std::to_string(isa::kFp8EntryBytes) + " bytes), got q " +
                   Dims(qd) + " kv_cache " + Dims(kd));
  }
  if (h_kv < 1 || h_q % h_kv != 0 || page_size % isa::kPageSizeMultiple ||
      page_size < isa::kPageSizeMultiple ||
      page_size > isa::kMaxPageSize || td[0] != batch ||
      seqlens.dimensions()[0] != batch ||
      plan_seqlens.dimensions()[0] != batch || td[1] < 1 || num_pages < 1) {
    return Invalid("inconsistent shapes: q " + Dims(qd) + " kv_cache " +
                   Dims(kd) + " block_table " + Dims(td));
  }
  if (id[2] != isa::kInstructionWords) {
    return Invalid("instructions must be [ctas, n, " +
                   std::to_string(isa::kInstructionWords) + "], got " +
                   Dims(id));
  }
  const int64_t workspace_words =
      isa::WorkspaceWords(num_slots, num_counters, isa::kHeadDimV);
  if (num_slots < 0 || num_counters < 0 ||
      static_cast<int64_t>(workspace->element_count()) < workspace_words) {
    return Invalid("workspace smaller than num_slots/num_counters need");
  }
  int sms = 0;
  TMLA_CUDA_RETURN_IF_ERROR(SmCount(device, &sms));
  if (id[0] > sms) {
    return Invalid("the plan has " + std::to_string(id[0]) +
                   " CTAs but device " + std::to_string(device) + " has " +
                   std::to_string(sms) +
                   " SMs; build the plan with num_sms <= the SM count");
  }

  if (timings != nullptr &&
      timing_words != static_cast<size_t>(id[0] * id[1]) *
                          isa::kTimingWords) {
    return Invalid("timings must be [ctas, n, " +
                   std::to_string(isa::kTimingWords) + "]");
  }

  tmla::MlaDecodeLaunch launch{};
  tmla::MlaDecodeParams& p = launch.params;
  p.q = q.untyped_data();
  p.block_table = block_table.typed_data();
  p.seqlens = seqlens.typed_data();
  p.plan_seqlens = plan_seqlens.typed_data();
  p.instructions = instructions.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  float* ws = workspace->typed_data();
  p.partial_o = ws;
  p.partial_lse = ws + isa::WorkspacePartialLse(num_slots, isa::kHeadDimV);
  p.counters = reinterpret_cast<int32_t*>(
      ws + isa::WorkspaceCounters(num_slots, isa::kHeadDimV));
  p.batch = static_cast<int32_t>(batch);
  p.s_q = static_cast<int32_t>(s_q);
  p.h_q = static_cast<int32_t>(h_q);
  p.h_kv = static_cast<int32_t>(h_kv);
  p.page_size = static_cast<int32_t>(page_size);
  p.num_pages = static_cast<int32_t>(num_pages);
  p.max_pages = static_cast<int32_t>(td[1]);
  p.max_instructions = static_cast<int32_t>(id[1]);
  p.num_slots = num_slots;
  p.num_counters = num_counters;
  p.causal = causal;
  p.timings = timings;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  p.kv = kv_cache.untyped_data();
  launch.kv_fp8 = kv_fp8;
  launch.dtype = q.element_type() == ffi::DataType::BF16
                     ? tmla::ElementType::kBFloat16
                     : tmla::ElementType::kFloat16;
  launch.num_ctas = static_cast<int32_t>(id[0]);
  TMLA_CUDA_RETURN_IF_ERROR(tmla::LaunchMlaDecode(launch, stream));
  return ffi::Error::Success();
}

ffi::Error MlaDecodeImpl(cudaStream_t stream, int32_t device,
                         float softmax_scale, int32_t causal,
                         int32_t num_slots, int32_t num_counters,
                         ffi::AnyBuffer q, ffi::AnyBuffer kv_cache,
                         ffi::Buffer<ffi::S32> block_table,
                         ffi::Buffer<ffi::S32> seqlens,
                         ffi::Buffer<ffi::S32> plan_seqlens,
                         ffi::Buffer<ffi::S32> instructions,
                         ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::F32>> workspace) {
  return Decode(stream, device, softmax_scale, causal, num_slots,
                num_counters, q, kv_cache, block_table, seqlens,
                plan_seqlens, instructions, out, lse, workspace, nullptr, 0);
}

ffi::Error MlaDecodeTimedImpl(
    cudaStream_t stream, int32_t device, float softmax_scale, int32_t causal,
    int32_t num_slots, int32_t num_counters, ffi::AnyBuffer q,
    ffi::AnyBuffer kv_cache, ffi::Buffer<ffi::S32> block_table,
    ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> plan_seqlens,
    ffi::Buffer<ffi::S32> instructions,
    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
    ffi::Result<ffi::Buffer<ffi::F32>> workspace,
    ffi::Result<ffi::Buffer<ffi::S32>> timings) {
  return Decode(stream, device, softmax_scale, causal, num_slots,
                num_counters, q, kv_cache, block_table, seqlens,
                plan_seqlens, instructions, out, lse, workspace, timings->typed_data(),
                timings->element_count());
}

// Buffers and attributes common to both targets, in handler order.
auto BindDecode() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<float>("softmax_scale")
      .Attr<int32_t>("causal")
      .Attr<int32_t>("num_slots")
      .Attr<int32_t>("num_counters")
      .Arg<ffi::AnyBuffer>()           // q: [b, s_q, h_q, 576]
      .Arg<ffi::AnyBuffer>()           // kv_cache: [pages, ps, h_kv, 576|656]
      .Arg<ffi::Buffer<ffi::S32>>()    // block_table: [b, max_pages]
      .Arg<ffi::Buffer<ffi::S32>>()    // seqlens: [b]
      .Arg<ffi::Buffer<ffi::S32>>()    // plan_seqlens: [b], planned lengths
      .Arg<ffi::Buffer<ffi::S32>>()    // instructions: [ctas, n, 16]
      .Ret<ffi::AnyBuffer>()           // out: [b, s_q, h_q, 512]
      .Ret<ffi::Buffer<ffi::F32>>()    // lse: [b, h_q, s_q]
      .Ret<ffi::Buffer<ffi::F32>>();   // workspace: [words]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmlaMlaDecode, MlaDecodeImpl, BindDecode(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TmlaMlaDecodeTimed, MlaDecodeTimedImpl,
    BindDecode().Ret<ffi::Buffer<ffi::S32>>(),  // timings: [ctas, n, 9]
    {ffi::Traits::kCmdBufferCompatible});
