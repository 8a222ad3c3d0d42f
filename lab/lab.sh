#!/usr/bin/env bash
# lab.sh — several drover hosts on one machine, for tests and the demo.
#
#   lab.sh up N [PREFIX]     make hosts PREFIX1..PREFIXN (cleaning leftovers first)
#   lab.sh down [PREFIX]     remove everything a lab of that prefix made
#   lab.sh status [PREFIX]
#
# A host is a network namespace joined by a veth pair to a bridge, with its
# own underlay address, its own file-backed ZFS pool (served by the one
# zfs-fuse daemon) and, unless LAB_DOCKER=0, its own Docker engine started
# inside the namespace with nsenter. Nothing leaves the machine: the bridge
# has no uplink and no NAT.
set -euo pipefail

PREFIX=${LAB_PREFIX:-dl}
SUBNET=${LAB_SUBNET:-10.77.0}          # underlay: $SUBNET.i/24, bridge $SUBNET.254
POOL_SIZE=${LAB_POOL_SIZE:-2G}
LAB_DOCKER=${LAB_DOCKER:-1}
LAB_ZFS=${LAB_ZFS:-1}
STATE=/var/lib/drover-lab/$PREFIX
RUN=/run/drover-lab/$PREFIX
BRIDGE=${PREFIX}br0

log() { echo "lab: $*" >&2; }

host_names() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true; }

# container_pids: processes whose root filesystem lies in the lab's state
# dir, i.e. containers of its Docker engines. They run in network
# namespaces of their own, so `ip netns pids` does not list them, and they
# outlive a killed dockerd (their shims are not its children).
container_pids() {
  [ -d "$STATE" ] || return 0
  for f in /proc/[0-9]*/mountinfo; do
    # vfs: the root is a directory under the state dir; overlay2: an
    # overlay whose upper dir is.
    awk -v s="$STATE/" '$5 == "/" && (index($4, s) == 1 || index($0, "upperdir=" s) > 0) { found = 1 } END { exit !found }' "$f" 2>/dev/null &&
      basename "$(dirname "$f")"
  done
  return 0
}

# storage_driver is overlay2 where the state dir's filesystem carries it
# (ext4, xfs: a container of a large image starts in a moment), else vfs,
# which copies every layer into every container; LAB_STORAGE_DRIVER wins.
storage_driver() {
  if [ -n "${LAB_STORAGE_DRIVER:-}" ]; then echo "$LAB_STORAGE_DRIVER"; return; fi
  case "$(stat -f -c %T "$(dirname "$STATE")" 2>/dev/null)" in
    ext2/ext3|xfs|btrfs) echo overlay2 ;;
    *) echo vfs ;;
  esac
}

down() {
  # Containers first, through their engines while those still run.
  for ns in $(host_names); do
    sock=$RUN/$ns/docker.sock
    if [ -S "$sock" ] && command -v docker >/dev/null; then
      ids=$(timeout 20 docker -H "unix://$sock" ps -aq 2>/dev/null || true)
      [ -n "$ids" ] && { timeout 60 docker -H "unix://$sock" rm -f $ids >/dev/null 2>&1 || true; }
    fi
  done
  # Every process inside a host's namespace (droverd, dockerd).
  for ns in $(host_names); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  for _ in $(seq 1 30); do
    left=0
    for ns in $(host_names); do [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && left=1; done
    [ $left = 0 ] && break
    sleep 0.2
  done
  for ns in $(host_names); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  # Containers an engine could not remove (or a killed engine left).
  for pid in $(container_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  # Docker's mounts under the lab's state dir.
  if [ -d "$STATE" ]; then
    for m in $( (grep -F -e " $STATE/" -e " $RUN/" /proc/mounts || true) | awk '{print $2}' | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  if command -v zpool >/dev/null; then
    for pool in $(zpool list -H -o name 2>/dev/null | grep -E "^${PREFIX}[0-9]+pool$" || true); do
      # A pool whose datasets a just-killed process still held is "busy"
      # for a moment under zfs-fuse: retry before giving up.
      for try in $(seq 1 20); do
        zpool destroy -f "$pool" 2>/dev/null && break
        [ "$try" = 20 ] && log "could not destroy pool $pool"
        sleep 0.5
      done
    done
  fi
  for ns in $(host_names); do
    ip link del "v${ns}" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  while iptables -D FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null; do :; done
  rm -rf "$STATE" "$RUN"
  # wireguard-go UAPI sockets of the lab's devices (PREFIX<n>wg, see
  # e2e/lab_test.go), which outlive a killed daemon
  rm -f /var/run/wireguard/${PREFIX}[0-9]*wg.sock
}

up() {
  local n=$1
  down
  log "making $n hosts with prefix $PREFIX"
  mkdir -p "$STATE" "$RUN"
  # The kernel's ARP table is shared by every namespace: n hosts that all
  # talk to each other hold about n*n entries, past the default limit of
  # 1024 from about 32 hosts ("neighbor table overflow", and sends fail
  # with ENOBUFS). Raise it for labs of a few hundred hosts; never lower.
  local want=$(( n * n * 2 + 1024 ))
  if (( $(sysctl -n net.ipv4.neigh.default.gc_thresh3) < want )); then
    sysctl -qw net.ipv4.neigh.default.gc_thresh3=$want net.ipv4.neigh.default.gc_thresh2=$(( want / 2 )) net.ipv4.neigh.default.gc_thresh1=$(( want / 4 ))
  fi
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Nothing a lab host sends leaves through this machine, even where it
  # forwards packets (a Docker engine on the host turns that on).
  iptables -I FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null || log "iptables: could not fence the bridge"
  for i in $(seq 1 "$n"); do
    local ns=$PREFIX$i dir=$STATE/$PREFIX$i
    mkdir -p "$dir" "$RUN/$ns"
    ip netns add "$ns"
    ip link add "v$ns" type veth peer name eth0 netns "$ns"
    ip link set "v$ns" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # Nothing beyond the lab is reachable, and says so at once: a silent
    # default route made every name lookup of a host (the engine asking a
    # registry's name) wait out the resolver's timeouts, 20 s each, on a
    # machine whose resolver is not on the loopback.
    ip -n "$ns" route add unreachable default
    if [ "$LAB_ZFS" = 1 ]; then
      truncate -s "$POOL_SIZE" "$dir/pool.img"
      zpool create -f -m "$STATE/mnt/$ns" "${ns}pool" "$dir/pool.img"
    fi
    if [ "$LAB_DOCKER" = 1 ]; then start_docker "$ns"; fi
  done
  if [ "$LAB_DOCKER" = 1 ]; then
    for i in $(seq 1 "$n"); do wait_docker "$PREFIX$i"; done
  fi
  log "up: $(host_names | tr '\n' ' ')"
}

# start_docker NS: the host's Docker engine, in its network namespace.
start_docker() {
  local ns=$1 dir=$STATE/$1
  mkdir -p "$dir/docker" "$RUN/$ns/exec"
  nsenter --net=/var/run/netns/"$ns" dockerd \
    --data-root "$dir/docker" --exec-root "$RUN/$ns/exec" \
    --pidfile "$RUN/$ns/docker.pid" -H "unix://$RUN/$ns/docker.sock" \
    --storage-driver="$(storage_driver)" --insecure-registry "$SUBNET.0/24" \
    >>"$dir/dockerd.log" 2>&1 &
}

wait_docker() {
  local sock=$RUN/$1/docker.sock ok=0
  for _ in $(seq 1 150); do
    if docker -H "unix://$sock" version >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  [ $ok = 1 ] || { log "docker engine of $1 does not answer; see $STATE/$1/dockerd.log"; tail -5 "$STATE/$1/dockerd.log" >&2; exit 1; }
}

# kill_host NS: every process of one host dies at once, as when its power
# goes: droverd and the engine (in its namespace) and its containers.
kill_host() {
  local ns=$1 pid
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  STATE=$STATE/$ns
  for pid in $(container_pids); do kill -KILL "$pid" 2>/dev/null || true; done
}

status() {
  for ns in $(host_names); do
    echo "$ns $(ip -n "$ns" -4 -o addr show eth0 | awk '{print $4}')"
  done
}

[ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
cmd=${1:-}
case "$cmd" in up) arg=${3:-} ;; kill|docker-start) arg=${2%%[0-9]*} ;; *) arg=${2:-} ;; esac
if [ -n "$arg" ]; then PREFIX=$arg; STATE=/var/lib/drover-lab/$PREFIX; RUN=/run/drover-lab/$PREFIX; BRIDGE=${PREFIX}br0; fi
case "$cmd" in
  up) up "${2:?usage: lab.sh up N [PREFIX]}" ;;
  down) down; log "down" ;;
  status) status ;;
  kill) kill_host "${2:?usage: lab.sh kill HOST}"; log "killed $2" ;;
  docker-start) start_docker "${2:?usage: lab.sh docker-start HOST}"; wait_docker "$2" ;;
  *) echo "usage: lab.sh up N [PREFIX] | down [PREFIX] | status [PREFIX] | kill HOST | docker-start HOST" >&2; exit 2 ;;
esac
