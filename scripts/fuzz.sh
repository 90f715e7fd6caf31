#!/usr/bin/env bash
# Fuzzes the inputs that cross trust boundaries (the targets of fuzz/src, one libFuzzer binary
# each in fuzz/libfuzzer) for a bounded time, on stable Rust: cargo-fuzz with --sanitizer none
# (coverage-guided libFuzzer; the project forbids unsafe code, so no sanitizer runtime).
#
#   scripts/fuzz.sh [TARGET...]      default: every target (envelope records callback_url
#                                    headers http1_response)
#
#   FUZZ_SECONDS       seconds per target (default 20)
#   FUZZ_JOBS          targets fuzzed at once, one core each (default: the number of CPUs)
#   FUZZ_TARGET_DIR    build directory (default ${CARGO_TARGET_DIR:-target}/fuzz)
#   CARGO_FUZZ_VERSION the cargo-fuzz to install (default 0.13.2)
#   FUZZ_TOOLS_DIR     where it is installed (default ~/.cache/faas-async/cargo-fuzz-VERSION)
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET) and the corpus earlier runs
# grew (fuzz/corpus/TARGET, kept out of git). A crashing input (a panic, a failed property, an
# allocation over the targets' memory limit, a hang over 10 s) is kept in
# fuzz/artifacts/TARGET/ and the script exits 1 after running every target. Installs what it
# needs (pinned), fails loudly, never skips a target.
set -euo pipefail
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
seconds="${FUZZ_SECONDS:-20}"
jobs="${FUZZ_JOBS:-$(nproc)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
all_targets=(envelope records callback_url headers http1_response)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all_targets[@]}")

fail() {
  echo "fuzz: $*" >&2
  exit 1
}

[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || fail "FUZZ_SECONDS must be a positive number of seconds, not '$seconds'"
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || fail "FUZZ_JOBS must be a positive number, not '$jobs'"
for t in "${targets[@]}"; do
  [ -f "fuzz/libfuzzer/fuzz_targets/$t.rs" ] || fail "unknown target '$t' (targets: ${all_targets[*]})"
done

# cargo-fuzz, pinned, built once per machine and version (outside the clone: CI clones afresh).
# libfuzzer-sys builds libFuzzer with the C++ compiler.
tools="${FUZZ_TOOLS_DIR:-${XDG_CACHE_HOME:-${HOME:-$root/.tools}/.cache}/faas-async/cargo-fuzz-$CARGO_FUZZ_VERSION}"
cargo_fuzz="$tools/bin/cargo-fuzz"
installed() { [ -x "$cargo_fuzz" ] && [ "$("$cargo_fuzz" --version 2>/dev/null)" = "cargo-fuzz $CARGO_FUZZ_VERSION" ]; }
command -v cargo >/dev/null || fail "cargo is required"
command -v c++ >/dev/null || fail "a C++ compiler (c++) is required to build libFuzzer (Debian: apt-get install g++)"
if ! installed; then
  echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools" >&2
  CARGO_TARGET_DIR="$tools/build" cargo install --quiet --locked --force \
    --root "$tools" --version "=$CARGO_FUZZ_VERSION" cargo-fuzz >&2 ||
    fail "cargo install cargo-fuzz $CARGO_FUZZ_VERSION failed"
  rm -rf "$tools/build"
  installed || fail "$cargo_fuzz is not cargo-fuzz $CARGO_FUZZ_VERSION after the install"
fi
export PATH="$tools/bin:$PATH"
echo "==> $(cargo fuzz --version), $(rustc --version)" >&2

# The fuzz workspace's lock file is committed: refuse to build with anything else.
cargo metadata --locked --format-version 1 --manifest-path fuzz/libfuzzer/Cargo.toml >/dev/null ||
  fail "fuzz/libfuzzer/Cargo.lock is out of date (cargo update --manifest-path fuzz/libfuzzer/Cargo.toml)"

target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz}"
echo "==> building the fuzz targets (release, coverage instrumentation, no sanitizer) in $target_dir" >&2
build_started=$SECONDS
cargo fuzz build --fuzz-dir fuzz/libfuzzer --sanitizer none --target-dir "$target_dir" ||
  fail "building the fuzz targets failed"
echo "==> built in $((SECONDS - build_started)) s" >&2
bin_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One target: its log and exit status into $work.
fuzz_one() {
  local t="$1" bin="$bin_dir/$1" corpus="fuzz/corpus/$1" artifacts="fuzz/artifacts/$1" status=0
  mkdir -p "$corpus" "$artifacts"
  # -rss_limit_mb backs up the targets' own allocation limit; -timeout catches hangs.
  local options=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
    -artifact_prefix="$artifacts/")
  # A dictionary of the tokens and boundary values of the target's format, where there is one.
  [ ! -f "fuzz/dicts/$t.dict" ] || options+=(-dict="fuzz/dicts/$t.dict")
  "$bin" "${options[@]}" "$corpus" "fuzz/seeds/$t" >"$work/$t.log" 2>&1 || status=$?
  echo "$status" >"$work/$t.status"
}

for t in "${targets[@]}"; do
  [ -x "$bin_dir/$t" ] || fail "$bin_dir/$t was not built"
done
echo "==> fuzzing ${targets[*]} for $seconds s each, $jobs at a time" >&2
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
wait || true

crashed=()
summary=()
for t in "${targets[@]}"; do
  log="$work/$t.log"
  status="$(cat "$work/$t.status" 2>/dev/null || echo "none")"
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
  if [ "$status" != 0 ]; then
    echo "==> $t failed (exit $status); the end of its log:" >&2
    tail -n 60 "$log" >&2
    crashed+=("$t")
    summary+=("$(printf '%-15s CRASHED (exit %s); inputs kept in fuzz/artifacts/%s/' "$t" "$status" "$t")")
  else
    summary+=("$(printf '%-15s ok  %10s execs  %7s exec/s  %s  corpus %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$(find "fuzz/corpus/$t" -type f | wc -l)")")
  fi
done

echo "==> fuzz summary ($seconds s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#crashed[@]}" -gt 0 ]; then
  echo "fuzz: crashed: ${crashed[*]}. Reproduce with $bin_dir/TARGET fuzz/artifacts/TARGET/FILE," >&2
  echo "fuzz: fix the product code and keep the input as a regression test (README, Fuzzing)." >&2
  exit 1
fi
