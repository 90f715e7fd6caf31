#!/bin/sh
# Every $2 seconds (5) until killed: seconds since start, the RSS of the nats-server started by
# nats-server-profiled, and Go's memory statistics from its profiling endpoint, to $1.
# Summarise with nats-heap-summary.py.
set -u
out="${1:?usage: sample-nats-heap.sh OUT [EVERY_SECONDS]}"
every="${2:-5}"
port="${NATS_PROFILE_PORT:-6061}"
: > "$out"
t0=$(date +%s)
while true; do
  pid=$(pgrep -f -- "nats-server.*--profile $port" | head -n 1)
  if [ -n "$pid" ]; then
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    stats=$(curl -s --max-time 3 "http://127.0.0.1:$port/debug/pprof/heap?debug=1" \
      | awk '$1 == "#" && $3 == "=" && $2 ~ /^(HeapAlloc|HeapSys|HeapIdle|HeapInuse|HeapReleased|NextGC|NumGC)$/ {printf "%s=%s ", $2, $4}')
    [ -n "$rss" ] && echo "$(( $(date +%s) - t0 )) rss_kib=$rss $stats" >> "$out"
  fi
  sleep "$every"
done
