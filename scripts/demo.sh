#!/usr/bin/env bash
# The main job: installs and builds, then runs the whole service on this machine, on loopback:
# a coordinator (SQLite registry, /metrics), a 2-rank worker group under mpirun, and ddpmctl,
# which starts a run of configs/shapes.yaml (the built-in shapes data), watches it to the end
# and prints where its sample grid and checkpoint are. The coordinator's web console shows the
# run while it trains: the demo prints its address and the viewer token's file. Then it shuts
# everything down cleanly; with DDPM_DEMO_KEEP=1 the coordinator and the page stay up after the
# run, until Ctrl-C. Extra arguments go to `ddpmctl start` (e.g. --name mine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${DDPM_BUILD_DIR:-build}
data_dir=${DDPM_SERVICE_DIR:-runs/service}
mkdir -p "$data_dir"
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

coordinator_pid='' group_pid=''
shutdown() {
  if [ -n "$group_pid" ] && kill -0 "$group_pid" 2> /dev/null; then
    kill -TERM "$group_pid"
    wait "$group_pid" 2> /dev/null || true
  fi
  if [ -n "$coordinator_pid" ] && kill -0 "$coordinator_pid" 2> /dev/null; then
    kill -TERM "$coordinator_pid"
    wait "$coordinator_pid" 2> /dev/null || true
  fi
}
trap shutdown EXIT

rm -f "$data_dir/address" "$data_dir/metrics_address" "$data_dir/console_address"
# The console on 127.0.0.1:8080 when that port is free, else on any free port.
http_listen=${DDPM_DEMO_HTTP_LISTEN:-127.0.0.1:8080}
if (exec 3<> "/dev/tcp/${http_listen%:*}/${http_listen##*:}") 2> /dev/null; then
  http_listen=127.0.0.1:0
fi
"$build_dir/coordinator/ddpm_coordinator" --data-dir "$data_dir" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --http-listen "$http_listen" >> "$data_dir/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 1 100); do [ -s "$data_dir/console_address" ] && break; sleep 0.1; done
[ -s "$data_dir/address" ] && [ -s "$data_dir/console_address" ] ||
  { cat "$data_dir/coordinator.log"; exit 1; }
address=$(cat "$data_dir/address")
metrics=$(cat "$data_dir/metrics_address")
console=$(cat "$data_dir/console_address")
echo "demo: coordinator at $address (registry $data_dir/registry.db), metrics at $metrics"
echo "demo: watch it in a browser: $console  (sign in with the token in $data_dir/viewer.token," \
  "or $data_dir/control.token to act)"

DDPM_WORKER_TOKEN=$(cat "$data_dir/worker.token") mpirun -np 2 --oversubscribe \
  -x DDPM_WORKER_TOKEN "$build_dir/worker/ddpm_worker" --coordinator "$address" \
  > "$data_dir/group.log" 2>&1 &
group_pid=$!
echo "demo: a 2-rank worker group (mpirun -np 2 ddpm_worker), log in $data_dir/group.log"

ctl=("$build_dir/tools/ddpmctl" --coordinator "$address" --token-file "$data_dir/control.token")
"${ctl[@]}" start configs/shapes.yaml --name demo --watch "$@"
echo
echo "demo: the runs this coordinator holds:"
"${ctl[@]}" list
echo "demo: its metrics: curl -s $metrics | grep ^ddpm_"
if command -v curl > /dev/null; then curl -s "$metrics" | grep '^ddpm_runs' || true; fi
if [ "${DDPM_DEMO_KEEP:-0}" = 1 ]; then
  echo "demo: DDPM_DEMO_KEEP=1: the coordinator and its console stay up at $console; Ctrl-C ends them"
  trap 'echo; echo "demo: stopping"; exit 0' INT TERM
  while kill -0 "$coordinator_pid" 2> /dev/null; do sleep 1; done
fi
