#!/usr/bin/env bash
# The HTTP API against its own OpenAPI document (a step of ./test.sh): starts the all-in-one
# faas-async as a gateway only (embedded queue in a temporary directory, a private port, an
# API token holding every scope; no worker, so no function is invoked and no callback is sent
# anywhere), waits for /readyz, and runs schemathesis on GET /openapi.json with the checks
#   not_a_server_error, status_code_conformance, content_type_conformance,
#   response_headers_conformance, response_schema_conformance,
#   unsupported_method
# on generated valid and hostile input, within a time budget (--max-time, 60 s: the whole run
# takes about 65 s on 2 cores). Prints how many calls the gateway queued and refused, by reason.
# Then stops the gateway and fails if schemathesis found anything, no call was queued, the
# gateway did not stop cleanly, or a handler panicked.
#
#   scripts/schemathesis.sh [--bin-dir DIR] [--max-time SECONDS] [--max-examples N] [--phases LIST]
#
# --bin-dir: where faas-async is (default: the debug binaries `cargo test` built).
# SCHEMATHESIS_SEED: replay a run with the seed it printed. Fails loudly; never skips.
set -euo pipefail
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${CARGO_TARGET_DIR:-$root/target}/debug"
max_time=60
max_examples=40
phases=examples,coverage,fuzzing
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --max-time) max_time="$2"; shift 2 ;;
    --max-examples) max_examples="$2"; shift 2 ;;
    --phases) phases="$2"; shift 2 ;;
    *) echo "schemathesis: unknown argument $1" >&2; exit 2 ;;
  esac
done
bin_dir="$(cd "$bin_dir" && pwd)"
server="$bin_dir/faas-async"
[ -x "$server" ] || { echo "schemathesis: $server is missing: build the binaries first (cargo test does)" >&2; exit 1; }

# The tools: the project's venv, and schemathesis pinned in it (installed once).
"$root/scripts/install-tools.sh" > /dev/null
python="$root/.tools/venv/bin/python3"
st="$root/.tools/venv/bin/st"
if ! { [ -x "$st" ] && "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '${SCHEMATHESIS_VERSION}')" 2>/dev/null; }; then
  echo "==> schemathesis: installing schemathesis ${SCHEMATHESIS_VERSION} into .tools/venv"
  "$python" -m pip install --quiet --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}" >&2
  "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '${SCHEMATHESIS_VERSION}')" ||
    { echo "schemathesis: schemathesis ${SCHEMATHESIS_VERSION} not importable by $python after install" >&2; exit 1; }
fi
[ -x "$st" ] || { echo "schemathesis: $st missing after install" >&2; exit 1; }

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A token for every scope: the authorization layer is in front of every route but the public
# ones, as in a deployment; only its hash is in the file.
token="st_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf 'schemathesis %s *\n' "$(printf %s "$token" | sha256sum | cut -d' ' -f1)" > "$work/tokens"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"

echo "==> schemathesis: faas-async --role gateway (embedded queue) on $base"
env -i PATH="$PATH" LOG_LEVEL=info "$server" --role gateway --queue embedded \
  --listen "127.0.0.1:$port" --queue-dir "$work/queue" --auth-tokens-file "$work/tokens" \
  > "$work/gateway.log" 2>&1 &
pid=$!

# Ready when /readyz answers 200; fails at once if the process exits, at the deadline if not.
"$python" - "$base/readyz" "$pid" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    try:
        os.kill(pid, 0)
        if open(f"/proc/{pid}/stat").read().split(") ")[-1].startswith("Z"):
            raise ProcessLookupError
    except ProcessLookupError:
        sys.exit("schemathesis: faas-async exited before it was ready")
    if time.monotonic() > deadline:
        sys.exit(f"schemathesis: {url} not ready within 60 s")
    time.sleep(0.1)
EOF

seed_args=()
if [ -n "${SCHEMATHESIS_SEED:-}" ]; then
  seed_args=(--seed "$SCHEMATHESIS_SEED")
fi
status=0
# From the work directory: schemathesis and hypothesis leave nothing in the repository.
(
  cd "$work"
  "$st" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,unsupported_method \
    --phases "$phases" \
    --mode all \
    --max-examples "$max_examples" \
    --max-time "$max_time" \
    --workers 1 \
    --request-timeout 10 \
    --max-redirects 0 \
    --generation-database none \
    --no-color \
    --header "Authorization: Bearer $token" \
    "${seed_args[@]}"
) || status=$?

# What the run reached: calls queued (the accept path end to end) and refused, by reason, from
# the gateway's own counters. A run that queued nothing never got past validation.
echo "==> schemathesis: calls the gateway queued and refused"
"$python" - "$base/metrics" "$token" <<'EOF' || status=1
import re, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {sys.argv[2]}"})
with urllib.request.urlopen(request, timeout=10) as r:
    text = r.read().decode()
def total(name):
    found = {}
    for line in text.splitlines():
        m = re.match(name + r'(\{[^}]*\})? ([0-9.e+]+)$', line)
        if m:
            found[m.group(1) or ""] = float(m.group(2))
    return found
submitted = sum(total("faas_async_submitted_total").values())
refused = total("faas_async_refused_total")
print(f"    queued: {submitted:.0f}")
for labels, n in sorted(refused.items(), key=lambda kv: -kv[1]):
    print(f"    refused {labels}: {n:.0f}")
if submitted == 0:
    sys.exit("schemathesis: no call was queued: the generated calls never reached the queue")
EOF

echo "==> schemathesis: stopping the gateway"
kill -TERM "$pid"
gateway_status=0
wait "$pid" || gateway_status=$?
pid=""
if grep -q "panicked" "$work/gateway.log"; then
  echo "schemathesis: a request handler panicked:" >&2
  grep -n "panicked" "$work/gateway.log" >&2
  status=1
fi
if [ "$gateway_status" -ne 0 ]; then
  echo "schemathesis: faas-async exited with status $gateway_status; its log:" >&2
  tail -n 40 "$work/gateway.log" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "schemathesis: FAILED (status $status)" >&2
  exit "$status"
fi
echo "==> schemathesis: passed"
