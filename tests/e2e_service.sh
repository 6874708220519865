#!/usr/bin/env bash
# The whole service on loopback with the real binaries: a coordinator, a 2-rank worker group
# under mpirun, and ddpmctl. A run is started, seen RUNNING and stopped; the same group takes a
# second run to completion; one that ends while the coordinator is down completes when it is
# back, with no restart; another survives a coordinator restart with nothing lost, and after
# the group is SIGKILLed a new group resumes it from its last checkpoint to completion. The
# group sends one heartbeat, gathered by rank 0: a rank stopped with SIGSTOP is named by the
# coordinator, and one killed is named at once by its peer. A registry backup taken while it
# serves restores every run; ended runs are forgotten on request with their files kept.
# usage: e2e_service.sh MPIEXEC DDPM_COORDINATOR DDPM_WORKER DDPMCTL
set -euo pipefail
mpiexec=$1 coordinator=$2 worker=$3 ctl=$4
name=e2e-service
# shellcheck source=tests/service_lib.sh
source "$(dirname "$0")/service_lib.sh"

start_coordinator
start_group group1.log
say "coordinator at $address; a 2-rank group"

say "1. a run reaches RUNNING and stops with a checkpoint"
run=$(ctl start "$work/endless.yaml" --name smoke --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])')
wait_for 60 "$run RUNNING" state_is "$run" RUNNING
wait_for 60 "$run past step 20" step_at_least "$run" 21
ctl stop "$run" > /dev/null
wait_for 60 "$run STOPPED" state_is "$run" STOPPED
checkpoint=$(field "$run" 'r["latest_checkpoint"]["path"]')
[ -f "$checkpoint/COMMITTED" ] || fail "the stop left no committed checkpoint ($checkpoint)"
[ "$(field "$run" '" ".join(t["to"] for t in r["transitions"])')" = \
  "QUEUED STARTING RUNNING STOPPING STOPPED" ] || fail "transitions: $(ctl get "$run")"

say "2. the same group (no new mpirun) takes a second run to completion"
ctl start "$work/tiny.yaml" --name second --watch > "$work/watch.log" || fail "watch exited $?"
grep -q "run second-2 COMPLETED at step 30/30" "$work/watch.log" || fail "watch did not report completion"
grep -q "step 30/30 loss" "$work/watch.log" || fail "watch printed no progress"
[ -s "$(field second-2 'r["sample_grid"]')" ] || fail "no sample grid"
[ "$(field second-2 'r["placement"]["group_id"]')" = "$(field smoke-1 'r["placement"]["group_id"]')" ] ||
  fail "the second run went to another group"

say "2b. a run that ends while the coordinator is down completes once it is back"
sed 's/steps: 1200,/steps: 200,/' "$work/long.yaml" > "$work/short.yaml"
ctl start "$work/short.yaml" --name during > /dev/null
wait_for 60 "during-3 past step 20" step_at_least during-3 21
kill -TERM "$coordinator_pid"
wait "$coordinator_pid" || fail "the coordinator did not exit cleanly on SIGTERM"
# Checkpoint reports wait on their own thread: training does not stall without a coordinator.
wait_for 60 "the group to finish during-3 with no coordinator" \
  grep -q "trained to step 200 " "$work/group1.log"
start_coordinator "$address" 2
wait_for 60 "during-3 COMPLETED" state_is during-3 COMPLETED
[ "$(field during-3 '" ".join(t["to"] for t in r["transitions"])')" = \
  "QUEUED STARTING RUNNING COMPLETED" ] || fail "transitions: $(ctl get during-3)"
[ "$(field during-3 'r.get("restarts", 0)')" = 0 ] || fail "restarts: $(ctl get during-3)"
# (Either the group registered again naming the run before reporting its end, or the report
# reached the new coordinator first, was refused as from an unknown group, and went again after.)

say "3. a coordinator restart mid-run loses nothing"
run=long-4
ctl start "$work/long.yaml" --name long > /dev/null
wait_for 60 "$run past step 40" step_at_least "$run" 41
before=$(field "$run" 'len(r["transitions"])')
kill -TERM "$coordinator_pid"
wait "$coordinator_pid" || fail "the coordinator did not exit cleanly on SIGTERM"
start_coordinator "$address" 3
step=$(field "$run" 'int(r["metrics"]["step"])')
wait_for 30 "$run to advance after the restart" step_at_least "$run" $((step + 20))
state_is "$run" RUNNING || fail "$run is $(field "$run" 'r["state"]') after the restart"
[ "$(field "$run" 'len(r["transitions"])')" = "$before" ] || fail "transitions changed: $(ctl get "$run")"
grep -q "carries on with run $run" "$work/coordinator.log" || fail "the group did not re-register with its run"
[ "$(ctl list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["runs"]))')" = 4 ] ||
  fail "runs lost in the restart"

say "4. SIGKILL on mpirun: a new group resumes the run from its checkpoint"
wait_for 60 "a checkpoint of $run after the restart" \
  python3 -c "import sys; sys.exit(0 if int('$(field "$run" 'r["latest_checkpoint"]["step"]')') > $step else 1)"
kill -KILL "$group_pid"
sleep 1
if pgrep -f "ddpm_worker --coordinator $address" > /dev/null; then fail "ranks outlived mpirun"; fi
start_group group2.log
wait_for 150 "$run COMPLETED" state_is "$run" COMPLETED
[ "$(field "$run" 'r["restarts"]')" = 1 ] || fail "restarts: $(ctl get "$run")"
# Its ranks died with mpirun: the command stream closed (or a rank saw its peer die first).
ctl get "$run" | grep -Eq "FAILED    (group .*'s command stream closed|it left: rank . \(pid)" ||
  fail "no lost group recorded: $(ctl get "$run")"
ctl get "$run" | grep -q "resumes from step" || fail "it did not resume: $(ctl get "$run")"
grep -q "resumed from .*$run/checkpoints/step_" "$work/group2.log" || fail "the new group did not resume"

say "4b. one heartbeat per group: a rank stopped with SIGSTOP is named, and one killed by its peer"
grep -q "one heartbeat for the group, gathered by rank 0" "$work/group2.log" ||
  fail "the group does not gather its heartbeats: $(grep 'heartbeat' "$work/group2.log")"
run=$(ctl start "$work/endless.yaml" --name gather --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])')
wait_for 60 "$run RUNNING" state_is "$run" RUNNING
rank1=
for pid in $(pgrep -P "$group_pid" -f ddpm_worker); do
  if tr '\0' '\n' < "/proc/$pid/environ" | grep -qx OMPI_COMM_WORLD_RANK=1; then rank1=$pid; fi
done
[ -n "$rank1" ] || fail "no rank 1 under mpirun $group_pid"
kill -STOP "$rank1"
restarts_at_least() { [ "$(field "$1" 'r.get("restarts", 0)')" -ge "$2" ]; }
wait_for 30 "$run lost with rank 1 stopped" restarts_at_least "$run" 1
ctl get "$run" | grep -q "FAILED    no heartbeat from rank 1 of group" ||
  fail "the stopped rank was not named: $(ctl get "$run")"
kill -CONT "$rank1"
attempt_running() { [ "$(field "$1" 'r["placement"]["attempt"]')" = "$2" ] && state_is "$1" RUNNING; }
wait_for 60 "$run RUNNING again after SIGCONT" attempt_running "$run" 2
killed_group=$group_pid
group_pid=  # It ends with its rank.
kill -KILL "$rank1"
wait_for 10 "$run lost with rank 1 killed" restarts_at_least "$run" 2
ctl get "$run" | grep -q "FAILED    it left: rank 1 (pid $rank1 on $(hostname)) died, as rank 0 saw" ||
  fail "the killed rank was not named by its peer: $(ctl get "$run")"
wait "$killed_group" 2> /dev/null || true
ctl stop "$run" --now > /dev/null
start_group group3.log

say "5. bad input gets one clear line and a non-zero exit"
set +e
ctl stop ghost 2> "$work/err.txt"; code=$?
set -e
[ "$code" = 1 ] && grep -q "StopRun: NOT_FOUND: no run 'ghost'" "$work/err.txt" || fail "stop ghost: $code $(cat "$work/err.txt")"
printf 'train: {steps: [1}\n' > "$work/bad.yaml"
set +e
ctl start "$work/bad.yaml" 2> "$work/err.txt"; code=$?
"$ctl" --coordinator "$address" list > /dev/null 2>&1; nokey=$?
set -e
[ "$code" = 1 ] && grep -q "INVALID_ARGUMENT: StartRun config:1" "$work/err.txt" || fail "bad yaml: $(cat "$work/err.txt")"
[ "$nokey" = 66 ] || fail "ddpmctl without a token exited $nokey, not 66"

say "5b. tokens: never a flag (ps shows flags), never in a log"
for binary in "$coordinator" "$worker" "$ctl"; do
  if "$binary" --help 2>&1 | grep -E -- "--[a-z-]*token[a-z-]* VALUE" | grep -v -- "-file VALUE"; then
    fail "$(basename "$binary") takes a token on its command line"
  fi
done
for token in "$data/control.token" "$data/worker.token" "$data/viewer.token"; do
  if grep -rqF "$(cat "$token")" "$work"/*.log "$work"/*.txt 2> /dev/null; then
    fail "the token of $token appears in a log: $(grep -rlF "$(cat "$token")" "$work"/*.log "$work"/*.txt)"
  fi
done

say "5c. one coordinator per data directory"
set +e
"$coordinator" --data-dir "$data" --listen 127.0.0.1:0 --metrics-listen "" --http-listen "" \
  > "$work/second.txt" 2>&1
second=$?
set -e
[ "$second" = 1 ] || fail "a second coordinator on $data exited $second, not 1: $(cat "$work/second.txt")"
grep -q "data dir $data is in use by pid $coordinator_pid on host $(hostname) since " "$work/second.txt" ||
  fail "the second coordinator did not name the holder: $(cat "$work/second.txt")"
grep -q "serving on" "$work/second.txt" && fail "the second coordinator served"
# A killed holder's lock goes with it: the next start takes the directory at once.
kill -KILL "$coordinator_pid"
wait "$coordinator_pid" 2> /dev/null || true
start_coordinator "$address" $(($(grep -c 'serving on' "$work/coordinator.log") + 1))
say "a second coordinator refused: $(head -n 1 "$work/second.txt")"

say "5d. a backup taken while it serves restores every run; an unwritable path is refused"
touch "$work/a-file"
for target in "$work/no/such/dir/backup.db" "$work/a-file/backup.db"; do
  set +e
  ctl backup "$target" 2> "$work/err.txt"; code=$?
  set -e
  [ "$code" = 73 ] || fail "backup to $target exited $code, not 73: $(cat "$work/err.txt")"
  grep -q "ddpmctl: cannot write the backup to $target: " "$work/err.txt" ||
    fail "the unwritable backup path was not named: $(cat "$work/err.txt")"
done
[ -z "$(find "$work" -name 'backup.db*')" ] || fail "a refused backup left a file: $(find "$work" -name 'backup.db*')"
ctl backup "$work/backup.db" > "$work/backup.txt"
grep -q "backed up [0-9]* runs to $work/backup.db" "$work/backup.txt" || fail "backup: $(cat "$work/backup.txt")"
[ -z "$(find "$work" -name 'backup.db.partial*')" ] || fail "the backup left its temporary file"
"$coordinator" --data-dir "$work/restored" --restore "$work/backup.db" > "$work/restore.txt" ||
  fail "restore: $(cat "$work/restore.txt")"
set +e
"$coordinator" --data-dir "$data" --restore "$work/backup.db" > "$work/busy.txt" 2>&1; busy=$?
set -e
[ "$busy" = 1 ] && grep -q "is in use by pid $coordinator_pid" "$work/busy.txt" ||
  fail "a restore into the served data dir was not refused: $(cat "$work/busy.txt")"
"$coordinator" --data-dir "$work/restored" --listen 127.0.0.1:0 --metrics-listen "" --http-listen "" \
  > "$work/restored.log" 2>&1 &
restored_pid=$!
pids+=("$restored_pid")
for _ in $(seq 1 100); do [ -s "$work/restored/address" ] && break; sleep 0.1; done
"$ctl" --coordinator "$(cat "$work/restored/address")" --token-file "$work/restored/control.token" \
  list --json > "$work/restored.json"
ctl list --json > "$work/live.json"
python3 - "$work/live.json" "$work/restored.json" <<'PY' || fail "the restored registry differs"
import json, sys
live, restored = ([(r["id"], r["state"]) for r in json.load(open(f))["runs"]] for f in sys.argv[1:])
assert live == restored and len(live) >= 5, (live, restored)
PY
kill -TERM "$restored_pid"
wait "$restored_pid" || fail "the restored coordinator did not exit cleanly"
say "backup: $(cat "$work/backup.txt" | cut -c1-60)...; restored $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["runs"]))' "$work/restored.json") runs"

say "5e. ended runs forgotten on request; their run directories stay"
ctl delete --ended-before 0s > "$work/pruned.txt"
grep -q "deleted [1-9][0-9]* runs that ended before" "$work/pruned.txt" || fail "prune: $(cat "$work/pruned.txt")"
[ "$(ctl list --json | python3 -c 'import json,sys; print(sum(r["state"] in ("COMPLETED","STOPPED","FAILED") for r in json.load(sys.stdin).get("runs", [])))')" = 0 ] ||
  fail "ended runs are still listed: $(ctl list)"
first=$(sed -n 2p "$work/pruned.txt" | tr -d ' ')
[ -d "$data/runs/$first" ] || fail "pruning removed the run directory of $first"

say "6. clean shutdown"
kill -TERM "$group_pid"
# mpirun reports the signal it forwarded in its own exit code; the ranks must leave cleanly.
wait "$group_pid" || true
grep -q "left the coordinator (SIGTERM)" "$work/group3.log" || fail "the group did not leave"
if grep -Eq ": error: " "$work/group3.log"; then fail "a rank reported an error on shutdown"; fi
grep -q "group .* is gone: it left: SIGTERM" "$work/coordinator.log" || fail "the coordinator missed the leave"
kill -TERM "$coordinator_pid"
wait "$coordinator_pid" || fail "the coordinator did not exit cleanly"
say "PASS"
