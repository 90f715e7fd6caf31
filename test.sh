#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs formatting,
# lints and every test. Fails loudly; never skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Each stage's time, printed at the end (and on failure), so the suite's growth shows in every
# CI log: it should stay well under 20 minutes on the 2-core CI machine.
SUITE_BUDGET_SECONDS="${SUITE_BUDGET_SECONDS:-1200}"
stage_names=()
stage_seconds=()
stage_name=""
stage_started=$SECONDS
suite_started=$SECONDS
stage() {
    end_stage
    stage_name="$1"
    stage_started=$SECONDS
    echo "==> $1"
}
end_stage() {
    if [ -n "$stage_name" ]; then
        stage_names+=("$stage_name")
        stage_seconds+=("$((SECONDS - stage_started))")
        stage_name=""
    fi
}
summary() {
    local status=$?
    end_stage
    echo "==> time per stage (s)"
    local i
    for i in "${!stage_names[@]}"; do
        printf '%6d  %s\n' "${stage_seconds[$i]}" "${stage_names[$i]}"
    done
    local total=$((SECONDS - suite_started))
    printf '%6d  total\n' "$total"
    if [ "$total" -gt "$SUITE_BUDGET_SECONDS" ]; then
        echo "test.sh: WARNING: the suite took ${total} s, over its budget of ${SUITE_BUDGET_SECONDS} s; find the stage that grew" >&2
    fi
    return "$status"
}
trap summary EXIT

stage "installing test tools (pinned nats-server, standardwebhooks)"
NATS_SERVER_BIN="$(./scripts/install-tools.sh | tail -n 1)"
export NATS_SERVER_BIN
"$NATS_SERVER_BIN" --version

stage "installing the browser for the dashboard test (Debian chromium)"
CHROMIUM_BIN="$(./scripts/install-browser.sh | tail -n 1)"
export CHROMIUM_BIN

# Incremental caches only help repeated local builds; on a fresh clone they double the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
stage "disk space where the build goes"
df -h . | tail -n 1
avail_kib="$(df -Pk . | awk 'NR == 2 { print $4 }')"
if [ "${avail_kib:-0}" -lt 3145728 ]; then
    echo "test.sh: less than 3 GiB free here; the build (about 1.7 GiB) and the tests' stores need it" >&2
    exit 1
fi

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "cargo test"
# Tests start their own nats-server processes; a few at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}"

stage "HTTP API against its OpenAPI document (schemathesis, live gateway)"
# Uses the debug faas-async cargo test just built; installs schemathesis into .tools/venv.
./scripts/schemathesis.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"
# 10 s per target here keeps the suite's time in bounds; longer runs: README "Fuzzing".
export FUZZ_SECONDS="${FUZZ_SECONDS:-10}"
stage "fuzzing (scripts/fuzz.sh, FUZZ_SECONDS=${FUZZ_SECONDS} per target)"
./scripts/fuzz.sh

stage "deploy artifacts: chart and rendered manifests, image runtime, systemd units, bundle, dashboard"
# Uses the debug binaries cargo test just built; installs its Python tools into .tools/venv.
./scripts/check-deploy.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"
stage "target directory size"
du -sh target 2>/dev/null || true
