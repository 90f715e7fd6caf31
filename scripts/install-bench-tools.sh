#!/usr/bin/env bash
# Tools the benchmarks compare against (not needed by the tests): wrk, to check that the load
# harness's raw-HTTP baseline is not limited by its own client. Debian's package.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
    command -v wrk
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-bench-tools: no apt-get here; install wrk from your distribution" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get install -y wrk >&2 || { $SUDO apt-get update >&2 && $SUDO apt-get install -y wrk >&2; }
command -v wrk
