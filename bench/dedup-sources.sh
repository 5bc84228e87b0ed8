#!/usr/bin/env bash
# Relay ingest with a large dedup table (issue 10, item 7): the same stream as
# bench/relay.sh (sluice-loadgen, TLS with acks, spool with fsync, discard sink) into a
# relay that knows 10 sources and into one that knows 1,000,000, alternated, RUNS times
# each. The sources are real: loadgen first sends one tiny chunk per source, the relay
# spools and persists them, and every measured run starts from a copy of that data dir
# (the relay loads them; `sluice_relay_dedup_sources` is checked before each run).
#
#   bench/dedup-sources.sh                        # 1M vs 10 sources, 10M events, 3 runs each
#   BIG=200000 EVENTS=2000000 RUNS=1 bench/dedup-sources.sh
#
# Prints one JSON line per run, then medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVENTS=${EVENTS:-10000000}
RUNS=${RUNS:-3}
BIG=${BIG:-1000000}
SMALL=${SMALL:-10}
MODE=${MODE:-interval}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=${WORK:-$TARGET/bench-dedup}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-bench
BIN=$TARGET/release
rm -rf "$WORK"
local_certs "$WORK/tls" "bench CA" 2

RELAY=""
cleanup() { [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# start_relay DATA_DIR PORT METRICS_PORT
start_relay() {
  cat >"$WORK/relay.toml" <<TOML
[relay]
id = "bench"
data_dir = "$1"
[server]
listen = "127.0.0.1:$2"
tls = { cert = "$WORK/tls/relay.pem", key = "$WORK/tls/relay.key" }
[spool]
fsync = "$MODE"
segment_size = "64 MiB"
max_size = "8 GiB"
[metrics]
listen = "127.0.0.1:$3"
[[sink]]
name = "discard"
type = "discard"
TOML
  SLUICE_LOG=warn "$BIN/sluice-relay" --config "$WORK/relay.toml" 2>>"$WORK/relay.log" &
  RELAY=$!
  wait_port "$2"
}
stop_relay() { kill "$RELAY"; wait "$RELAY" || true; RELAY=""; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rss_mib() { awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }

# Templates: a data dir that knows N sources, everything delivered (discard), stopped cleanly.
for n in $SMALL $BIG; do
  port=$(free_port) mport=$(free_port)
  start_relay "$WORK/template-$n" "$port" "$mport"
  t0=$(date +%s.%N)
  "$BIN/sluice-loadgen" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" \
    --events "$n" --chunk-events 1 --line-bytes 20 --sources "$n" --in-flight 256 >/dev/null 2>&1
  t1=$(date +%s.%N)
  sleep 2 # the gauge follows the writer's once-a-second housekeeping
  echo "{\"populate\":$n,\"seconds\":$(secs "$t0" "$t1"),\"dedup_sources\":$(metric "$mport" sluice_relay_dedup_sources),\"rss_mib\":$(rss_mib "$RELAY")}"
  stop_relay
done

results=()
for run in $(seq 1 "$RUNS"); do
  for n in $SMALL $BIG; do
    rm -rf "$WORK/data" && cp -a "$WORK/template-$n" "$WORK/data"
    port=$(free_port) mport=$(free_port)
    t0=$(date +%s.%N)
    start_relay "$WORK/data" "$port" "$mport"
    t1=$(date +%s.%N)
    sleep 2
    known=$(metric "$mport" sluice_relay_dedup_sources)
    if [[ ${known%.*} -lt $n ]]; then echo "relay knows $known sources, expected $n" >&2; exit 1; fi
    rss=$(rss_mib "$RELAY")
    out=$("$BIN/sluice-loadgen" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" \
      --events "$EVENTS" --relay-pid "$RELAY" 2>/dev/null)
    state=$(metric "$mport" sluice_relay_state_bytes_written_total)
    stop_relay
    line="{\"sources\":$n,\"run\":$run,\"start_seconds\":$(secs "$t0" "$t1"),\"rss_mib_loaded\":$rss,\"state_bytes_written\":${state:-0},\"result\":$out}"
    echo "$line"
    results+=("$line")
  done
done

python3 - "$SMALL" "$BIG" "${results[@]}" <<'PY'
import json, statistics, sys
small, big = int(sys.argv[1]), int(sys.argv[2])
rs = [json.loads(a) for a in sys.argv[3:]]
med = lambda n, f: statistics.median(f(r) for r in rs if r["sources"] == n)
print("\n| sources known | runs | events/s (median) | relay CPU-s per 10M events | relay RSS after load (MiB) | start (s) | state bytes written |")
print("|---|---|---|---|---|---|---|")
for n in (small, big):
    print(f"| {n:,} | {sum(r['sources'] == n for r in rs)} | {med(n, lambda r: r['result']['events_per_second']):,.0f} | "
          f"{med(n, lambda r: r['result']['relay_cpu_seconds_per_10m_events']):.2f} | {med(n, lambda r: r['rss_mib_loaded']):.0f} | "
          f"{med(n, lambda r: r['start_seconds']):.1f} | {med(n, lambda r: r['state_bytes_written']):,.0f} |")
ratio = med(big, lambda r: r['result']['events_per_second']) / med(small, lambda r: r['result']['events_per_second'])
print(f"\nratio {big:,} / {small:,} sources: {ratio:.3f} (goal >= 0.90)")
PY
