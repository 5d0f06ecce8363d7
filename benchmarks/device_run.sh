#!/usr/bin/env bash
# One call on a GPU machine: build, GPU tests, benchmarks, a short table.
#   bash benchmarks/device_run.sh [--tests=PYTEST_ARGS|none] [--bench=ARGS|none]
#                                 [--sanitize]
# Logs go to $OUT (or ./device_out) as build.log, tests.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
mkdir -p "$out"
tests="tests"
bench=""
sanitize=0
for arg in "$@"; do
  case "$arg" in
    --tests=*) tests="${arg#--tests=}" ;;
    --bench=*) bench="${arg#--bench=}" ;;
    --sanitize) sanitize=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; exit 1
fi
echo "build: ok in $(( $(date +%s) - start )) s"

status=0
if [ "$tests" != "none" ]; then
  # shellcheck disable=SC2086
  python3 -m pytest -q -rs $tests 2>&1 | tee "$out/tests.log" | tail -n 25
  status=${PIPESTATUS[0]}
fi
if [ "$sanitize" = 1 ]; then
  # The stand-alone kernel test (no JAX) under each compute-sanitizer tool.
  nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
    --expt-relaxed-constexpr -lineinfo -Icsrc csrc/tests/kernel_test.cu \
    csrc/mla_decode.cu -o /tmp/tmla_kernel_test >"$out/kernel_test_build.log" 2>&1 \
    || { tail -n 20 "$out/kernel_test_build.log"; exit 1; }
  /tmp/tmla_kernel_test | tail -n 1
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 /tmp/tmla_kernel_test \
      >"$out/sanitize_$tool.log" 2>&1
    code=$?
    echo "compute-sanitizer $tool: exit $code;" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize_$tool.log" \
         | tail -n 1); $(tail -n 1 "$out/sanitize_$tool.log")"
    [ "$code" = 0 ] || status=$code
  done
fi
if [ "$bench" != "none" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/run.py $bench 2>&1 | grep -v "Unable to initialize" \
    | tee "$out/bench.log"
fi
exit "$status"
