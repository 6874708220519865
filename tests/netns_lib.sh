# shellcheck shell=bash
# Several hosts on one machine, for tests/multihost.sh and bench/multihost_allreduce.sh: three
# network namespaces, each with its own UTS namespace (hostname hosta, hostb, hostc) and an
# address on a veth bridge (10.77.0.1-3), and an agent that Open MPI's launcher uses in place of
# ssh to start a process on a host. Source it after defining say, fail and skip (skip exits 77
# saying why); it makes $work, and removes it, the namespaces and every process it knows of
# (pids) on exit.
#   netns_hosts              makes the hosts (skips where namespaces cannot be made)
#   on HOST COMMAND...       COMMAND on HOST in this process (exec): `on ... &` gives its PID
#   run_on HOST COMMAND...   the same in a subshell, for the foreground
#   "${mpi[@]}"              mpirun's flags to reach the hosts and use TCP between them
work=$(mktemp -d)
pre=dd$$  # interface and namespace names (interface names have at most 15 characters)
hosts=(hosta hostb hostc)
pids=()
netns_cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
  for h in "${hosts[@]}"; do
    for pid in $(ip netns pids "$pre-$h" 2> /dev/null); do kill -KILL "$pid" 2> /dev/null || true; done
    ip netns delete "$pre-$h" 2> /dev/null || true
    rm -rf "/etc/netns/$pre-$h"
  done
  for i in 0 1 2; do ip link delete "${pre}v$i" 2> /dev/null || true; done
  ip link delete "${pre}br" 2> /dev/null || true
  rm -rf "$work"
}
trap netns_cleanup EXIT
on() {
  local host=$1
  shift
  exec ip netns exec "$pre-$host" unshare -u sh -c 'hostname "$0"; exec "$@"' "$host" "$@"
}
run_on() { (on "$@"); }
netns_hosts() {
  [ "$(id -u)" = 0 ] || skip "namespaces need root (running as uid $(id -u))"
  ip link add "${pre}br" type bridge 2> "$work/ip.err" || skip "cannot make a bridge: $(cat "$work/ip.err")"
  ip link set "${pre}br" up
  local i h
  for i in 0 1 2; do
    h=${hosts[$i]}
    ip netns add "$pre-$h" 2> "$work/ip.err" || skip "cannot make a network namespace: $(cat "$work/ip.err")"
    # Entering one makes / a slave mount in a new mount namespace, which fails where / is not
    # a mount point (a chroot into a plain directory).
    ip netns exec "$pre-$h" true 2> "$work/ip.err" ||
      skip "cannot enter a network namespace: $(cat "$work/ip.err")"
    ip link add "${pre}v$i" type veth peer name eth0 netns "$pre-$h" 2> "$work/ip.err" ||
      skip "cannot make a veth pair: $(cat "$work/ip.err")"
    ip link set "${pre}v$i" master "${pre}br" up
    ip -n "$pre-$h" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$pre-$h" link set eth0 up
    ip -n "$pre-$h" link set lo up
    # ip netns exec mounts /etc/netns/NAME/hosts over /etc/hosts: every host knows the others.
    mkdir -p "/etc/netns/$pre-$h"
    printf '127.0.0.1 localhost\n10.77.0.1 hosta\n10.77.0.2 hostb\n10.77.0.3 hostc\n' \
      > "/etc/netns/$pre-$h/hosts"
  done
  run_on hosta hostname > "$work/uts.out" 2>&1 || skip "cannot make a UTS namespace: $(cat "$work/uts.out")"
  [ "$(run_on hostb hostname)" = hostb ] || fail "hostb's hostname is $(run_on hostb hostname)"
  # Open MPI's launcher reaches a host through this in place of ssh.
  cat > "$work/agent.sh" <<AGENT
#!/bin/sh
host=\$1
shift
exec ip netns exec "$pre-\$host" unshare -u sh -c 'hostname "\$0"; exec sh -c "\$1"' "\$host" "\$*"
AGENT
  chmod +x "$work/agent.sh"
  # shellcheck disable=SC2034  # used by the scripts that source this
  mpi=(--mca plm_rsh_agent "$work/agent.sh" --mca oob_tcp_if_include 10.77.0.0/24
    --mca btl_tcp_if_include 10.77.0.0/24 --mca btl "tcp,self,vader" --oversubscribe)
}
