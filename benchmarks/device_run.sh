#!/usr/bin/env bash
# One call on a GPU machine: build, GPU tests, benchmarks, a short table.
#   bash benchmarks/device_run.sh [--tests=PYTEST_ARGS|gpu-quick|none]
#                                 [--bench=ARGS|none] [--stress=ARGS|none]
#                                 [--sanitize]
# --tests=gpu-quick runs the tests marked `quick` (every kernel feature, about
# a minute on an H100); --stress=ARGS runs benchmarks/stress.py with ARGS
# (e.g. --stress=--count=1000). TMLA_KERNEL_DEFINES in the environment builds
# kernel variants (csrc/config.h). Logs go to $OUT (or ./device_out) as
# build.log, tests.log, tests.xml, stress.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
mkdir -p "$out"
tests="tests"
bench=""
stress="none"
sanitize=0
for arg in "$@"; do
  case "$arg" in
    --tests=*) tests="${arg#--tests=}" ;;
    --bench=*) bench="${arg#--bench=}" ;;
    --stress=*) stress="${arg#--stress=}" ;;
    --sanitize) sanitize=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
[ -n "${TMLA_KERNEL_DEFINES:-}" ] && echo "kernel variants: $TMLA_KERNEL_DEFINES"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; exit 1
fi
echo "build: ok in $(( $(date +%s) - start )) s"

status=0
[ "$tests" = "gpu-quick" ] && tests="-m quick tests"
if [ "$tests" != "none" ]; then
  t0=$(date +%s)
  rm -f "$out/tests.xml"
  # shellcheck disable=SC2086
  python3 -m pytest -q -rfEs --junitxml="$out/tests.xml" $tests \
    >"$out/tests.log" 2>&1
  status=$?
  [ -s "$out/tests.xml" ] || tail -n 25 "$out/tests.log"
  [ -s "$out/tests.xml" ] && python3 - "$out/tests.xml" "$(( $(date +%s) - t0 ))" <<'PY'
import sys
import xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
failed = [c for c in cases if c.find("failure") is not None
          or c.find("error") is not None]
skipped = [c for c in cases if c.find("skipped") is not None]
seconds = sum(float(c.get("time", 0)) for c in cases)
print("| tests | passed | failed | skipped | in tests, s | wall, s |")
print("|---:|---:|---:|---:|---:|---:|")
print(f"| {len(cases)} | {len(cases) - len(failed) - len(skipped)} |"
      f" {len(failed)} | {len(skipped)} | {seconds:.0f} | {sys.argv[2]} |")
for c in failed:
  print(f"FAILED {c.get('classname')}::{c.get('name')}")
PY
fi
if [ "$sanitize" = 1 ]; then
  # The stand-alone kernel test (no JAX) under each compute-sanitizer tool.
  bash benchmarks/kernel_test.sh . /tmp/tmla_kernel_test \
    >"$out/kernel_test_build.log" 2>&1 \
    || { tail -n 20 "$out/kernel_test_build.log"; exit 1; }
  /tmp/tmla_kernel_test | tail -n 1
  bash benchmarks/sanitize.sh /tmp/tmla_kernel_test "$out/sanitize_" \
    memcheck racecheck synccheck
  code=$?
  [ "$code" = 0 ] || status=$code
fi
if [ "$stress" != "none" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/stress.py $stress >"$out/stress.log" 2>&1
  code=$?
  grep -E "^(device|MISMATCH|workloads)" "$out/stress.log" | head -n 20
  [ "$code" = 0 ] || status=$code
fi
if [ "$bench" != "none" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/run.py $bench 2>&1 | grep -v "Unable to initialize" \
    | tee "$out/bench.log"
fi
exit "$status"
