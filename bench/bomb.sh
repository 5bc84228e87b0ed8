#!/usr/bin/env bash
# The gzip-bomb cost: an agent ships SLUICE_BOMB_LINES lines alone, then as many again
# while 4 clients send 64 MiB gzip bombs in a loop (forward_load.rs: with
# refusal_backoff off, and with the default 1 s), ROUNDS times; prints the agent's
# throughput beside the bombers as a share of its throughput alone, and fails if a round
# is below SLUICE_BOMB_RATIO (default 0.8). Release build, real TLS on loopback.
#
#   bench/bomb.sh                       # 3 rounds of 1,000,000 lines
#   ROUNDS=5 SLUICE_BOMB_LINES=2000000 bench/bomb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
export SLUICE_BOMB_LINES=${SLUICE_BOMB_LINES:-1000000}
export SLUICE_BOMB_RATIO=${SLUICE_BOMB_RATIO:-0.8}
cargo build --release -q -p sluice-relay -p sluice-agent --bins
cargo test --release -q -p sluice-e2e --test forward_load --no-run
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  cargo test --release -q -p sluice-e2e --test forward_load bomb -- --nocapture --test-threads 1 2>&1 \
    | grep -E "agent \(|panicked|FAILED" || true
done
