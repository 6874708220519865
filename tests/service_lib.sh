# Shared by the service shell tests: a coordinator and worker groups on loopback, ddpmctl, and
# waiting. Source it after setting: name (the test's name in messages), mpiexec, coordinator,
# worker, ctl (and optionally heartbeat_interval, heartbeat_timeout, coordinator_flags, extra
# flags split on spaces). It makes $work (removed on exit) and kills every process it started.
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "$name: FAIL: $*"
  for f in "$work"/*.log; do echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -25; done
  exit 1
}
say() { echo "$name: $*"; }

# tests/tiny.yaml (30 steps); endless.yaml and long.yaml differ in steps.
cp "$(dirname "${BASH_SOURCE[0]}")/tiny.yaml" "$work/tiny.yaml"
sed 's/steps: 30,/steps: 100000,/' "$work/tiny.yaml" > "$work/endless.yaml"
sed 's/steps: 30,/steps: 1200,/' "$work/tiny.yaml" > "$work/long.yaml"

data=$work/coordinator
start_coordinator() {  # [ADDRESS [STARTS]]: waits until it serves (for the STARTS-th time)
  "$coordinator" --data-dir "$data" --listen "${1:-127.0.0.1:0}" --metrics-listen 127.0.0.1:0 \
    --http-listen "${http_listen:-127.0.0.1:0}" \
    --heartbeat-interval "${heartbeat_interval:-1}" --heartbeat-timeout "${heartbeat_timeout:-6}" \
    ${coordinator_flags:-} >> "$work/coordinator.log" 2>&1 &
  coordinator_pid=$!
  pids+=("$coordinator_pid")
  for _ in $(seq 1 100); do
    if [ -s "$data/address" ] && grep -q "serving on" "$work/coordinator.log" &&
       [ "$(grep -c 'serving on' "$work/coordinator.log")" -ge "${2:-1}" ]; then
      address=$(cat "$data/address")
      return
    fi
    sleep 0.1
  done
  fail "the coordinator did not start"
}
start_group() {  # LOG [WORKER FLAGS...]: a 2-rank group under mpirun
  local log=$1
  shift
  DDPM_WORKER_TOKEN=$(cat "$data/worker.token") OMP_NUM_THREADS=1 \
    "$mpiexec" -np 2 --oversubscribe -x DDPM_WORKER_TOKEN -x OMP_NUM_THREADS "$worker" \
    --coordinator "$address" "$@" > "$work/$log" 2>&1 &
  group_pid=$!
  pids+=("$group_pid")
}
ctl() { "$ctl" --coordinator "$address" --token-file "$data/control.token" "$@"; }
field() {  # RUN PYTHON-EXPRESSION over the run's JSON as r
  ctl get "$1" --json | python3 -c "import json, sys; r = json.load(sys.stdin); print($2)"
}
wait_for() {  # SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq 1 $((seconds * 4))); do
    if "$@" > /dev/null 2>&1; then return; fi
    # A group that has exited will not bring what is awaited.
    if [ -n "${group_pid:-}" ] && ! kill -0 "$group_pid" 2> /dev/null; then
      fail "the worker group exited while waiting for $what"
    fi
    sleep 0.25
  done
  fail "timed out after ${seconds}s waiting for $what"
}
state_is() { [ "$(field "$1" 'r["state"]')" = "$2" ]; }
step_at_least() { [ "$(field "$1" 'int(r.get("metrics", {}).get("step", 0))')" -ge "$2" ]; }
# A loopback port nothing listens on now, with the COUNT-1 ports after it free too.
free_ports() {  # [COUNT]
  python3 - "${1:-1}" <<'PY'
import socket, sys
count = int(sys.argv[1])
for _ in range(200):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    if base + count > 65535:
        continue
    try:
        held = []
        for port in range(base, base + count):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            held.append(s)
        for s in held:
            s.close()
        print(base)
        sys.exit(0)
    except OSError:
        for s in held:
            s.close()
sys.exit("no free ports")
PY
}
