#!/usr/bin/env bash
# deploy/slurm/ddpm_worker_group.sbatch under a real Slurm: a one-node cluster of Debian's
# Slurm 22.05 daemons (slurmctld, slurmd) stood up in a temporary directory on loopback (a
# generated slurm.conf, the node's 8 GPUs as a gres over null devices, auth/none in place
# of munge), a coordinator beside it, and the script submitted unchanged with sbatch (2 tasks of
# 1 CPU instead of its 8 of 12). Checks that srun --mpi=pmix starts the ranks as one MPI world,
# that the group registers, trains a run to completion and writes its Prometheus targets, and
# that scancel makes it leave (the coordinator hears SIGTERM) and removes the targets file.
# Skips (77), saying why, where Slurm's daemons are not installed or no cgroup filesystem is
# mounted (slurmd 22.05 will not start without one, as in a bare chroot).
# usage: slurm_cluster.sh DDPM_COORDINATOR DDPM_WORKER DDPMCTL SOURCE_DIR
set -euo pipefail
coordinator=$1 worker=$2 ctl=$3 src=$4
name=slurm
for tool in slurmctld slurmd sbatch squeue scancel scontrol; do
  if ! command -v "$tool" > /dev/null; then
    echo "slurm: SKIP: $tool is not installed (Debian: apt-get install slurmctld slurmd slurm-client)"
    exit 77
  fi
done
if ! awk '$3 == "cgroup" || $3 == "cgroup2" {found = 1} END {exit !found}' /proc/mounts; then
  echo "slurm: SKIP: no cgroup filesystem is mounted (/proc/mounts has no cgroup or cgroup2)," \
    "and slurmd cannot start without one; mount /sys/fs/cgroup (e.g. bind /sys into a chroot)"
  exit 77
fi
work=$(mktemp -d)
pids=()
cleanup() {
  [ -n "${job:-}" ] && scancel "$job" 2> /dev/null || true
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "$name: $*"; }
fail() {
  say "FAIL: $*"
  for f in "$work"/*.log "$work"/*.out; do [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done
  exit 1
}
free_port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# shellcheck source=tests/wait_lib.sh
source "$(dirname "$0")/wait_lib.sh"

say "1. a one-node cluster: slurmctld and slurmd on loopback"
host=$(hostname -s)
mkdir -p "$work/state" "$work/spool" "$work/gpus" "$work/targets"
# Null devices standing for the 8 GPUs the script asks for (plain files where mknod is not
# allowed, which slurmd accepts with a complaint).
for i in 0 1 2 3 4 5 6 7; do mknod "$work/gpus/gpu$i" c 1 3 2> /dev/null || : > "$work/gpus/gpu$i"; done
# The machine's CPUs (nproc would honour OMP_NUM_THREADS), at least the 2 tasks' worth.
cpus=$(getconf _NPROCESSORS_ONLN)
[ "$cpus" -ge 2 ] || cpus=2
cat > "$work/slurm.conf" <<CONF
ClusterName=ddpmtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Gres=gpu:8 State=UNKNOWN
PartitionName=ddpm Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpus/gpu[0-7]\n' "$host" "$work" > "$work/gres.conf"
export SLURM_CONF=$work/slurm.conf
slurmctld -D -c -f "$SLURM_CONF" > "$work/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" -N "$host" > "$work/slurmd.out" 2>&1 &
pids+=($!)
node_idle() { [ "$(sinfo -h -n "$host" -o %T)" = idle ]; }
wait_until 30 "the node did not come up idle: $(sinfo 2>&1)" node_idle
say "node $host idle: $(sinfo -h -o '%P %D %c CPUs %G')"

say "2. a coordinator, and the group submitted with sbatch"
"$coordinator" --data-dir "$work/coordinator" --runs-dir "$work/runs" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$work/coordinator.log" 2>&1 &
pids+=($!)
wait_until 20 "the coordinator did not start" test -s "$work/coordinator/address"
address=$(cat "$work/coordinator/address")
metrics_port=$(free_port)
job=$(DDPM_COORDINATOR=$address DDPM_WORKER_TOKEN_FILE=$work/coordinator/worker.token \
  DDPM_BIN=$(dirname "$(dirname "$worker")") DDPM_SD_DIR=$work/targets DDPM_METRICS_PORT=$metrics_port \
  OMP_NUM_THREADS=1 sbatch --parsable --ntasks-per-node=2 --cpus-per-task=1 \
  --output="$work/job-%j.out" "$src/deploy/slurm/ddpm_worker_group.sbatch") || fail "sbatch refused the script"
say "job $job: $(squeue -h -j "$job" -o '%T on %N, %D node(s), %C CPUs, %b')"
wait_until 60 "the group slurm-$job did not register" grep -q "group slurm-$job registered (2 ranks)" "$work/job-$job.out"

say "3. a run trains to completion on the Slurm group"
ctl() { "$ctl" --coordinator "$address" --token-file "$work/coordinator/control.token" "$@"; }
ctl start "$src/tests/tiny.yaml" --name slurm --watch > "$work/watch.log" 2>&1 || fail "the run failed"
ctl get slurm-1 > "$work/get.txt"
grep -qE "^  state +COMPLETED$" "$work/get.txt" || fail "not completed: $(cat "$work/get.txt")"
grep -qE "^  placement +group slurm-$job: 2 ranks" "$work/get.txt" ||
  fail "not placed on the Slurm group: $(cat "$work/get.txt")"
targets="$work/targets/ddpm-workers-$job.json"
/usr/bin/python3 - "$targets" "$host" "$metrics_port" "$job" <<'PY' || fail "targets: $(cat "$targets")"
import json, sys
path, host, port, job = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
targets = json.load(open(path))
assert targets == [{"targets": [f"{host}:{port}", f"{host}:{port + 1}"],
                    "labels": {"slurm_job": job, "node": host}}], targets
PY

say "4. scancel: the group leaves, its targets file goes"
scancel "$job"
wait_until 60 "the coordinator did not see the group leave" \
  grep -q "group slurm-$job is gone: it left: SIGTERM" "$work/coordinator.log"
wait_until 60 "the job did not end" bash -c "[ -z \"\$(squeue -h -j $job 2> /dev/null)\" ]"
[ ! -e "$targets" ] || fail "the targets file outlived the job"
job=
say "PASS"
