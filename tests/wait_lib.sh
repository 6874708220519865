# shellcheck shell=bash
# wait_until SECONDS DESCRIPTION COMMAND...: runs COMMAND four times a second until it succeeds;
# after SECONDS, calls the sourcing script's fail with DESCRIPTION.
wait_until() {
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq 1 $((seconds * 4))); do
    if "$@" > /dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  fail "$what (after ${seconds}s)"
}
