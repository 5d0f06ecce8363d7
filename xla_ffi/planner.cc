// XLA FFI handlers of the planner (csrc/planner.h): the CUDA one launches
// the one-CTA kernel on XLA's stream; the CPU one runs the same code on one
// thread. Both decode the same buffers and attributes.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "csrc/isa.h"
#include "csrc/planner.cuh"
#include "csrc/planner_launch.h"
#include "xla_ffi/check.h"
#include "xla_ffi/handlers.h"

namespace ffi = xla::ffi;

namespace {

namespace plan = tmla::plan;

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("tmla_plan: " + message);
}

// Checks the buffers and attributes and fills the planner's parameters.
ffi::Error Decode(int32_t h_kv, int32_t num_tiles, int32_t last_tile_rows,
                  int32_t page_size, int32_t max_seqlen,
                  int64_t partial_fixed_ns, int64_t reduce_fixed_ns,
                  int64_t page_ns_full, int64_t page_ns_last,
                  ffi::Span<const int64_t> input_ns,
                  ffi::Buffer<ffi::S32> lengths,
                  ffi::Result<ffi::Buffer<ffi::S32>> instructions,
                  ffi::Result<ffi::Buffer<ffi::S32>> seqlens,
                  ffi::Result<ffi::Buffer<ffi::S32>> info,
                  ffi::Result<ffi::Buffer<ffi::U8>> scratch,
                  plan::PlannerParams* p, int64_t* scratch_bytes) {
  const auto ld = lengths.dimensions();
  const auto id = instructions->dimensions();
  if (ld.size() != 1 || ld[0] < 1 || id.size() != 3 ||
      id[2] != tmla::isa::kInstructionWords ||
      seqlens->dimensions().size() != 1 || seqlens->dimensions()[0] != ld[0] ||
      info->element_count() != plan::kInfoWords) {
    return Invalid("expected lengths [b], instructions [num_sms, capacity, "
                   "16], seqlens [b], info [8]");
  }
  if (id[0] < 1 || id[0] > plan::kMaxPlannerSms || id[1] < 2) {
    return Invalid("num_sms must be in [1, " +
                   std::to_string(plan::kMaxPlannerSms) +
                   "] and capacity >= 2, got instructions of shape [" +
                   std::to_string(id[0]) + ", " + std::to_string(id[1]) +
                   ", 16]");
  }
  if (h_kv < 1 || num_tiles < 1 || last_tile_rows < 1 ||
      last_tile_rows > tmla::isa::kTileRows || page_size < 1 ||
      max_seqlen < 0 || partial_fixed_ns < 0 || reduce_fixed_ns < 0 ||
      page_ns_full < 1 || page_ns_last < 1 ||
      input_ns.size() != plan::kInputPrices) {
    return Invalid("bad shape or price attributes");
  }
  // Every cost the planner handles fits the int32 cost word: a PARTIAL of
  // max_seqlen tokens, hence every item's and every piece's cost.
  constexpr int64_t kMaxCost = (int64_t{1} << 31) - 1;
  const int64_t max_pages = (int64_t{max_seqlen} + page_size - 1) / page_size;
  if (partial_fixed_ns > kMaxCost || page_ns_full > kMaxCost ||
      page_ns_last > kMaxCost ||
      partial_fixed_ns +
              max_pages * std::max(page_ns_full, page_ns_last) > kMaxCost) {
    return Invalid("a PARTIAL of max_seqlen tokens must cost less than 2^31"
                   " ns");
  }
  const int64_t items = ld[0] * h_kv * num_tiles;
  if (items > (int64_t{1} << 24)) {
    return Invalid("too many work items: " + std::to_string(items));
  }
  *scratch_bytes = plan::PlannerScratchBytes(items, id[0]);
  if (static_cast<int64_t>(scratch->element_count()) < *scratch_bytes) {
    return Invalid("scratch needs " + std::to_string(*scratch_bytes) +
                   " bytes, got " + std::to_string(scratch->element_count()));
  }
  p->lengths = lengths.typed_data();
  p->instructions = instructions->typed_data();
  p->seqlens = seqlens->typed_data();
  p->info = info->typed_data();
  p->scratch = scratch->untyped_data();
  p->batch = static_cast<int32_t>(ld[0]);
  p->h_kv = h_kv;
  p->num_tiles = num_tiles;
  p->last_tile_rows = last_tile_rows;
  p->num_sms = static_cast<int32_t>(id[0]);
  p->capacity = static_cast<int32_t>(id[1]);
  p->page_size = page_size;
  p->max_seqlen = max_seqlen;
  p->partial_fixed_ns = partial_fixed_ns;
  p->reduce_fixed_ns = reduce_fixed_ns;
  p->page_ns_full = page_ns_full;
  p->page_ns_last = page_ns_last;
  for (int r = 0; r < plan::kInputPrices; ++r) p->input_ns[r] = input_ns[r];
  plan::SetDerived(p);
  return ffi::Error::Success();
}

constexpr int kMaxDevices = 64;

// Opt-in shared memory per block of a device, read once.
cudaError_t MaxShared(int32_t device, int* bytes) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  const bool cached = device >= 0 && device < kMaxDevices;
  int value = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    cudaError_t status = cudaDeviceGetAttribute(
        &value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess) return status;
    if (cached) cache[device].store(value, std::memory_order_relaxed);
  }
  *bytes = value;
  return cudaSuccess;
}

ffi::Error PlanCuda(cudaStream_t stream, int32_t device, int32_t h_kv,
                    int32_t num_tiles, int32_t last_tile_rows,
                    int32_t page_size, int32_t max_seqlen,
                    int64_t partial_fixed_ns, int64_t reduce_fixed_ns,
                    int64_t page_ns_full, int64_t page_ns_last,
                    ffi::Span<const int64_t> input_ns,
                    ffi::Buffer<ffi::S32> lengths,
                    ffi::Result<ffi::Buffer<ffi::S32>> instructions,
                    ffi::Result<ffi::Buffer<ffi::S32>> seqlens,
                    ffi::Result<ffi::Buffer<ffi::S32>> info,
                    ffi::Result<ffi::Buffer<ffi::U8>> scratch) {
  plan::PlannerParams p{};
  int64_t bytes = 0;
  ffi::Error error = Decode(
      h_kv, num_tiles, last_tile_rows, page_size, max_seqlen,
      partial_fixed_ns, reduce_fixed_ns, page_ns_full, page_ns_last,
      input_ns, lengths, instructions, seqlens, info, scratch, &p, &bytes);
  if (error.failure()) return error;
  int shared = 0;
  TMLA_CUDA_RETURN_IF_ERROR(MaxShared(device, &shared));
  TMLA_CUDA_RETURN_IF_ERROR(plan::LaunchPlanner(p, bytes, shared, stream));
  return ffi::Error::Success();
}

ffi::Error PlanCpu(int32_t h_kv, int32_t num_tiles, int32_t last_tile_rows,
                   int32_t page_size, int32_t max_seqlen,
                   int64_t partial_fixed_ns, int64_t reduce_fixed_ns,
                   int64_t page_ns_full, int64_t page_ns_last,
                   ffi::Span<const int64_t> input_ns,
                   ffi::Buffer<ffi::S32> lengths,
                   ffi::Result<ffi::Buffer<ffi::S32>> instructions,
                   ffi::Result<ffi::Buffer<ffi::S32>> seqlens,
                   ffi::Result<ffi::Buffer<ffi::S32>> info,
                   ffi::Result<ffi::Buffer<ffi::U8>> scratch) {
  plan::PlannerParams p{};
  int64_t bytes = 0;
  ffi::Error error = Decode(
      h_kv, num_tiles, last_tile_rows, page_size, max_seqlen,
      partial_fixed_ns, reduce_fixed_ns, page_ns_full, page_ns_last,
      input_ns, lengths, instructions, seqlens, info, scratch, &p, &bytes);
  if (error.failure()) return error;
  plan::Ctx one_thread{0, 1};
  plan::Carry carry;
  plan::Plan(one_thread, p, static_cast<char*>(p.scratch), &carry);
  return ffi::Error::Success();
}

// Attributes and buffers shared by both platforms, after the contexts.
template <typename Binding>
auto BindPlan(Binding binding) {
  return std::move(binding).template Attr<int32_t>("h_kv")
      .template Attr<int32_t>("num_tiles")
      .template Attr<int32_t>("last_tile_rows")
      .template Attr<int32_t>("page_size")
      .template Attr<int32_t>("max_seqlen")
      .template Attr<int64_t>("partial_fixed_ns")
      .template Attr<int64_t>("reduce_fixed_ns")
      .template Attr<int64_t>("page_ns_full")
      .template Attr<int64_t>("page_ns_last")
      .template Attr<ffi::Span<const int64_t>>("input_ns")  // [65]
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths: [b]
      .template Ret<ffi::Buffer<ffi::S32>>()   // instructions: [S, cap, 16]
      .template Ret<ffi::Buffer<ffi::S32>>()   // seqlens: [b], clamped
      .template Ret<ffi::Buffer<ffi::S32>>()   // info: [8]
      .template Ret<ffi::Buffer<ffi::U8>>();   // scratch: [bytes]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TmlaPlanCuda, PlanCuda,
    BindPlan(ffi::Ffi::Bind()
                 .Ctx<ffi::PlatformStream<cudaStream_t>>()
                 .Ctx<ffi::DeviceOrdinal>()),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(TmlaPlanCpu, PlanCpu, BindPlan(ffi::Ffi::Bind()));
