#!/usr/bin/env bash
# The deploy artifacts' check (a step of ./test.sh). Installs what it needs, then:
#   1. the Helm chart: rendered for every preset and variant with Helm's engine, offline;
#      helm lint; values schema; yamllint; every object against the Kubernetes schemas (and a
#      structural check of the CRD kinds); the restricted profile on every container; the
#      settings are ones the binaries read; deploy/rendered/ in sync with the chart
#   2. the air-gapped bundle (scripts/bundle.sh), from the binaries in --bin-dir
#   3. the bundle installed with no network, its systemd units verified, and the system run
#      from the install as the image runs it (read-only root, arbitrary UID), with a workload,
#      a live /metrics compared with the Grafana dashboard and the alert rules
#
#   scripts/check-deploy.sh [--bin-dir DIR] [--no-vendor]
#
# --bin-dir: gateway-plugin, queue-worker, faas-async and stats-function (default: the debug
# binaries `cargo test` built). --no-vendor: a bundle without the vendored crates, announced
# loudly; ./test.sh does not use it. Fails loudly; never skips.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin_dir="${CARGO_TARGET_DIR:-$root/target}/debug"
bundle_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --no-vendor) bundle_args+=(--no-vendor); shift ;;
    *) echo "check-deploy: unknown argument $1" >&2; exit 2 ;;
  esac
done
step_start=$(date +%s)
took() { local now; now=$(date +%s); echo "    ($(( now - step_start ))s)"; step_start=$now; }

echo "==> deploy: tools (.tools/venv: Helm engine, kubernetes-validate, yamllint; systemd-analyze)"
"$root/scripts/install-tools.sh" > /dev/null
"$root/.tools/venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/deploy/requirements.txt
missing=()
command -v systemd-analyze > /dev/null || missing+=(systemd)
command -v setpriv > /dev/null || missing+=(util-linux)
command -v unshare > /dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "    installing Debian packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi
[ "$(id -u)" = 0 ] || { echo "check-deploy: must run as root (mount and network namespaces)" >&2; exit 1; }
for b in gateway-plugin queue-worker faas-async stats-function; do
  [ -x "$bin_dir/$b" ] || { echo "check-deploy: $bin_dir/$b is missing: build the binaries first (cargo test does)" >&2; exit 1; }
done
took

echo "==> deploy: Helm chart, rendered manifests, schemas, restricted profile"
"$root/.tools/venv/bin/python" scripts/deploy/manifests.py check --bin-dir "$bin_dir"
took

echo "==> deploy: air-gapped bundle"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
bundle="$(scripts/bundle.sh --bin-dir "$bin_dir" --out "$out" "${bundle_args[@]}" | tail -n 1)"
took

echo "==> deploy: bundle installed offline and run (units, sandbox, round trips, metrics)"
"$root/.tools/venv/bin/python" scripts/deploy/system_test.py --bundle "$bundle"
took
echo "==> deploy: all checks passed"
