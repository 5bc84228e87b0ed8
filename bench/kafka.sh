#!/usr/bin/env bash
# Kafka sink benchmark: relay -> Kafka against librdkafka's own producer as the ceiling,
# in the same run, on a tansu broker (memory storage) on loopback, fresh for each run.
#
#   ceiling  sluice-kafka-produce: librdkafka configured as the sink configures it
#            (idempotent, acks=all, lz4, linger 5 ms, 1 MB batches) produces the messages
#            the relay would write (envelope of a 100-byte access-log line, source key,
#            five headers, CreateTime), built before the clock starts.
#   relay    sluice-loadgen sends the same number of events (gzip chunks over TLS, acks)
#            to a release relay (fsync interval) whose one sink is Kafka; the run ends
#            when sluice_relay_sink_events_total reaches EVENTS (the sink's rate).
#
#   bench/kafka.sh                          # 2M events, 3 runs of each, 6 partitions
#   EVENTS=500000 RUNS=1 PARTITIONS=24 bench/kafka.sh
#
# Prints one JSON line per run and a markdown table of medians for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVENTS=${EVENTS:-2000000}
RUNS=${RUNS:-3}
PARTITIONS=${PARTITIONS:-6}
WORK=${WORK:-$ROOT/target/bench-kafka}
PY=${PY:-${SLUICE_CACHE:-$HOME/.cache/sluice}/venv/bin/python}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-bench
BIN=$ROOT/target/release
rm -rf "$WORK"
local_certs "$WORK/tls" "bench CA" 2

RELAY="" TANSU=""
cleanup() {
  [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null
  [[ -n $TANSU ]] && kill "$TANSU" 2>/dev/null
  wait 2>/dev/null || true
}
trap cleanup EXIT

metric() { # PORT NAME: the sum of the metric's samples for sink "out"
  "$PY" - "$1" "$2" <<'PY'
import sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + '{sink="out"}')))
PY
}


start_tansu() { # sets TANSU, KAFKA
  local port
  port=$(free_port)
  RUST_LOG=warn tansu broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" >"$WORK/tansu.log" 2>&1 &
  TANSU=$!
  KAFKA=127.0.0.1:$port
  "$PY" tests/py/wait_ready.py --kafka "$KAFKA" >/dev/null
  "$PY" tests/py/kafka_create_topic.py --brokers "$KAFKA" --topic bench --partitions "$PARTITIONS" >/dev/null
}

stop_tansu() { kill "$TANSU"; wait "$TANSU" 2>/dev/null || true; TANSU=""; }

results=()
for run in $(seq 1 "$RUNS"); do
  start_tansu
  out=$("$BIN/sluice-kafka-produce" --brokers "$KAFKA" --topic bench --events "$EVENTS")
  line=$(python3 -c "
import json,sys
o=json.loads(sys.argv[1])
print(json.dumps({'path':'ceiling','run':int(sys.argv[2]),'events':o['messages'],'seconds':o['seconds'],
  'events_per_second':o['messages_per_second'],'value_mb_per_second':o['value_mb_per_second'],'cpu_seconds':o['cpu_seconds']}))
" "$out" "$run")
  echo "$line"; results+=("$line")
  stop_tansu

  start_tansu
  port=$(free_port) mport=$(free_port)
  rm -rf "$WORK/relay-data"
  cat >"$WORK/relay.toml" <<TOML
[relay]
id = "bench"
data_dir = "$WORK/relay-data"
[server]
listen = "127.0.0.1:$port"
tls = { cert = "$WORK/tls/relay.pem", key = "$WORK/tls/relay.key" }
[spool]
fsync = "interval"
segment_size = "64 MiB"
max_size = "8 GiB"
[metrics]
listen = "127.0.0.1:$mport"
[[sink]]
name = "out"
type = "kafka"
brokers = "$KAFKA"
topic = "bench"
TOML
  SLUICE_LOG=warn "$BIN/sluice-relay" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
  RELAY=$!
  wait_port "$port"
  PERF_PID=""
  if [[ -n ${PERF:-} ]]; then # PERF=1: profile the relay of each run into WORK/perf-<run>.data
    perf record -F 499 -e cpu-clock --call-graph dwarf,16384 -o "$WORK/perf-$run.data" -p "$RELAY" >/dev/null 2>&1 &
    PERF_PID=$!
  fi
  cpu0=$(cpu_seconds "$RELAY")
  out=$("$BIN/sluice-loadgen" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" --events "$EVENTS" 2>/dev/null)
  t0=$(python3 -c "import json,sys,time; print(time.time() - json.loads(sys.argv[1])['seconds'])" "$out")
  sink_done "$mport" "$EVENTS"
  t1=$(date +%s.%N)
  cpu1=$(cpu_seconds "$RELAY")
  if [[ -n $PERF_PID ]]; then kill -INT "$PERF_PID"; wait "$PERF_PID" || true; fi
  bytes=$(metric "$mport" sluice_relay_sink_bytes_total)
  kill "$RELAY"; wait "$RELAY" || true; RELAY=""
  line=$(python3 -c "
import sys, json
t=float(sys.argv[2])-float(sys.argv[1]); n=int(sys.argv[5])
print(json.dumps({'path':'relay','run':int(sys.argv[6]),'events':n,'seconds':t,'events_per_second':n/t,
  'value_mb_per_second':float(sys.argv[7])/t/1e6,'cpu_seconds':float(sys.argv[4])-float(sys.argv[3])}))
" "$t0" "$t1" "$cpu0" "$cpu1" "$EVENTS" "$run" "$bytes")
  echo "$line"; results+=("$line")
  stop_tansu
done

python3 - "${results[@]}" <<'PY'
import json, statistics, sys
by = {}
for arg in sys.argv[1:]:
    r = json.loads(arg)
    by.setdefault(r["path"], []).append(r)
ceiling = statistics.median(r["events_per_second"] for r in by["ceiling"])
print("\n| path | runs | messages/s (median; runs) | value MB/s | producer CPU-s per 1M (the relay's, all of it) | vs ceiling |")
print("|---|---|---|---|---|---|")
for path, rs in by.items():
    eps = statistics.median(r["events_per_second"] for r in rs)
    each = ", ".join(f"{r['events_per_second']/1e3:,.0f} k" for r in rs)
    mb = statistics.median(r["value_mb_per_second"] for r in rs)
    cpu = f"{statistics.median(r['cpu_seconds'] * 1e6 / r['events'] for r in rs):.2f}"
    print(f"| {path} | {len(rs)} | {eps:,.0f} ({each}) | {mb:.1f} | {cpu} | {eps / ceiling:.2f} |")
PY
