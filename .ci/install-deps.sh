#!/usr/bin/env bash
# Installs and starts what drover's tests, lab and demo need on a fresh
# Debian 12 machine: Debian packages, staticcheck, a running zfs-fuse
# daemon and /dev/net/tun. Idempotent and quick when all is there. It does
# not start a system dockerd: every lab host starts its own engine.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/go/bin:$HOME/go/bin:/usr/sbin:/sbin:$PATH

packages=(zfs-fuse docker.io iproute2 iptables procps psmisc kmod systemd util-linux
  iputils-ping curl make git ca-certificates wireguard-tools debootstrap docker-registry
  prometheus  # promtool checks the metrics endpoint
  dnsutils)   # dig asks droverd's DNS from a lab host
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  # Package scripts must not try to start services (no systemd as PID 1 here).
  printf '#!/bin/sh\nexit 101\n' | $sudo_ tee /usr/sbin/policy-rc.d >/dev/null
  $sudo_ chmod +x /usr/sbin/policy-rc.d
  $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  $sudo_ rm -f /usr/sbin/policy-rc.d
fi

if ! command -v staticcheck >/dev/null; then
  echo "install-deps: installing staticcheck" >&2
  go install honnef.co/go/tools/cmd/staticcheck@latest
fi

if [ "$(id -u)" = 0 ]; then
  if [ ! -c /dev/net/tun ]; then
    mkdir -p /dev/net
    mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
  fi
  modprobe tun 2>/dev/null || true
  if ! pgrep -x zfs-fuse >/dev/null; then
    echo "install-deps: starting zfs-fuse" >&2
    mkdir -p /var/run/zfs /var/lock/zfs
    zfs-fuse --no-kstat-mount 2>/dev/null || zfs-fuse
  fi
  for _ in $(seq 1 50); do
    zpool list >/dev/null 2>&1 && break
    sleep 0.2
  done
  zpool list >/dev/null 2>&1 || { echo "install-deps: zfs-fuse does not answer" >&2; exit 1; }
fi
echo "install-deps: ready" >&2
