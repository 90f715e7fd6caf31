#!/usr/bin/env bash
# Installs faas-async from this bundle. Uses nothing but the files next to it: no network,
# no package manager, no compiler.
#
#   ./install.sh [--prefix /opt/faas-async] [--config-dir /etc/faas-async]
#                [--systemd-dir /etc/systemd/system] [--no-systemd]
#
# What goes where:
#   PREFIX/bin/                      gateway-plugin, queue-worker, faas-async, stats-function, nats-server
#   PREFIX/share/faas-async/         chart, rendered manifests, Grafana dashboard, units, README, sources
#   CONFIG_DIR/                      *.env and nats.conf (kept if they exist: your settings stay)
#   SYSTEMD_DIR/                     the units, pointing at PREFIX and CONFIG_DIR (not enabled)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=/opt/faas-async
config_dir=/etc/faas-async
systemd_dir=/etc/systemd/system
systemd=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --config-dir) config_dir="$2"; shift 2 ;;
    --systemd-dir) systemd_dir="$2"; shift 2 ;;
    --no-systemd) systemd=no; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix$config_dir$systemd_dir" in
  *"|"*) echo "install.sh: paths must not contain '|'" >&2; exit 2 ;;
esac

echo "==> checking the bundle (SHA256SUMS)"
(cd "$here" && sha256sum --quiet --strict -c SHA256SUMS) || {
  echo "install.sh: the bundle is damaged or was changed: SHA256SUMS does not match" >&2; exit 1; }

arch="$(uname -m)"
want_arch="$(cat "$here/ARCH")"
[ "$arch" = "$want_arch" ] || { echo "install.sh: this bundle is for $want_arch, this machine is $arch" >&2; exit 1; }

echo "==> binaries into $prefix/bin"
install -d -m 0755 "$prefix/bin" "$prefix/share/faas-async"
for b in "$here"/bin/*; do
  install -m 0755 "$b" "$prefix/bin/"
done

echo "==> chart, manifests, dashboard, units and sources into $prefix/share/faas-async"
for d in chart rendered grafana systemd src; do
  [ -e "$here/$d" ] || continue
  rm -rf "${prefix:?}/share/faas-async/$d"
  cp -R "$here/$d" "$prefix/share/faas-async/$d"
done
install -m 0644 "$here/README.md" "$here/VERSION" "$here/SHA256SUMS" "$prefix/share/faas-async/"

echo "==> settings into $config_dir (existing files are kept)"
install -d -m 0755 "$config_dir"
install -d -m 0750 "$config_dir/secrets"
for f in "$here"/systemd/env/*; do
  dest="$config_dir/$(basename "$f")"
  if [ -e "$dest" ]; then
    echo "    kept $dest"
  else
    sed -e "s|/opt/faas-async|$prefix|g" -e "s|/etc/faas-async|$config_dir|g" "$f" > "$dest"
    chmod 0644 "$dest"
  fi
done

if [ "$systemd" = yes ]; then
  echo "==> systemd units into $systemd_dir"
  install -d -m 0755 "$systemd_dir"
  for u in "$here"/systemd/*.service; do
    sed -e "s|/opt/faas-async|$prefix|g" -e "s|/etc/faas-async|$config_dir|g" "$u" > "$systemd_dir/$(basename "$u")"
    chmod 0644 "$systemd_dir/$(basename "$u")"
  done
  echo "    then: systemctl daemon-reload && systemctl enable --now faas-async.service"
  echo "    (or faas-async-nats, faas-async-gateway and faas-async-worker for JetStream)"
fi
echo "installed faas-async $(cat "$here/VERSION") into $prefix"
