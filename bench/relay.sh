#!/usr/bin/env bash
# Relay ingest benchmark: sluice-loadgen sends pre-built gzip CompressedPackedForward
# chunks of 100-byte access-log events over TLS (with acks) to a release sluice-relay
# whose only sink discards; the spool is in the path with the chosen fsync policy.
#
#   bench/relay.sh                  # 10M events, fsync interval and always, 3 runs each
#   EVENTS=2000000 RUNS=1 bench/relay.sh
#   MODES="interval" bench/relay.sh
#   LOADGEN=/path/to/other/sluice-loadgen bench/relay.sh   # chunks made by another build
#   RELAY_BIN=/tmp/sluice-relay-before bench/relay.sh       # an A/B against a relay kept aside
#
# Prints one JSON line per run and a markdown table of medians for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVENTS=${EVENTS:-10000000}
RUNS=${RUNS:-3}
MODES=${MODES:-"interval always"}
WORK=${WORK:-$ROOT/target/bench-relay}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-bench
BIN=$ROOT/target/release
LOADGEN=${LOADGEN:-$BIN/sluice-loadgen}
rm -rf "$WORK"
local_certs "$WORK/tls" "bench CA" 2
RELAY_DIR=$BIN
if [[ -n ${RELAY_BIN:-} ]]; then
  RELAY_DIR=$WORK/relay-bin
  mkdir -p "$RELAY_DIR"
  ln -sf "$RELAY_BIN" "$RELAY_DIR/sluice-relay"
fi

RELAY=""
cleanup() { [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

results=()
for mode in $MODES; do
  for run in $(seq 1 "$RUNS"); do
    port=$(free_port)
    start_discard_relay "$RELAY_DIR" "$WORK" "$mode" "$port"
    out=$("$LOADGEN" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" \
      --events "$EVENTS" --relay-pid "$RELAY" 2>/dev/null)
    kill "$RELAY"; wait "$RELAY" || true; RELAY=""
    echo "{\"fsync\":\"$mode\",\"run\":$run,\"result\":$out}"
    results+=("$mode $out")
  done
done

python3 - "${results[@]}" <<'PY'
import json, statistics, sys
by = {}
for arg in sys.argv[1:]:
    mode, js = arg.split(" ", 1)
    by.setdefault(mode, []).append(json.loads(js))
print("\n| fsync | runs | events/s (median) | line MB/s | wire MB/s | relay CPU-s per 10M events |")
print("|---|---|---|---|---|---|")
for mode, rs in by.items():
    med = lambda k: statistics.median(r[k] for r in rs if r.get(k) is not None)
    print(f"| {mode} | {len(rs)} | {med('events_per_second'):,.0f} | {med('line_mb_per_second'):.1f} | "
          f"{med('wire_mb_per_second'):.1f} | {med('relay_cpu_seconds_per_10m_events'):.2f} |")
PY
