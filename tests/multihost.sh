#!/usr/bin/env bash
# Several hosts on one machine: three network namespaces, each with its own UTS namespace
# (hostname hosta, hostb, hostc) and an address on a veth bridge (10.77.0.1-3). The coordinator
# serves TLS on hostc's address; Open MPI's launcher reaches the other host through an agent
# that enters its namespaces in place of ssh, and its TCP transports cross the bridge. Checks:
#   1. a group of one rank on hosta and one on hostb: each rank is local rank 0 of its host,
#      it reaches the coordinator at 10.77.0.3 over TLS, both ranks' shards commit into the
#      shared run directory, and the EMA weights equal those of the same run on one host's
#      2 ranks (within 1e-6; the sums are the same two terms);
#   2. killing hostb's processes mid-run: the coordinator restarts the run on the group that
#      is left (2 ranks on hostc), from the last checkpoint, to completion.
# Skips (77), saying why, where network or UTS namespaces cannot be made (not root, no
# CAP_SYS_ADMIN, no veth or bridge support).
# usage: multihost.sh MPIEXEC DDPM_COORDINATOR DDPM_WORKER DDPMCTL PYTHON
set -euo pipefail
mpiexec=$1 coordinator=$2 worker=$3 ctl=$4 python=$5
name=multihost
say() { echo "$name: $*"; }
fail() {
  say "FAIL: $*"
  for f in "$work"/*.log; do [ -f "$f" ] && { echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 15; }; done
  exit 1
}
skip() { say "SKIP: $*"; exit 77; }
# shellcheck source=tests/wait_lib.sh
source "$(dirname "$0")/wait_lib.sh"
# shellcheck source=tests/netns_lib.sh
source "$(dirname "$0")/netns_lib.sh"

say "0. three hosts: network and UTS namespaces on a veth bridge"
netns_hosts

say "1. the coordinator on hostc, TLS on 10.77.0.3"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=hostc \
  -addext "subjectAltName=IP:10.77.0.3,DNS:hostc" -keyout "$work/server.key" \
  -out "$work/server.pem" > "$work/openssl.log" 2>&1 || fail "openssl"
data=$work/coordinator
on hostc "$coordinator" --data-dir "$data" --runs-dir "$work/runs" --listen 10.77.0.3:7070 \
  --metrics-listen 10.77.0.3:9464 --tls-cert "$work/server.pem" --tls-key "$work/server.key" \
  --heartbeat-interval 1 --heartbeat-timeout 6 > "$work/coordinator.log" 2>&1 &
pids+=($!)
wait_until 20 "the coordinator did not start" grep -q "serving on 10.77.0.3:7070 (TLS" "$work/coordinator.log"
ctl() { run_on hostc "$ctl" --coordinator 10.77.0.3:7070 --tls-ca "$work/server.pem" --token-file "$data/control.token" "$@"; }
group() {  # LOG HOSTS(mpirun --host) FROM-HOST GROUP-ID METRICS-PORT (one per group: a stopped
           # group's ranks may still hold theirs)
  on "$3" "$mpiexec" -np 2 --host "$2" "${mpi[@]}" -x OMP_NUM_THREADS=1 "$worker" \
    --coordinator 10.77.0.3:7070 --tls-ca "$work/server.pem" \
    --worker-token-file "$data/worker.token" --group-id "$4" --metrics-listen "0.0.0.0:$5" \
    > "$work/$1" 2>&1 &
  group_pid=$!
  pids+=("$group_pid")
  wait_until 60 "group $4 did not register" grep -q "group $4 registered (2 ranks)" "$work/$1"
}
stop_group() {
  kill -TERM "$group_pid"
  wait "$group_pid" 2> /dev/null || true
}
cp "$(dirname "$0")/tiny.yaml" "$work/tiny.yaml"

say "2. the run on one host's 2 ranks (hosta), for reference"
group one-host.log hosta:2 hosta one-host 9600
ctl start "$work/tiny.yaml" --name onehost --watch > "$work/onehost-watch.log" 2>&1 || fail "the one-host run failed"
run_id() { grep -o 'started run [^ ]*' "$1" | cut -d' ' -f3; }  # run ids are NAME-<run number>
one_run=$(run_id "$work/onehost-watch.log")
stop_group

say "3. the same run on a group of hosta and hostb"
group cross.log hosta,hostb hosta cross 9500
grep -q "rank 1: metrics at http://0.0.0.0:9500/metrics" "$work/cross.log" ||
  fail "rank 1 is not local rank 0 of hostb (its /metrics would be on 9500)"
ctl start "$work/tiny.yaml" --name crosshost --watch > "$work/cross-watch.log" 2>&1 || fail "the cross-host run failed"
cross_run=$(run_id "$work/cross-watch.log")
ctl get "$cross_run" > "$work/cross-get.txt"
grep -qE "^  placement +group cross: 2 ranks" "$work/cross-get.txt" || fail "placement: $(cat "$work/cross-get.txt")"
step_dir=$work/runs/$cross_run/checkpoints/step_000000030
[ -f "$step_dir/COMMITTED" ] && [ -f "$step_dir/shard-00000-of-00002" ] &&
  [ -f "$step_dir/shard-00001-of-00002" ] || fail "no committed 2-shard checkpoint: $(ls "$step_dir")"
"$python" - "$work/runs/$one_run/ema_weights.pt" "$work/runs/$cross_run/ema_weights.pt" <<'PY' ||
import sys, torch
one, cross = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert sorted(one) == sorted(cross)
diff = max((one[k] - cross[k]).abs().max().item() for k in one)
print("multihost: EMA weights, cross-host against one host: max |difference| %.3g over %d tensors" % (diff, len(one)))
assert diff <= 1e-6, diff
PY
  fail "the cross-host weights differ from one host's"
stop_group

say "4. hostb's processes killed mid-run: the run restarts on the group that is left"
sed -e 's/steps: 30,/steps: 400,/' -e 's/checkpoint_every: 20,/checkpoint_every: 40,/' \
  "$work/tiny.yaml" > "$work/long.yaml"
group cross2.log hosta,hostb hosta cross2 9700
cross_pid=$group_pid
ctl start "$work/long.yaml" --name failover > "$work/failover-start.log" || fail "start"
failover=$(run_id "$work/failover-start.log")
wait_until 120 "no checkpoint of the failover run" test -e "$work/runs/$failover/checkpoints/step_000000040/COMMITTED"
group standby.log hostc:2 hostc standby 9800
for pid in $(ip netns pids "$pre-hostb"); do kill -KILL "$pid" 2> /dev/null || true; done
say "killed hostb's processes at step $(tail -n 1 "$work/runs/$failover/metrics.csv" | cut -d, -f1)"
wait "$cross_pid" 2> /dev/null || true
wait_until 240 "the run did not complete on the standby group" \
  grep -q "run $failover: RUNNING -> COMPLETED: trained to the last step at step 400 on group standby" "$work/coordinator.log"
grep -q "resumed from .*step_0000000[0-9]0" "$work/standby.log" || fail "the standby group did not resume from a checkpoint"
say "the standby group $(grep -o 'resumed from [^ ]* at step [0-9]*' "$work/standby.log" | head -1)"
grep -qE "run $failover: RUNNING -> FAILED: .*group cross2" "$work/coordinator.log" ||
  fail "the coordinator did not mark the run failed with the lost group"
stop_group
say "PASS"
