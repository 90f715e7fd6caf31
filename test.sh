#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs formatting,
# lints and every test. Fails loudly; never skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

echo "==> installing test tools (pinned nats-server)"
NATS_SERVER_BIN="$(./scripts/install-tools.sh | tail -n 1)"
export NATS_SERVER_BIN
"$NATS_SERVER_BIN" --version

echo "==> installing the browser for the dashboard test (Debian chromium)"
CHROMIUM_BIN="$(./scripts/install-browser.sh | tail -n 1)"
export CHROMIUM_BIN

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
# Tests start their own nats-server processes; a few at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"
