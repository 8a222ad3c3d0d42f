#!/usr/bin/env bash
# demo.sh — drover on a local 3-host lab: the hosts find each other by
# gossip, build a WireGuard mesh, and keep one Raft fact store over it.
# KEEP=1 leaves the lab up and prints how to use droverctl inside it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(cd "$here/.." && pwd)/bin
prefix=${LAB_PREFIX:-demo}
# Fast failure detection suits a demo; PRODUCTION_TIMING=1 runs the defaults.
timing=--lab-timing
[ "${PRODUCTION_TIMING:-0}" = 1 ] && timing=--lab-timing=false
lab=/var/lib/drover-lab/$prefix
run=/run/drover-lab/$prefix
export LAB_PREFIX=$prefix

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctl() { local h=$1; shift; "$bin/droverctl" --socket "$run/$h/drover.sock" "$@"; }

pids=()
teardown() {
  [ "${KEEP:-0}" = 1 ] && return
  # droverd leaves the cluster cleanly on SIGTERM; then the lab goes.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  "$here/lab.sh" down "$prefix"
}
trap teardown EXIT

say "bringing up 3 hosts (network namespaces, each with a ZFS pool and a Docker engine)"
"$here/lab.sh" up 3 "$prefix"
"$here/build-image.sh" $run/${prefix}{1,2,3}/docker.sock
# zfs-fuse needs the lab's shim in front of zfs (never on a production PATH).
export PATH=$here/zfs-shim:$PATH

start() {
  local i=$1; shift
  local h=$prefix$i
  nsenter --net=/var/run/netns/$h "$bin/droverd" --name "$h" --bind "10.77.0.$i" \
    --data-dir "$lab/$h/drover" --socket "$run/$h/drover.sock" --wg-interface "${h}wg" \
    --docker-host "unix://$run/$h/docker.sock" --zfs-parent "${h}pool/drover" \
    $timing "$@" >"$lab/$h/droverd.log" 2>&1 &
  pids+=($!)
  disown
  for _ in $(seq 1 100); do [ -S "$run/$h/drover.sock" ] && return; sleep 0.1; done
  echo "droverd on $h did not start; see $lab/$h/droverd.log" >&2; exit 1
}

say "starting droverd on ${prefix}1 and creating the cluster"
start 1
ctl ${prefix}1 cluster init
token=$(ctl ${prefix}1 cluster join-token 2>/dev/null)

say "joining ${prefix}2 and ${prefix}3 with the join token"
for i in 2 3; do start $i; ctl $prefix$i cluster join <<<"$token"; done

say "waiting for the mesh (overlay addresses, WireGuard handshakes) and three Raft voters"
for _ in $(seq 1 120); do
  n=$(ctl ${prefix}1 machine ls --json | grep -c '"last_handshake"' || true)
  v=$(ctl ${prefix}1 cluster status --json | grep -c '"suffrage": "voter"' || true)
  [ "$n" -ge 2 ] && [ "$v" -ge 3 ] && break
  sleep 0.5
done
ctl ${prefix}1 machine ls
say "mesh status on ${prefix}2"
ctl ${prefix}2 mesh status
say "Raft, seen from ${prefix}3"
ctl ${prefix}3 cluster status

say "deploying a service with a ZFS volume onto ${prefix}2 (preview first)"
manifest=$lab/shop.toml
cat >"$manifest" <<TOML
namespace = "shop"

[services.web]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "${prefix}2"

[[services.web.ports]]
port = 80
target = 8080

[[services.web.volumes]]
name = "data"
path = "/data"
quota = "256MiB"

[services.web.readiness]
http = "/healthz"
interval = "300ms"
TOML
cat "$manifest"
ctl ${prefix}1 deploy preview -f "$manifest"
ctl ${prefix}1 deploy -f "$manifest"
ip=$(ctl ${prefix}1 service ls --json | sed -n 's/.*"service_ip": "\(.*\)".*/\1/p' | head -1)

say "writing through the service IP $ip from ${prefix}3, over the mesh"
for i in 1 2 3; do
  nsenter --net=/var/run/netns/${prefix}3 curl -s -XPOST --data "order $i" "http://$ip/write?key=order-$i"
done
say "the data is in ${prefix}2's ZFS dataset"
ls -l "$lab/mnt/${prefix}2/drover/shop/data"
ctl ${prefix}2 volume ls

say "moving shop/web from ${prefix}2 to ${prefix}3 while a client keeps writing to it"
# The client writes every 50 ms and notes each acknowledged write with the
# time it was acknowledged (ms).
: >"$lab/acked"
( i=0; while :; do
    i=$((i+1))
    nsenter --net=/var/run/netns/${prefix}1 curl -sf -m 1 -XPOST --data "live $i" "http://$ip/write?key=live-$i" >/dev/null &&
      echo "live-$i $(date +%s%3N)" >>"$lab/acked"
    sleep 0.05
  done ) &
client=$!
sleep 1
ctl ${prefix}1 migrate apply shop/web --to ${prefix}3
sleep 1
kill $client 2>/dev/null; wait $client 2>/dev/null || true
ctl ${prefix}1 service ls

say "checking every acknowledged write on ${prefix}3, and what the client saw"
lost=0
while read -r key _; do
  [ "$(cat "$lab/mnt/${prefix}3/drover/shop/data/$key" 2>/dev/null)" = "live ${key#live-}" ] || lost=$((lost+1))
done <"$lab/acked"
echo "$(wc -l <"$lab/acked") writes acknowledged during the move, $lost missing or different on ${prefix}3"
awk 'NR > 1 && $2 - last > gap { gap = $2 - last } { last = $2 } END { printf "longest time the client went without an acknowledged write: %d ms (it writes every ~50 ms)\n", gap }' "$lab/acked"
echo "reading the first order back through the service IP, now served by ${prefix}3: $(nsenter --net=/var/run/netns/${prefix}1 curl -sf "http://$ip/read?key=order-1")"
ctl ${prefix}1 migrate ls

say "cutting ${prefix}1 off the network"
ip link set v${prefix}1 down
sleep 6
ctl ${prefix}2 machine ls
ctl ${prefix}2 cluster status
say "bringing ${prefix}1 back: it rejoins by itself"
ip link set v${prefix}1 up
sleep 6
ctl ${prefix}1 machine ls

if [ "${KEEP:-0}" = 1 ]; then
  say "the lab stays up"
  cat <<EOF
droverctl talks to one host's daemon through its socket; pick a host with DROVER_SOCKET:
  export PATH=$bin:\$PATH DROVER_SOCKET=$run/${prefix}1/drover.sock
  droverctl machine ls
  droverctl service ls
  droverctl migrate apply shop/web --to ${prefix}2
  droverctl cluster probe --proposers 8 --count 500
  DROVER_SOCKET=$run/${prefix}3/drover.sock droverctl cluster status
Run a command inside a host (its network): nsenter --net=/var/run/netns/${prefix}3 curl -s http://$ip/hash
Logs: $lab/<host>/droverd.log. Tear the lab down (stops its daemons too): $here/lab.sh down $prefix
EOF
fi
