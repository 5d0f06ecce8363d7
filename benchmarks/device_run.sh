#!/usr/bin/env bash
# One call on a GPU machine: build, GPU tests, benchmarks, a short table.
#   bash benchmarks/device_run.sh [--tests=PYTEST_ARGS|none] [--bench=ARGS|none]
# Logs go to $OUT (or ./device_out) as build.log, tests.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
mkdir -p "$out"
tests="tests"
bench=""
for arg in "$@"; do
  case "$arg" in
    --tests=*) tests="${arg#--tests=}" ;;
    --bench=*) bench="${arg#--bench=}" ;;
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
if [ "$bench" != "none" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/run.py $bench 2>&1 | grep -v "Unable to initialize" \
    | tee "$out/bench.log"
fi
exit "$status"
