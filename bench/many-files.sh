#!/usr/bin/env bash
# Many files: FILES files under one glob (a Kubernetes node's container logs), LINES lines
# each, written round robin (one line to every file, then the next) by a writer running
# beside the agent, which tails them all and ships to a release relay (discard sink) over
# TLS with gzip and acks. Measured from the writer's start until every line is
# acknowledged: seconds, lines/s, agent CPU-seconds, agent peak RSS (VmHWM).
#
#   bench/many-files.sh                       # 2,000 files x 500 lines of 100 bytes
#   FILES=200 LINES=100 bench/many-files.sh   # a quick check that the script works
#
# The lines are bench/tail.sh's realistic nginx lines (they gzip about 3x), taken from
# its 100-byte file (generated with 256 MiB if missing). Prints one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FILES=${FILES:-2000}
LINES=${LINES:-500}
WORK=${WORK:-$ROOT/target/bench-many}
TIMEOUT_S=${TIMEOUT_S:-900}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-agent
BIN=$ROOT/target/release
mkdir -p "$WORK"
[[ -f $WORK/tls/relay.pem ]] || local_certs "$WORK/tls" "bench CA" 30
SOURCE=$ROOT/target/bench-tail/lines-100-256.log
if [[ ! -f $SOURCE ]]; then
  mkdir -p "$(dirname "$SOURCE")"
  python3 bench/gen_lines.py 100 256 "$SOURCE" >"$SOURCE.count"
fi
# The agent and the writer each hold every file open.
ulimit -n $((FILES * 2 + 1024))

RELAY=""
AGENT=""
trap stop_agent_and_relay EXIT

relay_port=$(free_port)
start_discard_relay "$BIN" "$WORK" interval "$relay_port"
rm -rf "$WORK/logs" "$WORK/agent-data"
mkdir -p "$WORK/logs"
for i in $(seq 1 "$FILES"); do : >"$WORK/logs/pod-$i.log"; done
agent_metrics=$(free_port)
cat >"$WORK/agent.toml" <<TOML
[agent]
id = "bench"
data_dir = "$WORK/agent-data"
[[input]]
type = "tail"
name = "pods"
tag = "kube.pods"
include = ["$WORK/logs/*.log"]
[output]
relays = ["127.0.0.1:$relay_port"]
tls = { ca = "$WORK/tls/ca.pem", server_name = "localhost" }
[metrics]
listen = "127.0.0.1:$agent_metrics"
TOML
SLUICE_LOG=warn "$BIN/sluice-agent" --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT=$!
# Until the agent holds every (still empty) file open.
deadline=$(($(date +%s) + 60))
until (($(metric "$agent_metrics" sluice_agent_files_open 2>/dev/null || echo 0) >= FILES)); do
  (($(date +%s) < deadline)) || { echo "the agent did not open $FILES files in 60 s" >&2; exit 1; }
  sleep 0.1
done
total=$((FILES * LINES))
start=$(date +%s.%N)
python3 - "$SOURCE" "$WORK/logs" "$FILES" "$LINES" <<'PY'
import sys
source, logs, files, lines = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(source, "rb") as f:
    pool = [f.readline() for _ in range(files * lines)]
handles = [open(f"{logs}/pod-{i + 1}.log", "ab", buffering=0) for i in range(files)]
for n in range(lines):
    for i, h in enumerate(handles):
        h.write(pool[n * files + i])
PY
written=$(date +%s.%N)
deadline=$(($(date +%s) + TIMEOUT_S))
while :; do
  acked=$(metric "$agent_metrics" sluice_agent_events_acked_total 2>/dev/null || echo 0)
  [[ ${acked:-0} -ge $total ]] && break
  kill -0 "$AGENT" 2>/dev/null || { echo "the agent exited:" >&2; cat "$WORK/agent.log" >&2; exit 1; }
  (($(date +%s) <= deadline)) || { echo "timed out with $acked of $total acknowledged" >&2; exit 1; }
  sleep 0.05
done
end=$(date +%s.%N)
ticks=$(awk '{ print $14 + $15 }' "/proc/$AGENT/stat")
hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$AGENT/status")
chunks=$(metric "$agent_metrics" sluice_agent_chunks_acked_total)
python3 - "$FILES" "$LINES" "$start" "$written" "$end" "$ticks" "$(getconf CLK_TCK)" "$hwm" "$chunks" <<'PY'
import json, sys
files, lines = int(sys.argv[1]), int(sys.argv[2])
start, written, end = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
ticks, tck, hwm, chunks = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
print(json.dumps({
    "files": files, "lines_per_file": lines, "lines": files * lines,
    "writer_seconds": round(written - start, 2), "seconds": round(end - start, 2),
    "lines_per_second": round(files * lines / (end - start)),
    "agent_cpu_seconds": round(ticks / tck, 2), "agent_peak_rss_mib": round(hwm / 1024, 1),
    "chunks": chunks,
}))
PY
