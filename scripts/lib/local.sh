# shellcheck shell=bash
# Helpers for running sluice on this machine: scripts/quickstart and bench/*.sh.

# free_port: a loopback TCP port nobody listens on right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# local_certs DIR CA_NAME DAYS: a CA (DIR/ca.pem) and a relay certificate for localhost and
# 127.0.0.1 signed by it (DIR/relay.pem, DIR/relay.key).
local_certs() {
  local dir=$1 name=$2 days=$3
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=$name" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/relay.key" -out "$dir/relay.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/relay.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$days" -extfile "$dir/ext.cnf" -out "$dir/relay.pem" 2>/dev/null
}

# wait_port PORT: until something accepts connections on 127.0.0.1:PORT (10 s at most).
wait_port() {
  local _
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on 127.0.0.1:$1 after 10 s" >&2
  return 1
}

# start_discard_relay BIN WORK FSYNC PORT [RATE]: a release relay over TLS (WORK/tls from
# local_certs) whose only sink discards; sets RELAY to its pid and RELAY_METRICS to its
# metrics port, and waits until it listens. RATE (bytes/s): server.rate_limit, a receiver
# slower than its client.
start_discard_relay() {
  local bin=$1 work=$2 fsync=$3 port=$4 rate=${5:-}
  rm -rf "$work/relay-data"
  RELAY_METRICS=$(free_port)
  local limit=""
  [[ -n $rate ]] && limit="rate_limit = { bytes_per_sec = $rate }"
  cat >"$work/relay.toml" <<TOML
[relay]
id = "bench"
data_dir = "$work/relay-data"
[server]
listen = "127.0.0.1:$port"
tls = { cert = "$work/tls/relay.pem", key = "$work/tls/relay.key" }
$limit
[spool]
fsync = "$fsync"
segment_size = "64 MiB"
max_size = "8 GiB"
[metrics]
listen = "127.0.0.1:$RELAY_METRICS"
[[sink]]
name = "discard"
type = "discard"
TOML
  SLUICE_LOG=warn "$bin/sluice-relay" --config "$work/relay.toml" 2>"$work/relay.log" &
  RELAY=$!
  wait_port "$port"
}

# cpu_seconds PID: user + system CPU seconds of a process so far (clock ticks of 1/100 s).
cpu_seconds() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

# sink_done METRICS_PORT N: until the relay's sink "out" delivered N events
# (sluice_relay_sink_events_total), 600 s at most. Needs $PY (the venv's python).
sink_done() {
  "$PY" - "$1" "$2" <<'PY'
import sys, time, urllib.request
port, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        text = ""
    done = sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith('sluice_relay_sink_events_total{sink="out"}'))
    if done >= n:
        sys.exit(0)
    time.sleep(0.05)
sys.exit("the sink did not deliver every event within 600 s")
PY
}

# metric PORT NAME: the sum of a metric's samples on a local /metrics (0 if absent).
metric() {
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# stop_agent_and_relay: kills $AGENT and $RELAY if set (an EXIT trap of the bench scripts).
stop_agent_and_relay() {
  [[ -n ${AGENT:-} ]] && kill "$AGENT" 2>/dev/null
  [[ -n ${RELAY:-} ]] && kill "$RELAY" 2>/dev/null
  wait 2>/dev/null || true
}
