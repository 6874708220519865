#!/usr/bin/env bash
# deploy/docker-compose.yml for real: docker/Dockerfile.cpu built with podman on a Debian 12
# base image made here (debootstrap, `podman import`: no registry is reached), then the Compose
# file's coordinator and CPU worker group brought up by docker-compose through podman's
# Docker-compatible API socket (Prometheus and Grafana, public images, are not started). Checks
# that both health checks turn healthy, that a run started with `ddpmctl` in the `ctl` service
# trains, that the run survives a restart of the coordinator's container (same run, it goes on
# from where it was and completes), and that the run directory is on the shared volume. Then
# plays the MPI Operator for deploy/kubernetes' MPIJob: its worker pods' sshd and its
# launcher's mpirun, as the manifest writes them, in containers of the image, train a run.
#
# The base image and podman's layers stay in podman's storage, and the compiler cache in
# ${DDPM_CONTAINER_CACHE:-/var/cache/ddpm-containers}, so that a second run builds only what
# changed (see BENCHMARKS.md for the cold and warm times). Skips (77), saying why, without root,
# podman, docker-compose or debootstrap, or where podman cannot start a container here.
# usage: compose_stack.sh SOURCE_DIR
set -euo pipefail
src=$(cd "$1" && pwd)
name=compose
say() { echo "$name: $*"; }
skip() {
  say "SKIP: $*"
  exit 77
}
[ "${DDPM_CONTAINER_TESTS:-0}" = 1 ] ||
  skip "opt-in: its cold image build takes about 7 minutes and CI skips it; run it with DDPM_CONTAINER_TESTS=1 ctest -L containers"
[ "$(id -u)" = 0 ] || skip "needs root (podman's rootful storage and networks)"
# podman, runc and debootstrap are packages.txt's opt-in [containers] section.
bash "$src/scripts/setup.sh" containers > /dev/null || skip "could not install scripts/packages.txt's [containers] section"
for tool in podman docker-compose debootstrap runc; do
  command -v "$tool" > /dev/null ||
    skip "$tool is not installed (Debian: apt-get install podman docker-compose debootstrap runc)"
done
cache=${DDPM_CONTAINER_CACHE:-/var/cache/ddpm-containers}
mkdir -p "$cache/ccache"
work=$(mktemp -d)
project=ddpmcompose$$
pids=()
compose() { docker-compose -p "$project" -f "$work/deploy/docker-compose.yml" "$@"; }
cleanup() {
  podman rm -f -t 0 "$project-launcher" "$project-worker-0" "$project-worker-1" > /dev/null 2>&1 || true
  if [ -S "$work/podman.sock" ]; then compose down --volumes --timeout 5 > /dev/null 2>&1 || true; fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  say "FAIL: $*"
  for f in "$work"/*.log; do [ -f "$f" ] && { echo "--- $f"; tr '\r' '\n' < "$f" | tail -n 25; }; done
  if [ -S "$work/podman.sock" ]; then
    for container in "$project-launcher" "$project-worker-0" "$project-worker-1"; do
      podman container exists "$container" || continue
      echo "--- $container"
      podman logs --tail 25 "$container" 2>&1
    done
    for service in coordinator worker; do
      echo "--- $service: health $(podman inspect --format '{{json .State.Health}}' \
        "${project}_${service}_1" 2>&1 | cut -c 1-600)"
      compose logs --tail 25 "$service" 2>&1
    done
  fi
  exit 1
}
trap 'fail "line $LINENO: a command failed"' ERR
# shellcheck source=tests/wait_lib.sh
source "$(dirname "$0")/wait_lib.sh"

# podman's settings for this test. Where the process may not raise resource limits (no
# CAP_SYS_RESOURCE, as in CI's sandbox) the containers get this process's own hard limits in
# place of podman's defaults (nofile 1048576); podman caps nproc at the kernel's pid_max. runc,
# not crun: crun refuses a hybrid cgroup v1/v2 hierarchy.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
[ "$nofile" = unlimited ] && nofile=1048576
cat > "$work/containers.conf" << CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$work/containers.conf

say "1. the base image: Debian 12 from debootstrap, imported into podman"
base=localhost/ddpm-debian:12
if ! podman image exists "$base"; then
  # The archive this machine's apt uses (scripts/debian-mirror.sh; DDPM_DEBIAN_MIRROR overrides).
  mirror=$("$src/scripts/debian-mirror.sh") || fail "no Debian archive for debootstrap"
  started=$(date +%s)
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 ||
    fail "debootstrap from $mirror"
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" > /dev/null ||
    fail "podman import"
  rm -rf "$work/rootfs"
  say "made $base from $mirror in $(($(date +%s) - started)) s"
else
  say "$base is in podman's storage"
fi
podman run --rm "$base" true > "$work/probe.log" 2>&1 ||
  skip "podman cannot start a container here: $(tail -n 1 "$work/probe.log")"

say "2. docker/Dockerfile.cpu built with podman (layers and compiler cache kept)"
started=$(date +%s)
# --format docker: OCI images have no HEALTHCHECK, and podman would drop the image's.
podman build --format docker -f "$src/docker/Dockerfile.cpu" -t localhost/ddpm-train:cpu \
  --build-arg DEBIAN_IMAGE="$base" --build-arg DDPM_CCACHE=ON -v "$cache/ccache:/ccache" \
  "$src" > "$work/build.log" 2>&1 || fail "podman build"
say "built localhost/ddpm-train:cpu in $(($(date +%s) - started)) s ($(podman image inspect \
  --format '{{.Size}}' localhost/ddpm-train:cpu | awk '{printf "%.0f MB", $1 / 1e6}'))"

say "3. podman's Docker API, and the Compose stack's coordinator and worker group on it"
podman system service --time=0 "unix://$work/podman.sock" > "$work/podman-service.log" 2>&1 &
pids+=($!)
wait_until 20 "podman's API socket did not come up" test -S "$work/podman.sock"
export DOCKER_HOST=unix://$work/podman.sock
cp -r "$src/deploy" "$work/deploy"
rm -rf "$work/deploy/secrets"
bash "$work/deploy/init-secrets.sh" > /dev/null
# podman schedules health checks with systemd timers; where there is no systemd (a container,
# CI) this loop is the timer, running each container's own check every 2 s.
(
  while sleep 2; do
    for container in $(podman ps -q --filter "label=com.docker.compose.project=$project"); do
      podman healthcheck run "$container" > /dev/null 2>&1 || true
    done
  done
) &
pids+=($!)
started=$(date +%s)
DDPM_CPU_RANKS=2 compose up -d --no-build coordinator worker > "$work/up.log" 2>&1 ||
  fail "docker-compose up"
health() { podman inspect --format '{{.State.Health.Status}}' "${project}_$1_1"; }
healthy() { [ "$(health "$1")" = healthy ]; }
wait_until 120 "the coordinator's health check did not pass" healthy coordinator
wait_until 120 "the worker group's health check did not pass" healthy worker
say "coordinator and worker healthy $(($(date +%s) - started)) s after up"

say "4. a run through the ctl service"
# tests/tiny.yaml, longer, so that it is still training when the coordinator restarts.
sed -e 's/steps: 30,/steps: 2000,/' -e 's/checkpoint_every: 20,/checkpoint_every: 200,/' \
  -e 's/log_every: 10,/log_every: 50,/' "$src/tests/tiny.yaml" > "$work/compose.yaml"
# The MPIJob's group (step 7) trains a shorter one.
sed -e 's/steps: 30,/steps: 200,/' "$src/tests/tiny.yaml" > "$work/mpijob.yaml"
chmod 644 "$work/compose.yaml" "$work/mpijob.yaml"
ctl() {
  compose run --rm -T -v "$work/compose.yaml:/tmp/compose.yaml:ro" \
    -v "$work/mpijob.yaml:/tmp/mpijob.yaml:ro" ctl "$@"
}
ctl start /tmp/compose.yaml --name composed > "$work/start.log" 2>&1 ||
  fail "ddpmctl start: $(cat "$work/start.log")"
run=$(grep -oE 'composed-[0-9]+' "$work/start.log" | head -n 1)
[ -n "$run" ] || fail "no run id in: $(cat "$work/start.log")"
step() { ctl get "$run" 2> /dev/null | awk '$1 == "step" {print $2; found = 1} END {if (!found) print 0}'; }
past() { [ "$(step)" -ge "$1" ]; }
completed() { ctl get "$1" 2> /dev/null | grep -qE '^  state +COMPLETED$'; }
wait_until 180 "$run did not reach step 150" past 150
say "$run at step $(step), $(ctl get "$run" | awk '$1 == "placement" {$1 = ""; print "on" $0}')"

say "5. the coordinator's container restarted: the run goes on"
before=$(step)
[ "$before" -lt 2000 ] || fail "$run ended before the coordinator's restart: make it longer"
compose restart --timeout 10 coordinator > "$work/restart.log" 2>&1 || fail "docker-compose restart"
wait_until 120 "the coordinator's health check did not pass after its restart" healthy coordinator
wait_until 240 "$run did not complete after the restart" completed "$run"
ctl get "$run" > "$work/get.txt" 2> "$work/get.err"
grep -qE '^  step +2000 ' "$work/get.txt" || fail "not at step 2000: $(cat "$work/get.txt")"
# The same run, not a new one: one run in the registry, no restart from step 0 (the
# coordinator's restart is not a lost group).
[ "$(ctl list | grep -c 'composed-')" = 1 ] || fail "more than one run: $(ctl list)"
grep -qE '^  restarts +0 ' "$work/get.txt" || fail "the run was restarted: $(cat "$work/get.txt")"
if grep -qE -- '[A-Z] +-> (FAILED|QUEUED)' "$work/get.txt"; then fail "the run failed: $(cat "$work/get.txt")"; fi
say "completed at step 2000 (step $before when the coordinator restarted)"

say "6. the run's files on the shared volume"
run_dir=$(awk '$1 == "run" && $2 == "dir" {print $3}' "$work/get.txt")
case $run_dir in /data/*) ;; *) fail "the run directory is not on the volume: $run_dir" ;; esac
compose exec -T coordinator ls -R "$run_dir" \
  > "$work/files.log" 2>&1 || fail "the run directory on the volume: $(cat "$work/files.log")"
grep -q 'step_000002000' "$work/files.log" || fail "no final checkpoint: $(cat "$work/files.log")"
grep -q '\.png' "$work/files.log" || fail "no sample images: $(cat "$work/files.log")"

say "7. the MPIJob of deploy/kubernetes, its pods played by containers: sshd workers, mpirun"
# What the MPI Operator does for the manifest: a key pair (its Secret) mounted at
# sshAuthMountPath, the Worker replicas running the manifest's command, a hostfile of their
# names with slotsPerWorker slots each, and the Launcher running the manifest's command, with
# $(MPIJOB_NAME) expanded as the kubelet expands it. The coordinator's Service name resolves to
# the coordinator's container.
compose stop worker > /dev/null 2>&1 || fail "docker-compose stop worker"
/usr/bin/python3 - "$src/deploy/kubernetes/base/worker-group.yaml" "$work" <<'PY' ||
import sys, yaml
manifest, work = sys.argv[1:]
job = yaml.safe_load(open(manifest))
spec = job["spec"]
name = job["metadata"]["name"]
launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
assert launcher["command"][:2] == ["sh", "-c"], launcher["command"]
open(f"{work}/launcher.sh", "w").write(launcher["command"][2].replace("$(MPIJOB_NAME)", name))
open(f"{work}/worker.cmd", "w").write("\n".join(worker["command"]) + "\n")
replicas = spec["mpiReplicaSpecs"]["Worker"]["replicas"]
assert replicas == 2, replicas
open(f"{work}/hostfile", "w").write(
    "".join(f"{name}-worker-{i} slots={spec['slotsPerWorker']}\n" for i in range(replicas)))
assert spec["sshAuthMountPath"] == "/home/ddpm/.ssh", spec["sshAuthMountPath"]
open(f"{work}/job.name", "w").write(name)
PY
  fail "reading the MPIJob manifest"
job_name=$(cat "$work/job.name")
mapfile -t worker_command < "$work/worker.cmd"
network=$(podman inspect --format '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' \
  "${project}_coordinator_1")
coordinator_ip=$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
  "${project}_coordinator_1")
mkdir -p "$work/ssh"
chown 10001:10001 "$work/ssh"
podman run --rm -v "$work/ssh:/keys" localhost/ddpm-train:cpu \
  ssh-keygen -q -t rsa -b 3072 -N '' -C "$job_name" -f /keys/id_rsa || fail "ssh-keygen"
cp "$work/ssh/id_rsa.pub" "$work/ssh/authorized_keys"
chown 10001:10001 "$work/ssh/authorized_keys"
chmod 644 "$work/hostfile"
pod() {  # NAME [PODMAN RUN ARGS...] -- COMMAND...: a container as a pod of the job would run
  local pod_name=$1
  shift
  podman run -d --name "$project-$pod_name" --hostname "$job_name-$pod_name" --network "$network" \
    --network-alias "$job_name-$pod_name" --add-host "ddpm-coordinator:$coordinator_ip" \
    -v "$work/ssh:/home/ddpm/.ssh:ro" -v "$work/deploy/secrets/worker.token:/run/secrets/ddpm/worker_token:ro" \
    -v "${project}_ddpm-data:/data" --shm-size 1g "$@" > /dev/null
}
for i in 0 1; do
  pod "worker-$i" localhost/ddpm-train:cpu "${worker_command[@]}" || fail "worker pod $i"
done
listening() { podman exec "$project-worker-$1" sh -c 'cat /proc/net/tcp /proc/net/tcp6 | grep -q ":08AE "'; }
wait_until 30 "sshd did not listen on 2222 in worker pod 0" listening 0
wait_until 30 "sshd did not listen on 2222 in worker pod 1" listening 1
pod launcher -v "$work/hostfile:/etc/mpi/hostfile:ro" -e OMP_NUM_THREADS=1 -e NCCL_DEBUG=WARN \
  localhost/ddpm-train:cpu sh -c "$(cat "$work/launcher.sh")" || fail "the launcher pod"
registered() { compose logs coordinator 2> /dev/null | grep -q "group $job_name registered (2 ranks)"; }
wait_until 90 "the MPIJob's group $job_name did not register" registered
for i in 0 1; do
  podman exec "$project-worker-$i" pgrep -x ddpm_worker > /dev/null ||
    fail "no rank of the group runs in worker pod $i"
done
ctl start /tmp/mpijob.yaml --name mpijob > "$work/start-mpijob.log" 2>&1 ||
  fail "ddpmctl start: $(cat "$work/start-mpijob.log")"
wait_until 240 "mpijob-2 did not complete on the MPIJob's group" completed mpijob-2
ctl get mpijob-2 > "$work/get-mpijob.txt" 2> "$work/get.err"
grep -qE "^  placement +group $job_name: 2 ranks" "$work/get-mpijob.txt" ||
  fail "not placed on the MPIJob's group: $(cat "$work/get-mpijob.txt")"
say "mpijob-2 completed on group $job_name: one rank in each worker pod, started over ssh"
say "PASS"
