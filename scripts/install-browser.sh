#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser test if it is not there, and prints
# its path on the last line. Needs root (apt-get) on a machine without it; fails loudly.
set -euo pipefail
for candidate in "${CHROMIUM_BIN:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    echo "$candidate"
    exit 0
  fi
done
command -v apt-get >/dev/null || { echo "install-browser: no chromium and no apt-get; install Chromium and set CHROMIUM_BIN" >&2; exit 1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-browser: installing Debian's chromium" >&2
$sudo apt-get install -y --no-install-recommends chromium >&2 \
  || { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends chromium >&2; }
[ -x /usr/bin/chromium ] || { echo "install-browser: /usr/bin/chromium missing after install" >&2; exit 1; }
/usr/bin/chromium --version >&2
echo /usr/bin/chromium
