#!/usr/bin/env bash
# Times several versions of this repository on the same GPU in one call,
# with the SM clock and power logged during each timed run.
#   bash benchmarks/compare.sh DIR [DIR...] -- [benchmarks/run.py flags...]
# Each DIR is a copy of some version of the repository (for example
# `git archive OLD | tar -x -C DIR`; `.` is this tree). Each is installed
# apart (pip --target) and timed with its own benchmarks/run.py, in the
# order given. Logs go to $OUT (or ./device_out).
set -uo pipefail
cd "$(dirname "$0")/.."
dirs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  dirs+=("$(cd "$1" && pwd)") || exit 2
  shift
done
[ $# -gt 0 ] && shift
out="${OUT:-device_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# Runs "$@" while sampling the SM clock and power; prints their range.
with_clock() {
  local log="$out/smi_$1.csv"
  shift
  nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits \
    -lms 100 >"$log" 2>/dev/null &
  local smi=$!
  "$@"
  local status=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  awk -F', ' '$1 > 1000 { n++; c += $1; p += $2;
      if (!lo || $1 < lo) lo = $1; if ($1 > hi) hi = $1 }
    END { if (n) printf "SM clock %d-%d MHz (mean %d), power mean %.0f W over %d samples\n",
      lo, hi, c / n, p / n, n }' "$log"
  return "$status"
}

nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
# Every version builds at once (one compiler process each), then each is
# timed alone.
sites=()
for i in "${!dirs[@]}"; do
  sites+=("$(mktemp -d)")
  python3 -m pip install --no-build-isolation --no-deps --target "${sites[$i]}" \
    "${dirs[$i]}" >"$out/build_$i.log" 2>&1 &
done
wait
for i in "${!dirs[@]}"; do
  dir=${dirs[$i]}
  echo "== $i: $dir"
  if ! ls "${sites[$i]}"/jax_thundermla/_C*.so >/dev/null 2>&1; then
    tail -n 30 "$out/build_$i.log"; continue
  fi
  (cd "$dir" && with_clock "$i" env PYTHONPATH="${sites[$i]}" \
    python3 benchmarks/run.py "$@" 2>&1 | grep -v "Unable to initialize" \
    | tee "$out/bench_$i.log")
done
