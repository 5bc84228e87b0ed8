#!/usr/bin/env bash
# Agent tailing benchmark: a release sluice-agent tails a file of synthetic nginx access
# lines and ships it over TLS (gzip CompressedPackedForward, with acks) to a release
# sluice-relay whose only sink discards. Two files: 100-byte lines and 1 KiB lines.
#
#   bench/tail.sh                    # 1 GiB per file (the numbers for bench/RESULTS.md)
#   SIZE_MB=4 bench/tail.sh          # a quick check that the script works
#   LINE_SIZES="100" SIZE_MB=256 bench/tail.sh
#   PARSERS="nginx_read_time nginx" bench/tail.sh   # the cost of taking the log's time
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

# shellcheck source=../scripts/lib/local.sh
source scripts/lib/local.sh
cargo build --release -q -p sluice-relay -p sluice-agent
BIN=$ROOT/target/release
[[ -f $WORK/tls/relay.pem ]] || local_certs "$WORK/tls" "bench CA" 30

# generate LINE_BYTES SIZE_MB PATH: synthetic nginx combined-format lines of exactly
# LINE_BYTES bytes (newline included), varied in every field, each with a unique request
# id, so neither gzip nor the reader sees repeated padding.
generate() {
  python3 - "$1" "$2" "$3" <<'PY'
import random, sys
line_bytes, size_mb, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rnd = random.Random(42)
methods = ["GET"] * 8 + ["POST"] * 3 + ["PUT", "DELETE", "HEAD", "PATCH"]
paths = ["/", "/index.html", "/api/v1/items", "/api/v1/items/{n}", "/api/v2/users/{n}/orders",
         "/static/js/app.{h}.js", "/static/css/site.{h}.css", "/login", "/logout", "/search",
         "/healthz", "/metrics", "/img/{h}.png", "/cart/{n}/checkout", "/feed.xml"]
codes = [200] * 20 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503]
agents = ["Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
          "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
          "curl/8.5.0", "Go-http-client/1.1", "python-requests/2.31.0", "kube-probe/1.29",
          "Googlebot/2.1 (+http://www.google.com/bot.html)"]
referers = ["-", "https://www.example.com/", "https://shop.example.com/cart", "https://www.google.com/",
            "https://news.ycombinator.com/item?id={n}"]
words = ("alpha beta gamma delta region zone user session cart order item page sort filter "
         "limit offset lang theme promo ref utm_source utm_medium campaign token").split()
alnum = "abcdefghijklmnopqrstuvwxyz0123456789"

def pool_line():
    n = rnd.randrange(1, 10_000_000)
    h = "".join(rnd.choice("0123456789abcdef") for _ in range(8))
    ip = f"{rnd.randrange(1, 224)}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    user = "-" if rnd.random() < 0.9 else rnd.choice(["alice", "bob", "carol", "svc-batch"])
    ts = f"{rnd.randrange(1, 29):02d}/Nov/2026:{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d} +0000"
    path = rnd.choice(paths).format(n=n, h=h)
    query = "&".join(f"{rnd.choice(words)}={''.join(rnd.choice(alnum) for _ in range(rnd.randrange(2, 12)))}"
                     for _ in range(rnd.randrange(0, 40)))
    size = rnd.randrange(0, 200_000)
    return (ip, user, ts, rnd.choice(methods), path, query, rnd.choice(codes), size,
            rnd.choice(referers).format(n=n), rnd.choice(agents))

pool = [pool_line() for _ in range(20_000)]
target = size_mb * 1024 * 1024
width = line_bytes - 1  # without the newline
written, rid = 0, 0
with open(path, "w", buffering=1 << 20) as f:
    batch = []
    while written < target:
        ip, user, ts, method, p, query, code, size, ref, agent = pool[rid % len(pool)]
        head = f'{ip} - {user} [{ts}] "{method} '
        rest = f' HTTP/1.1" {code} {size}'
        rid_s = f" rid={rid:010x}"
        extra = f' "{ref}" "{agent}"'
        room = width - len(head) - len(rest) - len(rid_s)
        p = p[: max(1, room)]  # 100-byte lines get shorter paths
        room -= len(p)
        if room >= len(extra):
            room -= len(extra)
        else:
            extra = ""
        q = ""
        if room > 1:
            # The query string fills the line: parameters of other pool entries, so
            # every line differs and nothing is a repeated pad.
            more = (pool[(rid * k + 7) % len(pool)][5] for k in (1, 3, 5, 7, 11, 13, 17))
            q = ("?" + "&".join(filter(None, (query, *more))))[:room]
        line = (head + p + q + rest + extra + rid_s)[:width]
        line += "".join(alnum[(rid + i) % 36] for i in range(width - len(line)))
        batch.append(line)
        written += line_bytes
        rid += 1
        if len(batch) >= 10_000:
            f.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        f.write("\n".join(batch) + "\n")
print(rid)
PY
}

metric() { # PORT NAME: the sum of a metric's samples (0 if absent)
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

RELAY=""
AGENT=""
cleanup() {
  [[ -n $AGENT ]] && kill "$AGENT" 2>/dev/null
  [[ -n $RELAY ]] && kill "$RELAY" 2>/dev/null
  wait 2>/dev/null || true
}
trap cleanup EXIT

relay_port=$(free_port)
start_discard_relay "$BIN" "$WORK" interval "$relay_port"

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
  file=$WORK/lines-$line_bytes-$SIZE_MB.log
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
[metrics]
listen = "127.0.0.1:$agent_metrics"
TOML
  start=$(date +%s.%N)
  SLUICE_LOG=warn "$BIN/sluice-agent" --config "$WORK/agent.toml" 2>"$WORK/agent-$line_bytes.log" &
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
  out=$(python3 - "$line_bytes" "$lines" "$bytes" "$start" "$end" "$ticks" "$CLK_TCK" "$hwm" "$parser" <<'PY'
import json, sys
line_bytes, lines, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start, end, ticks, tck, hwm = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
secs = end - start
cpu = ticks / tck
print(json.dumps({
    "parser": sys.argv[9], "line_bytes": line_bytes, "lines": lines, "bytes": size, "seconds": round(secs, 3),
    "lines_per_second": round(lines / secs), "mb_per_second": round(size / secs / 1e6, 1),
    "agent_cpu_seconds": round(cpu, 2), "agent_cpu_seconds_per_gb": round(cpu / (size / 1e9), 2),
    "agent_peak_rss_mib": round(hwm / 1024, 1),
}))
PY
)
  echo "$out"
  results+=("$out")
 done
done

python3 - "${results[@]}" <<'PY'
import json, sys
print("\n| parser | line size | lines | MB | seconds | lines/s | MB/s | agent CPU-s per GB | agent peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for arg in sys.argv[1:]:
    r = json.loads(arg)
    print(f"| {r['parser']} | {r['line_bytes']} B | {r['lines']:,} | {r['bytes'] / 1e6:,.0f} | {r['seconds']:.2f} | "
          f"{r['lines_per_second']:,} | {r['mb_per_second']:.1f} | {r['agent_cpu_seconds_per_gb']:.2f} | "
          f"{r['agent_peak_rss_mib']:.1f} |")
PY
