#!/usr/bin/env python3
"""Ranges of nats-server's RSS and Go heap over a window of a sample-nats-heap.sh series.

usage: nats-heap-summary.py SERIES [FROM_SECONDS [TO_SECONDS]]

"live" is half of Go's heap goal (NextGC): with GOGC=100 the collector sets the goal to
twice what it found live (plus stacks and globals), so it tracks the live heap of the last
collection; HeapAlloc is live plus garbage not yet collected.
"""
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = []
    with open(sys.argv[1]) as series:
        for line in series:
            fields = line.split()
            if not fields:
                continue
            row = {"t": int(fields[0])}
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if value.isdigit():
                    row[key] = int(value)
            if {"rss_kib", "NextGC", "HeapAlloc", "HeapSys", "HeapReleased"} <= row.keys():
                rows.append(row)
    start = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    end = float(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
    window = [r for r in rows if start <= r["t"] <= end]
    if not window:
        print("no samples with Go statistics in that window", file=sys.stderr)
        return 1
    print(f"{len(window)} samples, {window[0]['t']}–{window[-1]['t']} s")
    series = {
        "RSS": lambda r: r["rss_kib"] * 1024,
        "live heap (NextGC / 2)": lambda r: r["NextGC"] / 2,
        "HeapAlloc (live + garbage)": lambda r: r["HeapAlloc"],
        "resident heap (HeapSys - HeapReleased)": lambda r: r["HeapSys"] - r["HeapReleased"],
    }
    mib = 2**20
    for name, value in series.items():
        values = [value(r) for r in window]
        low, high = min(values), max(values)
        mean = sum(values) / len(values)
        print(f"{name:40s} {low / mib:7.1f}–{high / mib:7.1f} MiB, spread {(high - low) / high:6.1%}, mean {mean / mib:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
