// Every FFI handler of the extension, declared for module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

// y = x * scale; fp32. Proves build, registration and launch end to end.
XLA_FFI_DECLARE_HANDLER_SYMBOL(TmlaSmokeScale);

// Paged MLA decode: the persistent megakernel over an instruction tensor.
XLA_FFI_DECLARE_HANDLER_SYMBOL(TmlaMlaDecode);

// The same with per-instruction timestamps in an extra output.
XLA_FFI_DECLARE_HANDLER_SYMBOL(TmlaMlaDecodeTimed);

// The planner (csrc/planner.h): lengths to an instruction tensor, on the
// GPU (one CTA on XLA's stream) and on the CPU (the same code, one thread).
XLA_FFI_DECLARE_HANDLER_SYMBOL(TmlaPlanCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(TmlaPlanCpu);
