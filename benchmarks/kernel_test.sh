#!/usr/bin/env bash
# Builds the stand-alone kernel test (csrc/tests/kernel_test.cu, no JAX) of
# the repository tree at DIR into BINARY:
#   bash benchmarks/kernel_test.sh DIR BINARY
# The one place that says how it is compiled; device_run.sh and compare.sh
# call it. TMLA_KERNEL_DEFINES="NAME=VALUE ..." selects kernel variants
# (csrc/config.h), as it does for the package build.
set -euo pipefail
cd "$1"
defines=()
for d in ${TMLA_KERNEL_DEFINES:-}; do defines+=("-D$d"); done
exec nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
  --expt-relaxed-constexpr -lineinfo -Icsrc "${defines[@]}" \
  csrc/tests/kernel_test.cu csrc/mla_decode.cu -o "$2"
