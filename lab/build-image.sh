#!/usr/bin/env bash
# build-image.sh SOCK... — builds drover-test:latest FROM scratch on the
# first engine and loads it into the others. No registry is involved.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: build-image.sh ENGINE_SOCK..." >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
(cd "$here/testimage" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$ctx/testimage" .)
cp "$here/testimage/Dockerfile" "$ctx/"
first=$1; shift
DOCKER_BUILDKIT=0 docker -H "unix://$first" build -q -t drover-test:latest "$ctx" >/dev/null
if [ $# -gt 0 ]; then
  docker -H "unix://$first" save drover-test:latest -o "$ctx/image.tar"
  for sock in "$@"; do docker -H "unix://$sock" load -q -i "$ctx/image.tar" >/dev/null; done
fi
echo "drover-test:latest on $((1 + $#)) engine(s)" >&2
