#!/usr/bin/env bash
# Runs one of our binaries the way the container image runs it, without a container engine:
# a private mount namespace whose root is a read-only tmpfs holding only the C runtime and the
# binary at its image path (/usr/local/bin/NAME), no shell and no other program; the two image
# volumes, /var/lib/faas-async and /tmp, bound from the given directories; the working
# directory of the image; and a non-root UID with group 0 and no capabilities (setpriv with
# --no-new-privs), as OpenShift's arbitrary UIDs run. The network is the host's (loopback).
#
#   sandbox.sh --uid 1000680000 --state DIR --tmp DIR --binary PATH [--workdir DIR] -- ARGS...
#
# The environment is passed through as it is: the caller sets the image's ENV (system_test.py
# reads them from the Dockerfile). Needs root (to build the mount namespace); the binary does
# not keep it.
set -euo pipefail
uid="" state="" tmp="" binary="" workdir="/var/lib/faas-async"
while [ $# -gt 0 ]; do
  case "$1" in
    --uid) uid="$2"; shift 2 ;;
    --state) state="$2"; shift 2 ;;
    --tmp) tmp="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "sandbox: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in uid state tmp binary; do
  [ -n "${!v}" ] || { echo "sandbox: --$v is required" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "sandbox: must run as root to build the mount namespace" >&2; exit 2; }
[ "$uid" != 0 ] || { echo "sandbox: the binary must not run as root" >&2; exit 2; }
setpriv_bin="$(command -v setpriv)" || { echo "sandbox: setpriv (util-linux) is required" >&2; exit 2; }
name="$(basename "$binary")"
# An empty mount point (left behind, in the caller's temporary directory). Every step below
# exec()s the next, so the binary keeps this process's PID and gets the caller's signals.
root="$(mktemp -d "${TMPDIR:-/tmp}/sandbox-root.XXXXXX")"
exec unshare --mount --propagation private -- bash -euo pipefail -c '
  root="$1" binary="$2" name="$3" state="$4" tmp="$5" setpriv_bin="$6" uid="$7" workdir="$8"
  shift 8
  mount -t tmpfs -o mode=0755,size=8m sandbox "$root"
  mkdir -p "$root/usr/local/bin" "$root/var/lib/faas-async" "$root/tmp" "$root/proc" \
           "$root/dev" "$root/etc" "$root/.harness"
  ro_bind() { mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }
  # The C runtime: what distroless/cc carries (glibc, libgcc), here from the host.
  for d in /lib /lib64 /usr/lib /usr/lib64; do
    [ -e "$d" ] || continue
    if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$root$d"; else mkdir -p "$root$d"; ro_bind "$d" "$root$d"; fi
  done
  # CA certificates (distroless carries /etc/ssl/certs/ca-certificates.crt): the HTTP clients
  # load them at start.
  mkdir -p "$root/etc/ssl/certs"
  touch "$root/etc/ssl/certs/ca-certificates.crt"
  ro_bind /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  touch "$root/usr/local/bin/$name" "$root/.harness/setpriv"
  ro_bind "$binary" "$root/usr/local/bin/$name"
  ro_bind "$setpriv_bin" "$root/.harness/setpriv"
  for f in null zero urandom random; do touch "$root/dev/$f"; mount --bind "/dev/$f" "$root/dev/$f"; done
  printf "nonroot:x:65532:0:nonroot:/tmp:/sbin/nologin\n" > "$root/etc/passwd"
  printf "root:x:0:\nnonroot:x:65532:\n" > "$root/etc/group"
  printf "127.0.0.1 localhost\n::1 localhost\n" > "$root/etc/hosts"
  mount --bind "$state" "$root/var/lib/faas-async"
  mount --bind "$tmp" "$root/tmp"
  mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
  mount -o remount,ro,bind "$root"
  # No shell exists in there: unshare chroots and changes directory, setpriv drops to the UID
  # with group 0, no supplementary groups, no capabilities, and exec()s the binary.
  exec unshare --root="$root" --wd="$workdir" /.harness/setpriv \
    --reuid="$uid" --regid=0 --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs \
    -- "/usr/local/bin/$name" "$@"
' sandbox "$root" "$binary" "$name" "$state" "$tmp" "$setpriv_bin" "$uid" "$workdir" "$@"
