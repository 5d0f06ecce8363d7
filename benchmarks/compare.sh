#!/usr/bin/env bash
# Times several versions of this repository on the same GPU in one call,
# with the SM clock and power logged during each timed run.
#   bash benchmarks/compare.sh [--check|--sanitize] [--timeline=W1,W3] \
#     DIR [DIR...] -- [benchmarks/run.py flags...]
# Each DIR is a copy of some version of the repository (for example
# `git archive OLD | tar -x -C DIR`; `.` is this tree), optionally with
# kernel variants: `DIR::NAME=VALUE[,NAME=VALUE...]` builds a copy of DIR
# with TMLA_KERNEL_DEFINES set (csrc/config.h lists them). Each is installed
# apart (pip --target) and timed with its own benchmarks/run.py, in the
# order given. --check first runs each version's stand-alone kernel test
# (csrc/tests/kernel_test.cu) and compute-sanitizer memcheck on it;
# --sanitize also racecheck and synccheck; a version that fails them is
# not timed. --timeline prints each version's
# timed-kernel summary (benchmarks/timeline.py) for the named workloads.
# The logs go to one archive, $OUT/compare_logs.tar.gz (or under
# ./device_out). With COMPARE_SITES=DIR set, version i is installed in
# DIR/i and stays there for later scripts of the same call.
set -uo pipefail
cd "$(dirname "$0")/.."
check=0
tools="memcheck"
timelines=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1; shift ;;
    --sanitize) check=1; tools="memcheck racecheck synccheck"; shift ;;
    --timeline=*) timelines="${1#--timeline=}"; shift ;;
    *) break ;;
  esac
done
dirs=()
defines=()  # per version: its TMLA_KERNEL_DEFINES
copies=$(mktemp -d)  # the copies of trees built with kernel variants
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  dir=${1%%::*}
  dir=$(cd "$dir" && pwd) || exit 2
  variant=""
  if [ "$1" != "${1#*::}" ]; then
    variant=${1#*::}
    variant=${variant//,/ }
    copy="$copies/${#dirs[@]}"
    mkdir -p "$copy"
    tar -C "$dir" --exclude=./build --exclude=./.git --exclude=./device_out \
      -cf - . | tar -C "$copy" -xf - || exit 2
    dir=$copy
  fi
  dirs+=("$dir")
  defines+=("$variant")
  shift
done
[ $# -gt 0 ] && shift
[ ${#dirs[@]} -gt 0 ] || { echo "no version to compare" >&2; exit 2; }
out="${OUT:-device_out}"
mkdir -p "$out"
logs=$(mktemp -d)
bins=$(mktemp -d)  # kernel test binaries, kept out of the archive
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# Runs "$@" while sampling the SM clock and power; prints their range.
with_clock() {
  local log="$logs/smi_$1.csv"
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

# The kernel test of version $1 (index) passes, and each sanitizer tool of
# $tools finds nothing.
kernel_checks() {
  local i=$1 bin="$bins/kernel_test_$1"
  [ -x "$bin" ] || { echo "kernel test did not build"; tail -n 20 \
    "$logs/kernel_test_build_$i.log"; return 1; }
  timeout 120 "$bin" >"$logs/kernel_test_$i.log" 2>&1
  local status=$?
  echo "kernel test: exit $status, $(tail -n 1 "$logs/kernel_test_$i.log")"
  [ "$status" = 0 ] || { grep -v " ok$" "$logs/kernel_test_$i.log" | head; return 1; }
  # shellcheck disable=SC2086
  bash benchmarks/sanitize.sh "$bin" "$logs/${i}_" $tools
}

nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
# Every version builds at once (one compiler process each), then each is
# checked and timed alone.
sites_root="${COMPARE_SITES:-$(mktemp -d)}"
sites=()
builds=()
for i in "${!dirs[@]}"; do
  sites+=("$sites_root/$i")
  rm -rf "${sites[$i]}" && mkdir -p "${sites[$i]}"
  TMLA_KERNEL_DEFINES="${defines[$i]}" timeout 600 python3 -m pip install \
    --no-build-isolation --no-deps --target "${sites[$i]}" "${dirs[$i]}" \
    >"$logs/build_$i.log" 2>&1 &
  builds+=($!)
  if [ "$check" = 1 ]; then
    TMLA_KERNEL_DEFINES="${defines[$i]}" timeout 600 \
      bash benchmarks/kernel_test.sh "${dirs[$i]}" \
      "$bins/kernel_test_$i" >"$logs/kernel_test_build_$i.log" 2>&1 &
    builds+=($!)
  fi
done
for pid in "${builds[@]}"; do wait "$pid"; done
for i in "${!dirs[@]}"; do
  dir=${dirs[$i]}
  echo "== $i: $dir${defines[$i]:+ (${defines[$i]})}"
  if ! ls "${sites[$i]}"/jax_thundermla/_C*.so >/dev/null 2>&1; then
    tail -n 30 "$logs/build_$i.log"; continue
  fi
  if [ "$check" = 1 ] && ! kernel_checks "$i"; then
    echo "not timed: the kernel checks failed"; continue
  fi
  (cd "$dir" && with_clock "$i" env PYTHONPATH="${sites[$i]}" \
    python3 benchmarks/run.py "$@" 2>&1 | grep -v "Unable to initialize" \
    | tee "$logs/bench_$i.log")
  for w in ${timelines//,/ }; do
    (cd "$dir" && env PYTHONPATH="${sites[$i]}" timeout 300 \
      python3 benchmarks/timeline.py --workload="$w" \
      --out="$logs/timeline_$i" 2>&1 | grep -v "Unable to initialize" \
      | grep -v "font_manager")
  done
done
tar -czf "$out/compare_logs.tar.gz" -C "$logs" .
echo "logs: $out/compare_logs.tar.gz"
