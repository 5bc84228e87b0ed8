#!/usr/bin/env bash
# Before/after in the same run: the tail bench and the relay bench from two checkouts,
# alternated, and in the opposite order every other round (A B, B A, A B, ...), so that
# a machine that slows down or speeds up during the run, or a side that profits from
# going second, weighs on both sides alike. Each checkout builds its own release binaries in its
# own target/.
#
#   bench/ab.sh /path/to/baseline-checkout          # this checkout is "after"
#   ROUNDS=5 TAIL_MB=512 RELAY_EVENTS=5000000 bench/ab.sh ../base
#
# Prints every run as a JSON line and a table of medians with after/before ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
AFTER=$PWD
BEFORE=$(cd "${1:?usage: bench/ab.sh BASELINE_CHECKOUT}" && pwd)
ROUNDS=${ROUNDS:-3}
TAIL_MB=${TAIL_MB:-256}
RELAY_EVENTS=${RELAY_EVENTS:-3000000}
unset CARGO_TARGET_DIR # the bench scripts run the binaries from <checkout>/target/release

for side in "$BEFORE" "$AFTER"; do
  (cd "$side" && cargo build --release -q -p sluice-relay -p sluice-agent -p sluice-bench)
done

runs=()
for round in $(seq 1 "$ROUNDS"); do
  order=("$BEFORE" "$AFTER")
  ((round % 2)) || order=("$AFTER" "$BEFORE")
  for side in "${order[@]}"; do
    name=$([[ $side == "$AFTER" ]] && echo after || echo before)
    tail_json=$(cd "$side" && SIZE_MB=$TAIL_MB LINE_SIZES=100 WORK=$AFTER/target/bench-ab-tail \
      bench/tail.sh 2>/dev/null | grep '^{' | head -1)
    relay_json=$(cd "$side" && EVENTS=$RELAY_EVENTS RUNS=1 MODES=interval \
      WORK=$side/target/bench-ab-relay bench/relay.sh 2>/dev/null | grep '^{' | head -1)
    echo "{\"side\":\"$name\",\"round\":$round,\"tail\":$tail_json,\"relay\":$relay_json}"
    runs+=("{\"side\":\"$name\",\"tail\":$tail_json,\"relay\":$relay_json}")
  done
done

python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
def med(side, f):
    return statistics.median(f(r) for r in rows if r["side"] == side)
metrics = [
    ("tail: lines/s", lambda r: r["tail"]["lines_per_second"], "{:,.0f}"),
    ("tail: agent CPU-s per GB", lambda r: r["tail"]["agent_cpu_seconds_per_gb"], "{:.2f}"),
    ("tail: agent peak RSS MiB", lambda r: r["tail"]["agent_peak_rss_mib"], "{:.1f}"),
    ("relay: events/s", lambda r: r["relay"]["result"]["events_per_second"], "{:,.0f}"),
    ("relay: CPU-s per 10M events", lambda r: r["relay"]["result"]["relay_cpu_seconds_per_10m_events"], "{:.2f}"),
]
n = sum(1 for r in rows if r["side"] == "after")
print(f"\n| metric (median of {n}) | before | after | after / before |")
print("|---|---|---|---|")
for name, f, fmt in metrics:
    b, a = med("before", f), med("after", f)
    print(f"| {name} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.3f} |")
PY
