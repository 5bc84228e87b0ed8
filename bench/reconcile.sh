#!/usr/bin/env bash
# Reconciliation at production size (issue 13): a release relay takes EVENTS events
# (sluice-loadgen --contiguous: each source numbered 0, 1, 2, ... with byte offsets, as an
# agent sends them) and writes them to Kafka (tansu) and S3 (moto) on loopback; its clock
# runs two hours ahead (SLUICE_TEST_CLOCK) so the hour closes at once. Then, in the same
# run, against the same topic and bucket:
#
#   ceiling   sluice-kafka-consume: librdkafka's consumer reads the topic to its end and
#             does nothing with the messages (what reading Kafka costs at all here)
#   manifest  sluice-relay reconcile --from --to (Kafka + markers, manifests, ledgers)
#   deep      sluice-relay reconcile --from --to --deep (every object read and counted)
#
# Each reconcile runs under /usr/bin/time for wall time and peak RSS; its JSON report
# gives the Kafka and object read times apart.
#
#   bench/reconcile.sh                      # 10M events, 6 partitions, 1 run
#   EVENTS=1000000 RUNS=3 bench/reconcile.sh
#
# Prints one JSON line per measurement and a markdown table for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVENTS=${EVENTS:-10000000}
RUNS=${RUNS:-1}
PARTITIONS=${PARTITIONS:-6}
CONNECTIONS=${CONNECTIONS:-4}
WORK=${WORK:-$ROOT/target/bench-reconcile}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
# shellcheck source=../scripts/lib/services.sh
source scripts/lib/services.sh
cargo build --release -q -p sluice-relay -p sluice-bench
BIN=$ROOT/target/release
rm -rf "$WORK"
mkdir -p "$WORK"
local_certs "$WORK/tls" "bench CA" 2

RELAY=""
cleanup() {
  [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null && wait "$RELAY" 2>/dev/null
  services_stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
services_start kafka s3 >"$WORK/services.log" 2>&1
PY=$SLUICE_TEST_PYTHON
"$PY" tests/py/kafka_create_topic.py --brokers "$SLUICE_TEST_KAFKA" --topic bench --partitions "$PARTITIONS" >/dev/null
"$PY" tests/py/s3_make_bucket.py --endpoint "$SLUICE_TEST_S3_ENDPOINT" --bucket bench >/dev/null

port=$(free_port) mport=$(free_port)
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
max_size = "16 GiB"
[metrics]
listen = "127.0.0.1:$mport"
[[sink]]
name = "kafka"
type = "kafka"
brokers = "$SLUICE_TEST_KAFKA"
topic = "bench"
[[sink]]
name = "s3"
type = "object_store"
url = "s3://bench"
prefix = "logs"
max_object_age = "5s"
options = { endpoint = "$SLUICE_TEST_S3_ENDPOINT", allow_http = "true", region = "us-east-1" }
TOML
now=$(date +%s)
SLUICE_TEST_CLOCK="$((now + 7200)):1" SLUICE_LOG=warn "$BIN/sluice-relay" --config "$WORK/relay.toml" 2>"$WORK/relay.log" &
RELAY=$!
wait_port "$port"
"$BIN/sluice-loadgen" --relay "127.0.0.1:$port" --ca "$WORK/tls/ca.pem" --events "$EVENTS" \
  --connections "$CONNECTIONS" --contiguous >"$WORK/loadgen.json" 2>"$WORK/loadgen.err"

delivered() { # SINK: sluice_relay_sink_events_total of that sink
  "$PY" - "$mport" "$1" <<'PY'
import sys, urllib.request
port, sink = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(int(sum(float(l.split()[-1]) for l in text.splitlines()
              if l.startswith(f'sluice_relay_sink_events_total{{sink="{sink}"}}'))))
PY
}
for sink in kafka s3; do
  deadline=$((SECONDS + 1800))
  until [[ $(delivered "$sink") -ge $EVENTS ]]; do
    ((SECONDS < deadline)) || { echo "sink $sink did not deliver $EVENTS events" >&2; exit 1; }
    sleep 1
  done
done
from=$(date -u -d "@$now" +%Y-%m-%dT%H)
to=$(date -u -d "@$((now + 3 * 3600))" +%Y-%m-%dT%H)
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
reconcile() { # OUT [--deep]: one reconcile, its JSON report in OUT, "wall_s peak_kib" in OUT.time
  local out=$1
  shift
  local prof=()
  # PERF=1: profile each measured reconcile into OUT.perf (perf report -i OUT.perf).
  [[ -n ${PERF:-} && $out != */ready.json ]] && prof=(perf record -F 999 -g -o "$out.perf" --)
  /usr/bin/time -f '%e %M' -o "$out.time" "${prof[@]}" "$BIN/sluice-relay" --config "$WORK/relay.toml" \
    reconcile --from "$from" --to "$to" --format json "$@" >"$out" 2>"$out.err" || echo $? >"$out.code"
}
# The hour is announced and the ledger published within seconds of the last delivery.
deadline=$((SECONDS + 120))
until reconcile "$WORK/ready.json" && [[ ! -e $WORK/ready.json.code ]]; do
  ((SECONDS < deadline)) || { echo "reconcile never came out OK:" >&2; head -c 4000 "$WORK/ready.json" >&2; exit 1; }
  rm -f "$WORK/ready.json.code"
  sleep 2
done

results=()
for run in $(seq 1 "$RUNS"); do
  out=$("$BIN/sluice-kafka-consume" --brokers "$SLUICE_TEST_KAFKA" --topic bench)
  line=$(python3 -c "
import json,sys
o=json.loads(sys.argv[1])
print(json.dumps({'path':'ceiling','run':int(sys.argv[2]),'events':o['messages'],'wall':o['seconds'],
  'kafka_events_per_second':o['messages']/o['seconds']}))" "$out" "$run")
  echo "$line"; results+=("$line")
  for mode in manifest deep; do
    f="$WORK/$mode-$run.json"
    if [[ $mode == deep ]]; then reconcile "$f" --deep; else reconcile "$f"; fi
    line=$(python3 - "$f" "$mode" "$run" "$EVENTS" <<'PY'
import json, sys
f, mode, run, events = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = json.load(open(f))
wall, kib = open(f + ".time").read().split()
expected = sum(row["expected"] for row in r["rows"])
print(json.dumps({"path": mode, "run": run, "events": expected, "ok": r["ok"], "wall": float(wall),
  "peak_rss_mib": int(kib) / 1024, "kafka_seconds": r["kafka_seconds"], "objects_seconds": r["objects_seconds"],
  "kafka_events_per_second": r["kafka_messages_read"] / r["kafka_seconds"],
  "objects_events_per_second": expected / r["objects_seconds"] if mode == "deep" else None,
  "objects_read": r["objects_read"], "manifests_read": r["manifests_read"], "ledgers_read": r["ledgers_read"]}))
assert expected == events, f"reconcile expected {expected} events, {events} were sent"
PY
)
    echo "$line"; results+=("$line")
  done
done

python3 - "${results[@]}" <<'PY'
import json, statistics, sys
by = {}
for arg in sys.argv[1:]:
    r = json.loads(arg)
    by.setdefault(r["path"], []).append(r)
med = lambda rs, k: statistics.median(r[k] for r in rs)
ceiling = med(by["ceiling"], "kafka_events_per_second")
print("\n| path | events | wall s | Kafka events/s (vs ceiling) | objects events/s | peak RSS MiB | status |")
print("|---|---|---|---|---|---|---|")
for path, rs in by.items():
    k = med(rs, "kafka_events_per_second")
    o = rs[0].get("objects_events_per_second")
    rss = f"{med(rs, 'peak_rss_mib'):.1f}" if "peak_rss_mib" in rs[0] else ""
    ok = "" if path == "ceiling" else ("OK" if all(r["ok"] for r in rs) else "NOT OK")
    print(f"| {path} | {rs[0]['events']:,} | {med(rs, 'wall'):.1f} | {k:,.0f} ({k / ceiling:.2f}) | "
          f"{'' if o is None else f'{o:,.0f}'} | {rss} | {ok} |")
PY
