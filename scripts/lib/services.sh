# shellcheck shell=bash
# The real services of the end-to-end tests, on free loopback ports:
#   tansu  Kafka-API broker, memory:// storage (nothing on disk; gone when it stops)
#   moto   S3-API server
#
#   source scripts/lib/services.sh
#   trap services_stop EXIT
#   services_start            # both; or services_start kafka / services_start s3
#
# Needs deps_venv and deps_tansu first (scripts/lib/deps.sh, sourced here). Call
# services_start in the shell that runs the tests, not in $(...) or a subshell: it
# exports, for the tests,
#   SLUICE_TEST_KAFKA=127.0.0.1:PORT   SLUICE_TEST_S3_ENDPOINT=http://127.0.0.1:PORT
#   SLUICE_TEST_PYTHON=<venv>/bin/python   SLUICE_TEST_PY_DIR=<repo>/tests/py
#   AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
# Readiness is a condition with a deadline (tests/py/wait_ready.py: the broker serves
# metadata advertising exactly that address; moto answers ListBuckets), never a sleep.
# The services are background jobs of that shell: a bare `wait` there waits for them too
# (wait for your own PIDs). They get SIGTERM if this shell dies, even by SIGKILL (setpriv --pdeathsig).
# Logs: $SLUICE_SERVICES_DIR (default target/test-services)/{tansu,moto}.log.
# SLUICE_TANSU_RUST_LOG sets tansu's RUST_LOG (default warn).

# shellcheck source=scripts/lib/deps.sh
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

SLUICE_SERVICES_DIR=${SLUICE_SERVICES_DIR:-$SLUICE_ROOT/target/test-services}
SLUICE_SERVICE_PIDS=()
SLUICE_SERVICE_NAMES=()

_services_py() { echo "${SLUICE_TEST_PYTHON:-$SLUICE_VENV_PYTHON}"; }

_services_free_port() {
  "$(_services_py)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_services_alive() { # PID: running and not a zombie
  kill -0 "$1" 2>/dev/null || return 1
  [[ ! -r /proc/$1/stat ]] || [[ "$(cut -d' ' -f3 <"/proc/$1/stat" 2>/dev/null)" != Z ]]
}

_services_reap() { # PID: TERM, up to 10 s, then KILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    _services_alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

_services_run() { # NAME PORT LOG: starts the service in the background, sets _svc_pid
  local name=$1 port=$2 log=$3 guard=()
  command -v setpriv >/dev/null && guard=(setpriv --pdeathsig TERM --)
  case $name in
    tansu)
      env -u OTEL_EXPORTER_OTLP_ENDPOINT -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL \
        -u STORAGE_ENGINE -u SCHEMA_REGISTRY RUST_LOG="${SLUICE_TANSU_RUST_LOG:-warn}" \
        "${guard[@]}" tansu broker --storage-engine memory://tansu/ \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        >>"$log" 2>&1 </dev/null &
      ;;
    moto)
      "${guard[@]}" "$(dirname "$(_services_py)")/moto_server" -H 127.0.0.1 -p "$port" >>"$log" 2>&1 </dev/null &
      ;;
  esac
  _svc_pid=$!
}

# Starts tansu|moto and waits until ready; 3 tries on fresh ports (another process may
# take a port between the probe and the bind).
_services_start_one() {
  local name=$1 log=$SLUICE_SERVICES_DIR/$1.log port attempt ready what
  : >"$log"
  for attempt in 1 2 3; do
    port=$(_services_free_port)
    echo "== attempt $attempt on port $port ($(date -u +%FT%TZ))" >>"$log"
    _services_run "$name" "$port" "$log"
    if [[ $name == tansu ]]; then what=(--kafka "127.0.0.1:$port"); else what=(--s3 "http://127.0.0.1:$port"); fi
    if ready=$("$(_services_py)" "$SLUICE_ROOT/tests/py/wait_ready.py" "${what[@]}" --pid "$_svc_pid" \
      --timeout "${SLUICE_SERVICES_TIMEOUT:-60}" 2>>"$log"); then
      SLUICE_SERVICE_PIDS+=("$_svc_pid")
      SLUICE_SERVICE_NAMES+=("$name")
      printf '  %-5s ready on 127.0.0.1:%s (pid %s) %s, log %s\n' "$name" "$port" "$_svc_pid" "$ready" "$log"
      case $name in
        tansu) export SLUICE_TEST_KAFKA=127.0.0.1:$port ;;
        moto) export SLUICE_TEST_S3_ENDPOINT=http://127.0.0.1:$port ;;
      esac
      return 0
    fi
    _services_reap "$_svc_pid"
  done
  echo "services: $name did not become ready; last lines of $log:" >&2
  tail -n 30 "$log" >&2
  return 1
}

services_start() { # [kafka] [s3]  (default both)
  local want=("$@")
  ((${#want[@]})) || want=(kafka s3)
  mkdir -p "$SLUICE_SERVICES_DIR"
  [[ -x "$(_services_py)" ]] || { echo "services: no Python at $(_services_py); run deps_venv first" >&2; return 1; }
  export SLUICE_TEST_PYTHON SLUICE_TEST_PY_DIR
  SLUICE_TEST_PYTHON=$(_services_py)
  SLUICE_TEST_PY_DIR=$SLUICE_ROOT/tests/py
  export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in tests/py
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  unset AWS_SESSION_TOKEN AWS_PROFILE
  local w
  for w in "${want[@]}"; do
    case $w in
      kafka) _services_start_one tansu ;;
      s3) _services_start_one moto ;;
      *) echo "services_start: unknown service $w (kafka, s3)" >&2; return 2 ;;
    esac
  done
}

# Non-zero (and says which) when a service started here has exited since.
services_check() {
  local i rc=0
  for i in "${!SLUICE_SERVICE_PIDS[@]}"; do
    if ! _services_alive "${SLUICE_SERVICE_PIDS[$i]}"; then
      echo "services: ${SLUICE_SERVICE_NAMES[$i]} (pid ${SLUICE_SERVICE_PIDS[$i]}) exited during the run; last lines of $SLUICE_SERVICES_DIR/${SLUICE_SERVICE_NAMES[$i]}.log:" >&2
      tail -n 30 "$SLUICE_SERVICES_DIR/${SLUICE_SERVICE_NAMES[$i]}.log" >&2
      rc=1
    fi
  done
  return $rc
}

# Stops every service services_start started (safe to call twice, or with none running).
services_stop() {
  local pid
  for pid in "${SLUICE_SERVICE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${SLUICE_SERVICE_PIDS[@]}"; do _services_reap "$pid"; done
  SLUICE_SERVICE_PIDS=()
  SLUICE_SERVICE_NAMES=()
}
