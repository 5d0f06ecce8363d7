#!/usr/bin/env bash
# Runs a built kernel test under each named compute-sanitizer tool, each
# tool's log at LOG_PREFIX$tool.log, one line per tool:
#   bash benchmarks/sanitize.sh BINARY LOG_PREFIX TOOL [TOOL...]
# $SANITIZE_ARGS, when set, are the binary's arguments (e.g. a kernel test
# case prefix).
# Exits with the first failing tool's status (0 when all found nothing).
# The one place that says how the sanitizers run; device_run.sh and
# compare.sh call it.
set -uo pipefail
bin=$1 prefix=$2
shift 2
status=0
for tool in "$@"; do
  # shellcheck disable=SC2086
  timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 3 "$bin" \
    ${SANITIZE_ARGS:-} \
    >"$prefix$tool.log" 2>&1
  code=$?
  echo "$tool: exit $code, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' \
    "$prefix$tool.log" | tail -n 1)"
  [ "$code" = 0 ] || [ "$status" != 0 ] || status=$code
done
exit "$status"
