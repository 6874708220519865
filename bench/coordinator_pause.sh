#!/usr/bin/env bash
# Whether a coordinator that answers slowly, or not at all, slows training: a 2-rank group
# trains the shell tests' small UNet (tests/tiny.yaml, endless, a checkpoint every 20 steps and
# a log line every 10) while the coordinator runs for PHASE seconds, is stopped with SIGSTOP for
# PHASE seconds (heartbeats, checkpoint reports and the command stream all hang), then runs
# again for PHASE seconds. Each phase prints the steps trained and the mean step time, from the
# run's progress file (RUN_DIR/ranks/rank-0) sampled every 10 ms; the ratio of the stopped
# phase to the first is the cost of an unreachable coordinator.
# usage: bench/coordinator_pause.sh [PHASE seconds (20)]
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:-20}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
mpiexec=$(command -v mpiexec)
coordinator=$build_dir/coordinator/ddpm_coordinator
worker=$build_dir/worker/ddpm_worker
ctl=$build_dir/tools/ddpmctl
name=coordinator-pause
heartbeat_interval=1 heartbeat_timeout=600
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# shellcheck source=tests/service_lib.sh
source tests/service_lib.sh
start_coordinator
start_group group.log
run=$(ctl start "$work/endless.yaml" --name pause --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])')
wait_for 60 "$run RUNNING" state_is "$run" RUNNING
progress=$data/runs/$run/ranks/rank-0
# Steps finished by the end of a phase: the progress file holds 2 x step (+1 inside a step).
sample() {  # SECONDS: prints "steps seconds" trained over that long
  python3 - "$progress" "$1" <<'PY'
import sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
def step():
    try:
        return int(open(path).read().strip() or 0) // 2
    except (OSError, ValueError):
        return None
first = None
start = time.monotonic()
while first is None:
    first = step()
while time.monotonic() - start < seconds:
    time.sleep(0.01)
last = step()
print(last - first, time.monotonic() - start)
PY
}
report() {  # NAME STEPS SECONDS
  python3 -c "import sys; n, s = int(sys.argv[2]), float(sys.argv[3]); print(f'{sys.argv[1]:<34} {n:6d} steps in {s:5.1f} s: {1000 * s / max(n, 1):7.2f} ms a step')" "$@"
}
sleep 5  # Past the first steps' warm-up.
read -r before_steps before_seconds < <(sample "$phase")
kill -STOP "$coordinator_pid"
read -r stopped_steps stopped_seconds < <(sample "$phase")
kill -CONT "$coordinator_pid"
read -r after_steps after_seconds < <(sample "$phase")
report "coordinator running" "$before_steps" "$before_seconds"
report "coordinator stopped (SIGSTOP)" "$stopped_steps" "$stopped_seconds"
report "coordinator running again" "$after_steps" "$after_seconds"
python3 -c "import sys; b = float(sys.argv[2]) / max(int(sys.argv[1]), 1); s = float(sys.argv[4]) / max(int(sys.argv[3]), 1); print(f'step time stopped / running: {s / b:.3f}')" \
  "$before_steps" "$before_seconds" "$stopped_steps" "$stopped_seconds"
state_is "$run" RUNNING || fail "$run is $(field "$run" 'r["state"]') after the coordinator came back"
ctl stop "$run" --now > /dev/null
