#!/usr/bin/env bash
# build.sh SOCK... — builds drover-postgres:15 (PostgreSQL 15 from Debian's
# packages) on the first engine and loads it into the others. The root
# filesystem is made once with `debootstrap --variant=minbase` and kept,
# as a tarball, under /var/lib/drover-lab/cache: later labs only import it.
# `build.sh --rootfs-only` makes that tarball and nothing else.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: build.sh ENGINE_SOCK..." >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
cache=${DROVER_LAB_CACHE:-/var/lib/drover-lab/cache}
rootfs=$cache/postgres15-rootfs.tar
# The same files unpacked: clients (psql, pgbench) run from it in a lab host.
root=$cache/postgres15-root
mkdir -p "$cache"
if [ ! -s "$rootfs" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  work=$(mktemp -d "$cache/pgroot.XXXXXX")
  echo "building the PostgreSQL root filesystem with debootstrap from $mirror (once)" >&2
  debootstrap --variant=minbase --include=postgresql-15,util-linux bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; rm -rf "$work"; exit 1; }
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  # The package made a cluster of its own; the image makes its own in $PGDATA.
  rm -rf "$work/root/var/lib/postgresql/15/main" "$work/root/etc/postgresql/15/main"
  tar -C "$work/root" -cf "$rootfs.tmp" . && mv "$rootfs.tmp" "$rootfs"
  rm -rf "$work"
fi
if [ ! -x "$root/usr/lib/postgresql/15/bin/pgbench" ]; then
  rm -rf "$root.tmp" && mkdir -p "$root.tmp" && tar -C "$root.tmp" -xf "$rootfs" && rm -rf "$root" && mv "$root.tmp" "$root"
fi
[ "$1" = --rootfs-only ] && exit 0
first=$1; shift
docker -H "unix://$first" import "$rootfs" drover-postgres-rootfs:15 >/dev/null
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$here/entrypoint.sh" "$ctx/"
DOCKER_BUILDKIT=0 docker -H "unix://$first" build -q -t drover-postgres:15 "$ctx" >/dev/null
if [ $# -gt 0 ]; then
  docker -H "unix://$first" save drover-postgres:15 -o "$ctx/image.tar"
  for sock in "$@"; do docker -H "unix://$sock" load -q -i "$ctx/image.tar" >/dev/null; done
fi
echo "drover-postgres:15 on $((1 + $#)) engine(s)" >&2
