// nanobind module jax_thundermla._C: the FFI handlers as capsules, for
// jax.ffi.register_ffi_target(..., platform="CUDA").
#include <nanobind/nanobind.h>

#include "csrc/isa.h"
#include "csrc/planner.h"
#include "xla_ffi/handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_C, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["tmla_smoke_scale"] = Capsule(TmlaSmokeScale);
    targets["tmla_mla_decode"] = Capsule(TmlaMlaDecode);
    targets["tmla_mla_decode_timed"] = Capsule(TmlaMlaDecodeTimed);
    targets["tmla_plan"] = Capsule(TmlaPlanCuda);
    return targets;
  }, "FFI target name -> handler capsule, for platform \"CUDA\".");
  m.def("cpu_registrations", []() {
    nb::dict targets;
    targets["tmla_plan"] = Capsule(TmlaPlanCpu);
    return targets;
  }, "FFI target name -> handler capsule, for platform \"cpu\".");
  m.def("planner_scratch_bytes", &tmla::plan::PlannerScratchBytes,
        nb::arg("num_items"), nb::arg("num_sms"),
        "Scratch bytes of the planner for these shapes.");
  m.def("planner_constants", []() {
    nb::dict c;
    c["max_sms"] = tmla::plan::kMaxPlannerSms;
    c["input_prices"] = tmla::plan::kInputPrices;
    c["info_words"] = tmla::plan::kInfoWords;
    c["alpha"] = tmla::plan::kAlpha;
    return c;
  }, "Constants of the planner that its Python wrapper relies on.");
  m.def("isa_version", []() { return tmla::isa::kIsaVersion; },
        "Version of the instruction set compiled into the kernels.");
}
