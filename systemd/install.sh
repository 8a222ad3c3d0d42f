#!/usr/bin/env bash
# Installs drover on this machine: droverd and droverctl into
# $PREFIX/bin, the systemd units into $UNITDIR, and the `drover` group
# that may use the control socket. Run as root from a built tree (make
# install). DESTDIR stages the files elsewhere (packaging); then the
# group is not created and systemd is not told.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DESTDIR=${DESTDIR:-}

for b in droverd droverctl drover-hold; do
  [ -x "$here/bin/$b" ] || { echo "install: $here/bin/$b is missing: run make build first" >&2; exit 1; }
done
install -d -m 0755 "$DESTDIR$PREFIX/bin" "$DESTDIR$UNITDIR"
install -m 0755 "$here/bin/droverd" "$here/bin/droverctl" "$here/bin/drover-hold" "$DESTDIR$PREFIX/bin/"
for u in droverd.service drover-drain.service; do
  # The units name /usr/local/bin; another PREFIX is written into them.
  sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$here/systemd/$u" >"$DESTDIR$UNITDIR/$u.tmp"
  chmod 0644 "$DESTDIR$UNITDIR/$u.tmp"
  mv "$DESTDIR$UNITDIR/$u.tmp" "$DESTDIR$UNITDIR/$u"
done
echo "install: binaries in $DESTDIR$PREFIX/bin, units in $DESTDIR$UNITDIR"

if [ -n "$DESTDIR" ]; then
  exit 0
fi
if ! getent group drover >/dev/null; then
  groupadd --system drover
  echo "install: created group drover (members may run droverctl)"
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install: enable with: systemctl enable --now droverd.service drover-drain.service"
else
  echo "install: systemd is not running here; units are in place for when it does"
fi
