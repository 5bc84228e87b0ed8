#!/usr/bin/env bash
# Agent tailing benchmark: a release sluice-agent tails a file of synthetic nginx access
# lines and ships it over TLS (gzip CompressedPackedForward, with acks) to a release
# sluice-relay whose only sink discards. Two files: 100-byte lines and 1 KiB lines.
#
#   bench/tail.sh                    # 1 GiB per file (the numbers for bench/RESULTS.md)
#   SIZE_MB=4 bench/tail.sh          # a quick check that the script works
#   LINE_SIZES="100" SIZE_MB=256 bench/tail.sh
#   PARSERS="nginx_read_time nginx" bench/tail.sh   # the cost of taking the log's time
#   RECEIVER_RATE=15000000 bench/tail.sh              # a relay that reads 15 MB/s at most
#   TIMES=random PARSERS=nginx bench/tail.sh          # every line a random second of November
#
# PARSERS (default "none") lists how the agent parses, one run each per file:
#   none             the line as `message`
#   nginx            parser = "nginx"; the event time comes from the log's time field
#   nginx_read_time  parser = "nginx" with time_key = "": the same without the time parse
#
# Measured per file, from the agent's start until its metrics say every line is
# acknowledged: lines/s, MB/s (line bytes incl. newline), agent CPU-seconds per GB
# (utime+stime from /proc/<pid>/stat) and peak agent RSS (VmHWM). Prints one JSON line
# per run and a markdown table.
#
# The files are generated once per size and kept in $WORK (delete them to regenerate).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MB=${SIZE_MB:-1024}
LINE_SIZES=${LINE_SIZES:-"100 1024"}
PARSERS=${PARSERS:-none}
WORK=${WORK:-$ROOT/target/bench-tail}
TIMEOUT_S=${TIMEOUT_S:-1800}
# Bytes per second the relay reads at most (server.rate_limit); empty: as fast as it can.
RECEIVER_RATE=${RECEIVER_RATE:-}
# Another agent binary for the same run (an A/B against a build kept aside); the relay is this checkout's.
AGENT_BIN=${AGENT_BIN:-}
OUTPUT_TOML=${OUTPUT_TOML:-} # more [output] settings, e.g. 'in_flight_bytes = "2MiB"'
# The lines' [time] fields: "ordered" as a server writes them (2,000 lines a second) or
# "random" (no two neighbouring lines share a second; bench/gen_lines.py).
export TIMES=${TIMES:-ordered}

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-agent
BIN=$ROOT/target/release
[[ -f $WORK/tls/relay.pem ]] || local_certs "$WORK/tls" "bench CA" 30

# generate LINE_BYTES SIZE_MB PATH: synthetic nginx combined-format lines of exactly
# LINE_BYTES bytes (newline included), varied in every field, each with a unique request
# id, so neither gzip nor the reader sees repeated padding.
generate() { python3 "$ROOT/bench/gen_lines.py" "$1" "$2" "$3" "$TIMES"; }

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

RELAY=""
AGENT=""
trap stop_agent_and_relay EXIT

relay_port=$(free_port)
start_discard_relay "$BIN" "$WORK" interval "$relay_port" "$RECEIVER_RATE"

CLK_TCK=$(getconf CLK_TCK)
results=()
for line_bytes in $LINE_SIZES; do
 for parser in $PARSERS; do
  case $parser in
    none) parser_toml='parser = "none"' ;;
    nginx) parser_toml='parser = "nginx"' ;;
    nginx_read_time) parser_toml=$'parser = "nginx"\ntime_key = ""' ;;
    *) echo "unknown parser mode $parser (none, nginx, nginx_read_time)" >&2; exit 2 ;;
  esac
  file=$WORK/lines-$line_bytes-$SIZE_MB-$TIMES.log
  count_file=$file.count
  if [[ ! -f $file || ! -f $count_file ]]; then
    echo "generating $SIZE_MB MiB of $line_bytes-byte lines in $file ..." >&2
    generate "$line_bytes" "$SIZE_MB" "$file" >"$count_file"
  fi
  lines=$(cat "$count_file")
  bytes=$(stat -c %s "$file")
  agent_metrics=$(free_port)
  rm -rf "$WORK/agent-data"
  cat >"$WORK/agent.toml" <<TOML
[agent]
id = "bench"
data_dir = "$WORK/agent-data"
[[input]]
type = "tail"
name = "bench"
tag = "bench.access"
include = ["$file"]
$parser_toml
[output]
relays = ["127.0.0.1:$relay_port"]
tls = { ca = "$WORK/tls/ca.pem", server_name = "localhost" }
# Defaults otherwise (1 MiB chunks, 8 in flight); a short age so that the last,
# partial chunk does not add a second to the measured time.
chunk_age = "100ms"
$OUTPUT_TOML
[metrics]
listen = "127.0.0.1:$agent_metrics"
TOML
  entries_before=$(metric "$RELAY_METRICS" sluice_relay_bytes_received_total)
  start=$(date +%s.%N)
  SLUICE_LOG=warn "${AGENT_BIN:-$BIN/sluice-agent}" --config "$WORK/agent.toml" 2>"$WORK/agent-$line_bytes.log" &
  AGENT=$!
  deadline=$(($(date +%s) + TIMEOUT_S))
  while :; do
    acked=$(metric "$agent_metrics" sluice_agent_events_acked_total 2>/dev/null || echo 0)
    [[ ${acked:-0} -ge $lines ]] && break
    if ! kill -0 "$AGENT" 2>/dev/null; then
      echo "the agent exited; log:" >&2
      cat "$WORK/agent-$line_bytes.log" >&2
      exit 1
    fi
    if (($(date +%s) > deadline)); then
      echo "timed out after ${TIMEOUT_S}s with $acked of $lines lines acknowledged" >&2
      exit 1
    fi
    sleep 0.05
  done
  end=$(date +%s.%N)
  entries=$(($(metric "$RELAY_METRICS" sluice_relay_bytes_received_total) - entries_before))
  ticks=$(cpu_ticks "$AGENT")
  hwm=$(hwm_kib "$AGENT")
  parse_errors=$(metric "$agent_metrics" sluice_agent_parse_errors_total)
  time_errors=$(metric "$agent_metrics" sluice_agent_time_errors_total)
  kill "$AGENT"
  wait "$AGENT" || true
  AGENT=""
  if [[ $parser != none && ($parse_errors != 0 || $time_errors != 0) ]]; then
    echo "$parser: $parse_errors parse errors, $time_errors time errors: the figures would not be comparable" >&2
    exit 1
  fi
  out=$(python3 - "$line_bytes" "$lines" "$bytes" "$start" "$end" "$ticks" "$CLK_TCK" "$hwm" "$parser" "$entries" "$RECEIVER_RATE" <<'PY'
import json, os, sys
line_bytes, lines, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start, end, ticks, tck, hwm = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
secs = end - start
cpu = ticks / tck
print(json.dumps({
    "parser": sys.argv[9], "times": os.environ["TIMES"], "line_bytes": line_bytes, "lines": lines, "bytes": size, "seconds": round(secs, 3),
    "lines_per_second": round(lines / secs), "mb_per_second": round(size / secs / 1e6, 1),
    "agent_cpu_seconds": round(cpu, 2), "agent_cpu_seconds_per_gb": round(cpu / (size / 1e9), 2),
    "agent_peak_rss_mib": round(hwm / 1024, 1),
    # What the parser made of the lines: the bytes that went into gzip.
    "entry_bytes_per_line": round(int(sys.argv[10]) / lines, 1),
    "receiver_rate": int(sys.argv[11]) if sys.argv[11] else None,
}))
PY
)
  echo "$out"
  results+=("$out")
 done
done

python3 - "${results[@]}" <<'PY'
import json, os, sys
print("\n| parser | line size | lines | MB | seconds | lines/s | MB/s | agent CPU-s per GB | agent peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for arg in sys.argv[1:]:
    r = json.loads(arg)
    print(f"| {r['parser']} | {r['line_bytes']} B | {r['lines']:,} | {r['bytes'] / 1e6:,.0f} | {r['seconds']:.2f} | "
          f"{r['lines_per_second']:,} | {r['mb_per_second']:.1f} | {r['agent_cpu_seconds_per_gb']:.2f} | "
          f"{r['agent_peak_rss_mib']:.1f} |")
PY
