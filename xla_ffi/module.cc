// nanobind module jax_thundermla._C: the FFI handlers as capsules, for
// jax.ffi.register_ffi_target(..., platform="CUDA").
#include <nanobind/nanobind.h>

#include "csrc/isa.h"
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
    return targets;
  }, "FFI target name -> handler capsule, for platform \"CUDA\".");
  m.def("isa_version", []() { return tmla::isa::kIsaVersion; },
        "Version of the instruction set compiled into the kernels.");
}
