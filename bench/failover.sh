#!/usr/bin/env bash
# How long a run stands still when one rank of its group is killed: a coordinator with the
# default settings (heartbeats every 5 s, lost after 30 s, --stream-grace 3 s), two 2-rank groups
# under mpirun (one trains, one stands by), and per trial a run that has committed a checkpoint,
# then `kill -9` of its rank 0, its rank 1, or its mpirun (the ranks die with it). Each trial prints, in seconds after the kill: the run
# declared FAILED (detection), placed on the standby group (STARTING, attempt 2), and training
# there (RUNNING: the coordinator heard the new attempt's first step); the steps redone; and the
# reason the coordinator gave. A new group replaces the killed one before the next trial.
#   MODEL: tiny (tests/tiny.yaml) or paper (the CIFAR-10 UNet of configs/cifar10.yaml, 35.7M
#   parameters, on the built-in shapes at 32x32, batch 2: its checkpoint is what is loaded).
# DDPM_FAILOVER_COORDINATOR and DDPM_FAILOVER_WORKER name other ddpm_coordinator and ddpm_worker
# binaries (an older build, to compare); DDPM_FAILOVER_FLAGS adds coordinator flags.
# usage: bench/failover.sh [tiny|paper] [TRIALS per kind of kill (2)]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tiny}
trials=${2:-2}
build_dir=${DDPM_BUILD_DIR:-build}
bash scripts/build.sh > /dev/null
mpiexec=$(command -v mpiexec)
coordinator=${DDPM_FAILOVER_COORDINATOR:-$build_dir/coordinator/ddpm_coordinator}
worker=${DDPM_FAILOVER_WORKER:-$build_dir/worker/ddpm_worker}
ctl=$build_dir/tools/ddpmctl
name=failover
heartbeat_interval=5 heartbeat_timeout=30 coordinator_flags=${DDPM_FAILOVER_FLAGS:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# shellcheck source=tests/service_lib.sh
source tests/service_lib.sh

case $model in
  tiny)
    sed -e 's/steps: 30,/steps: 100000,/' -e 's/checkpoint_every: 20/checkpoint_every: 5/' \
      -e 's/log_every: 10/log_every: 5/' "$work/tiny.yaml" > "$work/run.yaml"
    every=5
    ;;
  paper)
    python3 - configs/cifar10.yaml "$work/run.yaml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
model = re.search(r"^model:\n(?:  .*\n)+", text, re.M).group(0)
open(sys.argv[2], "w").write(model + """train: {steps: 100000, batch_size: 4, lr: 0.0002, warmup_steps: 10, log_every: 1,
        checkpoint_every: 2, threads: 1, device: cpu}
data: {dataset: shapes, shapes_size: 64}
sample: {sampler: ddim, steps: 2, num_images: 4}
dist: {timeout_seconds: 600}
""")
PY
    every=2
    ;;
  *) fail "MODEL is tiny or paper, not $model" ;;
esac

start_coordinator
declare -A group_pids
next_group=0
add_group() {
  local id=g$next_group
  next_group=$((next_group + 1))
  start_group "$id.log" --group-id "$id"
  group_pids[$id]=$group_pid
}
add_group
add_group
say "$coordinator at $address ${DDPM_FAILOVER_FLAGS:-}, $worker; model $model; 2 groups of 2 ranks"

now_ms() { date +%s%3N; }
checkpoint_at_least() { [ "$(field "$1" 'int(r.get("latest_checkpoint", {}).get("step", 0))')" -ge "$2" ]; }
attempt_running() { [ "$(field "$1" 'r["placement"]["attempt"]')" = 2 ] && state_is "$1" RUNNING; }

for kill_rank in 0 1 mpirun; do
  for trial in $(seq 1 "$trials"); do
    run=$(ctl start "$work/run.yaml" --name "k${kill_rank}t$trial" --max-restarts 3 --json |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])')
    group_pid=
    wait_for 600 "$run RUNNING" state_is "$run" RUNNING
    wait_for 600 "a checkpoint of $run" checkpoint_at_least "$run" "$every"
    holder=$(field "$run" 'r["placement"]["group_id"]')
    mapfile -t ranks < <(pgrep -P "${group_pids[$holder]}" -f ddpm_worker | sort -n)
    [ "${#ranks[@]}" = 2 ] || fail "group $holder has ${#ranks[@]} ranks"
    # Which pid is which rank: the one whose environment says so.
    victim=
    for pid in "${ranks[@]}"; do
      if tr '\0' '\n' < "/proc/$pid/environ" | grep -qx "OMPI_COMM_WORLD_RANK=$kill_rank"; then victim=$pid; fi
    done
    [ "$kill_rank" = mpirun ] && victim=${group_pids[$holder]}
    [ -n "$victim" ] || fail "no rank $kill_rank in group $holder"
    step_before=$(field "$run" 'int(r.get("metrics", {}).get("step", 0))')
    killed_ms=$(now_ms)
    kill -KILL "$victim"
    wait_for 600 "attempt 2 of $run training" attempt_running "$run"
    seen_ms=$(now_ms)
    ctl get "$run" --json > "$work/$run.json"
    python3 - "$work/$run.json" "$killed_ms" "$seen_ms" "$kill_rank" "$model" <<'PY' | tee -a "$work/results"
import json, sys
run = json.load(open(sys.argv[1]))
killed, seen, rank, model = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
moments = {}
reason = ""
for t in run["transitions"]:
    at = int(t["at_unix_ms"])
    if at < killed:
        continue
    moments.setdefault(t["to"], at)
    if t["to"] == "FAILED" and not reason:
        reason = t["reason"]
def after(state):
    return "%.1f" % ((moments[state] - killed) / 1000) if state in moments else "-"
print(f"{model} kill -9 {'mpirun' if rank == 'mpirun' else 'rank ' + rank}: failed {after('FAILED')} s, placed {after('STARTING')} s, "
      f"training {after('RUNNING')} s (seen {(seen - killed) / 1000:.1f} s); reason: {reason}")
PY
    # The killed group's mpirun ends with its rank; a new group stands by in its place.
    for _ in $(seq 1 100); do kill -0 "${group_pids[$holder]}" 2> /dev/null || break; sleep 0.1; done
    unset "group_pids[$holder]"
    add_group
    ctl stop "$run" --now > /dev/null
    wait_for 120 "$run stopped" state_is "$run" STOPPED
  done
done
python3 - "$work/results" <<'PY'
import re, sys
rows = open(sys.argv[1]).read().splitlines()
for who in ("rank 0", "rank 1", "mpirun"):
    got = [float(re.search(r"training ([0-9.]+) s", r).group(1)) for r in rows if f"kill -9 {who}:" in r and re.search(r"training ([0-9.]+) s", r)]
    if got:
        print(f"kill -9 {who}: training again after {min(got):.1f}-{max(got):.1f} s (mean {sum(got) / len(got):.1f} s) over {len(got)} kills")
PY
