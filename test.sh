#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs formatting,
# lints and every test. Fails loudly; never skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

echo "==> installing test tools (pinned nats-server, standardwebhooks)"
NATS_SERVER_BIN="$(./scripts/install-tools.sh | tail -n 1)"
export NATS_SERVER_BIN
"$NATS_SERVER_BIN" --version

echo "==> installing the browser for the dashboard test (Debian chromium)"
CHROMIUM_BIN="$(./scripts/install-browser.sh | tail -n 1)"
export CHROMIUM_BIN

# Incremental caches only help repeated local builds; on a fresh clone they double the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> disk space where the build goes"
df -h . | tail -n 1
avail_kib="$(df -Pk . | awk 'NR == 2 { print $4 }')"
if [ "${avail_kib:-0}" -lt 3145728 ]; then
    echo "test.sh: less than 3 GiB free here; the build (about 1.7 GiB) and the tests' stores need it" >&2
    exit 1
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
# Tests start their own nats-server processes; a few at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"

echo "==> HTTP API against its OpenAPI document (schemathesis, live gateway)"
# Uses the debug faas-async cargo test just built; installs schemathesis into .tools/venv.
./scripts/schemathesis.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"
# 10 s per target here keeps the suite's time in bounds; longer runs: README "Fuzzing".
export FUZZ_SECONDS="${FUZZ_SECONDS:-10}"
echo "==> fuzzing (scripts/fuzz.sh, FUZZ_SECONDS=${FUZZ_SECONDS} per target)"
./scripts/fuzz.sh

echo "==> deploy artifacts: chart and rendered manifests, image runtime, systemd units, bundle, dashboard"
# Uses the debug binaries cargo test just built; installs its Python tools into .tools/venv.
./scripts/check-deploy.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"
echo "==> target directory size"
du -sh target 2>/dev/null || true
