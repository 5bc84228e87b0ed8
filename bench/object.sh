#!/usr/bin/env bash
# Object sink benchmark: sluice-loadgen sends pre-built gzip chunks of 100-byte access-log
# events over TLS to a release sluice-relay (fsync interval) whose only sink is, in turn,
# the discard sink (the baseline), an object sink on a local directory, and an object sink
# on moto (S3 on loopback). Each run ends when the sink has delivered every event
# (sluice_relay_sink_events_total), so the figure is the sink's, not the spool's. Object
# sinks run with max_object_age = "1s", so the last partial object does not wait 5 min.
#
#   bench/object.sh                       # 3M events, discard / local / moto, 3 runs each
#   EVENTS=1000000 RUNS=1 SINKS="discard local" bench/object.sh
#   RELAY_BIN=/tmp/sluice-relay-before bench/object.sh   # an A/B against a relay kept aside
#
# Prints one JSON line per run and a markdown table of medians for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVENTS=${EVENTS:-3000000}
RUNS=${RUNS:-3}
SINKS=${SINKS:-"discard local moto"}
WORK=${WORK:-$ROOT/target/bench-object}
MOTO=${MOTO:-${SLUICE_CACHE:-$HOME/.cache/sluice}/venv/bin/moto_server}
PY=${PY:-${SLUICE_CACHE:-$HOME/.cache/sluice}/venv/bin/python}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-bench
BIN=$ROOT/target/release
rm -rf "$WORK"
local_certs "$WORK/tls" "bench CA" 2

RELAY="" MOTO_PID=""
cleanup() {
  [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null
  [[ -n $MOTO_PID ]] && kill "$MOTO_PID" 2>/dev/null
  wait 2>/dev/null || true
}
trap cleanup EXIT

sink_toml() {
  case $1 in
    discard) printf 'type = "discard"\n' ;;
    local) printf 'type = "object_store"\nurl = "file://%s/objects"\nlease_ttl = "0s"\nmax_object_age = "1s"\n' "$WORK" ;;
    moto) printf 'type = "object_store"\nurl = "s3://bench"\nlease_ttl = "0s"\nmax_object_age = "1s"\noptions = { endpoint = "%s", allow_http = "true", region = "us-east-1", access_key_id = "x", secret_access_key = "x" }\n' "$2" ;;
  esac
}

results=()
for sink in $SINKS; do
  endpoint=""
  if [[ $sink == moto ]]; then
    mport=$(free_port)
    "$MOTO" -H 127.0.0.1 -p "$mport" >"$WORK/moto.log" 2>&1 &
    MOTO_PID=$!
    wait_port "$mport"
    endpoint="http://127.0.0.1:$mport"
    "$PY" tests/py/s3_make_bucket.py --endpoint "$endpoint" --bucket bench >/dev/null
  fi
  for run in $(seq 1 "$RUNS"); do
    port=$(free_port) mport_metrics=$(free_port)
    rm -rf "$WORK/relay-data" "$WORK/objects"
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
listen = "127.0.0.1:$mport_metrics"
[[sink]]
name = "out"
$(sink_toml "$sink" "$endpoint")
TOML
    SLUICE_LOG=warn "${RELAY_BIN:-$BIN/sluice-relay}" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
    RELAY=$!
    wait_port "$port"
    cpu0=$(cpu_seconds "$RELAY")
    out=$("$BIN/sluice-loadgen" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" \
      --events "$EVENTS" 2>/dev/null)
    # The loadgen builds its frames before it sends: the run starts when sending did.
    t0=$(python3 -c "import json,sys,time; print(time.time() - json.loads(sys.argv[1])['seconds'])" "$out")
    sink_done "$mport_metrics" "$EVENTS"
    t1=$(date +%s.%N)
    cpu1=$(cpu_seconds "$RELAY")
    kill "$RELAY"; wait "$RELAY" || true; RELAY=""
    objects=0
    [[ $sink == local ]] && objects=$(find "$WORK/objects" -name '*.ndjson.gz' | wc -l)
    line=$(python3 -c "
import json,sys
o=json.loads(sys.argv[1]); t=float(sys.argv[3])-float(sys.argv[2]); n=o['events']
print(json.dumps({'sink':sys.argv[6],'run':int(sys.argv[7]),'events':n,'seconds':t,
  'events_per_second':n/t,'line_mb_per_second':o['line_mb_per_second']*o['seconds']/t,
  'relay_cpu_seconds':float(sys.argv[5])-float(sys.argv[4]),'objects':int(sys.argv[8])}))
" "$out" "$t0" "$t1" "$cpu0" "$cpu1" "$sink" "$run" "$objects")
    echo "$line"
    results+=("$line")
  done
  if [[ -n $MOTO_PID ]]; then kill "$MOTO_PID"; wait "$MOTO_PID" 2>/dev/null || true; MOTO_PID=""; fi
done

python3 - "${results[@]}" <<'PY'
import json, statistics, sys
by = {}
for arg in sys.argv[1:]:
    r = json.loads(arg)
    by.setdefault(r["sink"], []).append(r)
base = statistics.median(r["events_per_second"] for r in by.get("discard", [])) if "discard" in by else None
print("\n| sink | runs | events/s (median) | line MB/s | relay CPU-s per 1M events | vs discard |")
print("|---|---|---|---|---|---|")
for sink, rs in by.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    eps = med("events_per_second")
    cpu = statistics.median(r["relay_cpu_seconds"] * 1e6 / r["events"] for r in rs)
    ratio = f"{eps / base:.2f}" if base else "-"
    print(f"| {sink} | {len(rs)} | {eps:,.0f} | {med('line_mb_per_second'):.1f} | {cpu:.2f} | {ratio} |")
PY
