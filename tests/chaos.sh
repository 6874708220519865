#!/usr/bin/env bash
# The chaos suite: the whole service on loopback (a coordinator, 2-rank worker groups under
# mpirun, ddpmctl), and what a supervisor sees in production.
#   1. DDPM_CHAOS_TRIALS (20) runs, each killed with SIGKILL once at a random moment: a random
#      rank, mpirun, or the coordinator. The supervisor (this script) restarts what died. Each run
#      must complete; a resume must load a valid checkpoint and redo at most one checkpoint
#      interval; the registry must hold every run once; and the final EMA weights must equal an
#      uninterrupted run's bit for bit (same world size, same threads: resume is exact).
#   2. A partition: a group paused (SIGSTOP: no heartbeats, as a paused VM) loses its run to a
#      second group, then wakes up. Nothing it writes may become the run's `latest`.
#   3. A full disk (a small tmpfs, or DDPM_FAULT_DISK_FULL where mounting is not allowed) during
#      checkpoints: training goes on, and every checkpoint left loads.
#   4. A NaN injected on one rank with train.on_divergence: rollback: the run completes, and the
#      rollback is counted, shown by ddpmctl get and exported in /metrics.
# The moments of the kills come from DDPM_CHAOS_SEED (printed; a new one each run unless set).
# It ends with one summary line of figures.
# usage: chaos.sh MPIEXEC DDPM_COORDINATOR DDPM_WORKER DDPMCTL DDPM_EXPORT
set -euo pipefail
mpiexec=$1 coordinator=$2 worker=$3 ctl=$4 export_tool=$5
name=chaos
heartbeat_interval=0.5 heartbeat_timeout=5
# shellcheck source=tests/service_lib.sh
source "$(dirname "$0")/service_lib.sh"
# Any command that fails where nothing expects it names itself, rather than ending the suite
# without a word.
set -E
trap 'fail "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

trials=${DDPM_CHAOS_TRIALS:-20}
seed=${DDPM_CHAOS_SEED:-$(($(date +%s%N) / 1000 % 32768))}
RANDOM=$seed
say "seed $seed (DDPM_CHAOS_SEED=$seed repeats these kill moments); $trials trials"

steps=60 every=5
sed -e "s/steps: 30,/steps: $steps,/" -e "s/log_every: 10/log_every: $every/" \
  -e "s/checkpoint_every: 20/checkpoint_every: $every/" "$work/tiny.yaml" > "$work/chaos.yaml"

# The step every rank has finished, from the run's progress files (2 x step, +1 inside a step).
finished_step() {  # RUN_DIR
  local lowest=-1 value
  for f in "$1"/ranks/rank-0 "$1"/ranks/rank-1; do
    value=$(tr -d ' \n' < "$f" 2> /dev/null || echo 0)
    [ -n "$value" ] || value=0
    value=$((value / 2))
    if [ "$lowest" -lt 0 ] || [ "$value" -lt "$lowest" ]; then lowest=$value; fi
  done
  echo "$lowest"
}
wait_until_step() {  # RUN_DIR STEP: polls every 20 ms
  for _ in $(seq 1 3000); do
    [ "$(finished_step "$1")" -ge "$2" ] && return
    sleep 0.02
  done
  fail "timed out waiting for step $2 in $1"
}
start_run() {  # NAME CONFIG: prints the run's id
  ctl start "$2" --name "$1" --max-restarts 3 --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])'
}
ranks_of() { pgrep -P "$1" -f ddpm_worker || true; }  # the ranks of the mpirun with pid $1
wait_gone() {  # PID...: waits until a killed mpirun and its ranks (their pids, taken before) end
  local pid alive
  for _ in $(seq 1 300); do
    alive=0
    for pid in "$@"; do
      if kill -0 "$pid" 2> /dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; then alive=1; fi
    done
    [ "$alive" = 1 ] || return 0
    sleep 0.05
  done
  fail "mpirun or a rank outlived the kill: $*"
}
manifest_attempt() {  # STEP_DIR
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1] + "/manifest.json")).get("attempt", 0))' "$1"
}

start_coordinator
coordinator_starts=1
start_group group0.log
group_log=group0.log
say "coordinator at $address; a 2-rank group; $steps steps, a checkpoint every $every"

say "1. the uninterrupted run"
reference=$(start_run reference "$work/chaos.yaml")
wait_for 120 "$reference COMPLETED" state_is "$reference" COMPLETED
reference_ema=$(field "$reference" 'r["ema_weights"]')
[ -s "$reference_ema" ] || fail "the reference run exported no EMA weights"

kills_rank=0 kills_mpirun=0 kills_coordinator=0 resumes=0 redone=0 max_redone=0 equal=0
runs=("$reference")
for trial in $(seq 1 "$trials"); do
  kinds=(rank mpirun coordinator)
  kind=${kinds[$((RANDOM % 3))]}
  # A moment well before the end: the run must still be training when the kill lands.
  at=$((2 + RANDOM % (steps - 10)))
  pause=$((RANDOM % 50))
  run=$(start_run "trial$trial" "$work/chaos.yaml")
  runs+=("$run")
  run_dir=$data/runs/$run  # the coordinator's default --runs-dir
  wait_until_step "$run_dir" "$at"
  mapfile -t ranks < <(ranks_of "$group_pid")
  [ "${#ranks[@]}" = 2 ] || fail "trial $trial: the group has ${#ranks[@]} ranks, not 2"
  sleep "0.$(printf '%03d' "$pause")"
  case $kind in
    rank)
      kill -KILL "${ranks[$((RANDOM % 2))]}" || fail "trial $trial: the rank had already exited"
      kills_rank=$((kills_rank + 1))
      ;;
    mpirun)
      kill -KILL "$group_pid" || fail "trial $trial: mpirun had already exited"
      kills_mpirun=$((kills_mpirun + 1))
      ;;
    coordinator)
      kill -KILL "$coordinator_pid" || fail "trial $trial: the coordinator had already exited"
      kills_coordinator=$((kills_coordinator + 1))
      ;;
  esac
  if [ "$kind" = coordinator ]; then
    # The group trains on; the supervisor brings the coordinator back on the same address.
    killed_at=$(finished_step "$run_dir")
    coordinator_starts=$((coordinator_starts + 1))
    start_coordinator "$address" "$coordinator_starts"
    wait_for 120 "$run COMPLETED" state_is "$run" COMPLETED
    [ "$(field "$run" 'r.get("restarts", 0)')" = 0 ] || fail "trial $trial: a coordinator kill restarted $run"
    say "trial $trial: SIGKILL of the coordinator at step $killed_at: the group carried on, nothing redone"
  else
    # Not ended: STARTING until the coordinator hears the first step, then RUNNING; or already
    # QUEUED again, when a surviving rank named its killed peer before this looked.
    state=$(field "$run" 'r["state"]')
    [ "$state" = RUNNING ] || [ "$state" = STARTING ] || [ "$state" = QUEUED ] ||
      fail "trial $trial: $run was $state when the kill after step $at landed"
    wait_gone "$group_pid" "${ranks[@]}"
    # What the kill left: the step every rank had finished, and a checkpoint still being written.
    killed_at=$(finished_step "$run_dir")
    # (No checkpoints folder yet when the kill came before the first checkpoint.)
    in_flight=$( (find "$run_dir/checkpoints" -maxdepth 1 -name 'step_*.tmp' 2> /dev/null || true) |
      sed 's/.*step_0*\([0-9][0-9]*\)\.tmp/\1/' | sort -n | tail -1)
    start_group "group$trial.log"
    group_log=group$trial.log
    wait_for 120 "$run COMPLETED" state_is "$run" COMPLETED
    [ "$(field "$run" 'r.get("restarts", 0)')" = 1 ] || fail "trial $trial: $run restarted $(field "$run" 'r.get("restarts", 0)') times"
    resumed=$( (grep -o "resumed from [^ ]*/$run/checkpoints/step_[0-9]* at step [0-9]*" \
      "$work/group$trial.log" || true) | awk '{print $NF}' | head -1)
    if [ -z "$resumed" ]; then
      grep -q "$run: .*starts over: no checkpoint had committed" "$work/coordinator.log" ||
        fail "trial $trial: the new group neither resumed $run nor started it over"
      resumed=0
    fi
    # One interval at most: from the newest checkpoint that could have committed before the kill
    # (an interval back when one was still being written).
    newest=$((killed_at / every * every))
    if [ -n "$in_flight" ] && [ "$in_flight" -le "$newest" ]; then newest=$in_flight; fi
    bound=$((newest - every))
    [ "$bound" -ge 0 ] || bound=0
    [ "$resumed" -ge "$bound" ] ||
      fail "trial $trial: killed after step $killed_at (in flight: ${in_flight:-none}) but resumed from step $resumed"
    lost=$((killed_at - resumed))
    [ "$lost" -ge 0 ] || lost=0
    redone=$((redone + lost))
    [ "$lost" -le "$max_redone" ] || max_redone=$lost
    resumes=$((resumes + 1))
    say "trial $trial: SIGKILL of a $kind at step $killed_at (aimed after $at): resumed from step $resumed (${in_flight:+step $in_flight was being written; }$lost steps redone)"
  fi
  ema=$(field "$run" 'r["ema_weights"]')
  cmp -s "$reference_ema" "$ema" || fail "trial $trial ($kind at step $at): the EMA weights differ from the uninterrupted run's"
  equal=$((equal + 1))
done

# The registry holds every run once, each COMPLETED.
ctl list --json > "$work/list.json"
python3 - "$work/list.json" "${runs[@]}" <<'PY' || fail "the registry lost or duplicated runs"
import json, sys
listed = [r["id"] for r in json.load(open(sys.argv[1]))["runs"]]
expected = sys.argv[2:]
assert sorted(listed) == sorted(expected), (listed, expected)
PY
for run in "${runs[@]}"; do state_is "$run" COMPLETED || fail "$run is $(field "$run" 'r["state"]')"; done
corrupt=$(cat "$work"/group*.log | grep -c "refusing checkpoint" || true)
[ "$corrupt" = 0 ] || fail "$corrupt checkpoint loads were refused as damaged"

say "2. a paused group (no heartbeats) loses its run; woken up, nothing it writes becomes latest"
group_a=$group_pid group_a_log=$group_log
sed -e "s/steps: $steps,/steps: 100000,/" "$work/chaos.yaml" > "$work/partition.yaml"
run=$(start_run partition "$work/partition.yaml")
runs+=("$run")
wait_for 60 "$run RUNNING" state_is "$run" RUNNING
run_dir=$(field "$run" 'r["run_dir"]')
# (Older checkpoints are pruned as newer ones commit: ask `latest`, not a given step.)
latest_at_least() {  # RUN_DIR STEP
  local name
  name=$(cat "$1/checkpoints/latest" 2> /dev/null) || return 1
  [ "$((10#${name#step_}))" -ge "$2" ]
}
wait_for 60 "a checkpoint of $run" latest_at_least "$run_dir" 10
mapfile -t paused < <(ranks_of "$group_a")
kill -STOP "${paused[@]}"
start_group group_b.log
group_b=$group_pid
attempt_is_running() { [ "$(field "$1" 'r["placement"]["attempt"]')" = "$2" ] && state_is "$1" RUNNING; }
wait_for 60 "attempt 2 of $run" attempt_is_running "$run" 2
began=$(grep -o 'attempt 2 began [0-9]*' "$run_dir/ATTEMPT" | awk '{print $NF}' || true)
wait_for 60 "attempt 2's first checkpoint" python3 -c "
import json, sys
latest = open('$run_dir/checkpoints/latest').read().strip()
sys.exit(0 if json.load(open('$run_dir/checkpoints/' + latest + '/manifest.json')).get('attempt') == 2 else 1)"
kill -CONT "${paused[@]}"
wait_for 60 "the woken group to stop its superseded attempt" grep -qE "superseded|taken away" "$work/$group_a_log"
# Attempt 2 trains on and commits past the woken group's last step, then stops.
step=$(field "$run" 'int(r["metrics"]["step"])')
wait_for 60 "attempt 2 to train on" step_at_least "$run" $((step + 2 * every))
ctl stop "$run" > /dev/null
wait_for 60 "$run STOPPED" state_is "$run" STOPPED
latest=$(cat "$run_dir/checkpoints/latest")
[ "$(manifest_attempt "$run_dir/checkpoints/$latest")" = 2 ] || fail "latest ($latest) was not written by attempt 2"
for dir in "$run_dir"/checkpoints/step_*; do
  case $dir in *.tmp) fail "a checkpoint was left half-written: $dir" ;; esac
  attempt=$(manifest_attempt "$dir")
  step=$((10#${dir##*step_}))
  if [ "$attempt" = 1 ] && [ "$step" -gt "${began:-0}" ]; then
    fail "$dir was committed by the superseded attempt after attempt 2 began at step $began"
  fi
done
how=$( (grep -oE "superseded by a newer attempt|was taken away by the coordinator" \
  "$work/$group_a_log" || true) | head -1)
say "the woken group stopped: $how; latest is attempt 2's $latest"
# The woken group leaves (SIGTERM), so that no later run is assigned to it.
kill -TERM "$group_a" 2> /dev/null || true
wait_gone "$group_a" "${paused[@]}"
group_pid=$group_b

say "3. a full disk during checkpoints: training goes on, and what is left loads"
sed -e "s/steps: $steps,/steps: 60,/" -e "s/checkpoint_every: $every/checkpoint_every: 5, keep_checkpoints: 2, max_checkpoint_failures: 100/" \
  "$work/chaos.yaml" > "$work/disk.yaml"
mkdir -p "$work/disk"
disk_mode=tmpfs
if ! mount -t tmpfs -o size=16m tmpfs "$work/disk" 2> /dev/null; then
  disk_mode="DDPM_FAULT_DISK_FULL (mounting a tmpfs is not allowed here)"
fi
umount_disk() { if [ "$disk_mode" = tmpfs ]; then umount "$work/disk" 2> /dev/null || true; fi; }
trap 'umount_disk; cleanup' EXIT
disk_env=()
[ "$disk_mode" = tmpfs ] || disk_env=(-x DDPM_FAULT_DISK_FULL=16-35)
OMP_NUM_THREADS=1 timeout 300 "$mpiexec" -np 2 --oversubscribe -x OMP_NUM_THREADS "${disk_env[@]}" \
  "$worker" --config "$work/disk.yaml" --run-dir "$work/disk/run" > "$work/disk.log" 2>&1 &
disk_pid=$!
pids+=("$disk_pid")
if [ "$disk_mode" = tmpfs ]; then
  wait_until_step "$work/disk/run" 16
  dd if=/dev/zero of="$work/disk/filler" bs=1M > /dev/null 2>&1 || true  # until ENOSPC
  wait_until_step "$work/disk/run" 35
  rm -f "$work/disk/filler"
fi
wait "$disk_pid" || fail "the run on a disk that filled up failed"
failures=$(grep -c "could not be written and was abandoned" "$work/disk.log" || true)
[ "$failures" -ge 1 ] || fail "no checkpoint failed on the full disk"
grep -q "trained to step 60" "$work/disk.log" || fail "the run did not finish"
[ -z "$(find "$work/disk/run/checkpoints" -name '*.tmp')" ] || fail "a failed checkpoint left files"
for dir in "$work"/disk/run/checkpoints/step_*; do
  "$export_tool" --checkpoint "$dir" --out "$work/export.pt" > /dev/null 2>&1 || fail "$dir does not load"
done
say "full disk via $disk_mode: $failures checkpoints abandoned, training finished, $(ls -d "$work"/disk/run/checkpoints/step_* | wc -l) checkpoints left, all load"
umount_disk

say "4. a NaN on rank 1 with on_divergence: rollback"
# Group B leaves (SIGTERM: the coordinator hears it at once), and a group whose rank 1 feeds
# step 15 NaNs takes the run.
mapfile -t ranks < <(ranks_of "$group_pid")
kill -TERM "$group_pid" 2> /dev/null || true
wait_gone "$group_pid" "${ranks[@]}"
sed -e "s/checkpoint_every: $every/checkpoint_every: $every, on_divergence: rollback/" "$work/chaos.yaml" > "$work/nan.yaml"
DDPM_WORKER_TOKEN=$(cat "$data/worker.token") OMP_NUM_THREADS=1 DDPM_FAULT_INJECT="rank=1,step=15,nan" \
  "$mpiexec" -np 2 --oversubscribe -x DDPM_WORKER_TOKEN -x OMP_NUM_THREADS -x DDPM_FAULT_INJECT \
  "$worker" --coordinator "$address" > "$work/group_nan.log" 2>&1 &
group_pid=$!
pids+=("$group_pid")
run=$(start_run nan "$work/nan.yaml")
runs+=("$run")
wait_for 120 "$run COMPLETED" state_is "$run" COMPLETED
grep -q "rollback 1 of 3 at step 15: the loss is not finite on another rank" "$work/group_nan.log" ||
  fail "rank 0 did not roll back for rank 1's NaN"
ctl get "$run" | grep -q "incidents .*1 divergence rollback(s)" || fail "ddpmctl get shows no rollback: $(ctl get "$run")"
metrics_url=$(grep -o 'metrics at http://[^ ]*' "$work/coordinator.log" | tail -1 | cut -d' ' -f3)
curl -fsS "$metrics_url" > "$work/metrics.prom" || fail "cannot scrape $metrics_url"
grep -q "^ddpm_train_rollbacks_total{run=\"$run\"} 1$" "$work/metrics.prom" ||
  fail "/metrics does not count the rollback: $(grep rollbacks "$work/metrics.prom")"

say "summary: $trials trials (seed $seed): kills rank $kills_rank, mpirun $kills_mpirun, coordinator $kills_coordinator; resumes verified $resumes; steps redone $redone (at most $max_redone per kill; every resume within one interval of $every of the newest checkpoint committed or being written at the kill); runs lost 0; corrupt loads $corrupt; final EMA weights bitwise equal $equal/$trials; partition: latest stayed attempt 2's; full disk: $failures checkpoints abandoned ($disk_mode); NaN: 1 rollback"
say "PASS"
