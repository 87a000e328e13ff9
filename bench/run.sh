#!/usr/bin/env bash
# Reproduces every figure of BENCHMARKS.md in one run on this machine:
# imgate, a Socket.IO 4 + Redis cluster and the raw relay, driven by the same load generator.
#   bench/run.sh            # full run (about 10 minutes)
#   RUNS=1 QUICK=1 bench/run.sh   # a quick pass with small sizes
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  USERS=60; SECONDS_=3; IDLE=2000,5000; FAIL_USERS=200; LOGIN_S=2; MEMBERS=100
else
  USERS=300; SECONDS_=10; IDLE=10000,50000,100000; FAIL_USERS=1000; LOGIN_S=5; MEMBERS=1000
  # 50k and 100k need an open-file limit above 100k; the bench clamps to the limit it has.
fi

bench/setup.sh
cargo build --release --bins --examples
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

mkdir -p bench/results
OUT="bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
B=target/release/examples/bench
echo "== results go to $OUT"

for run in $(seq "$RUNS"); do
  for t in imgate socketio relay; do
    echo "== chat $t (run $run)"
    $B --json-out "$OUT" chat --target "$t" --users "$USERS" --window 8 --seconds "$SECONDS_"
  done
done

# Latency at half of imgate's measured maximum.
HALF=$(python3 bench/summarize.py "$OUT" --half-rate imgate)
for run in $(seq "$RUNS"); do
  for t in imgate socketio; do
    echo "== chat $t at $HALF msgs/s (run $run)"
    $B --json-out "$OUT" chat --target "$t" --users "$USERS" --window 8 --seconds "$SECONDS_" --rate "$HALF"
  done
done

for t in imgate socketio relay; do
  echo "== idle $t"
  $B --json-out "$OUT" idle --target "$t" --sessions "$IDLE"
done

for run in $(seq "$RUNS"); do
  echo "== login (run $run)"
  $B --json-out "$OUT" login --concurrency 64 --seconds "$LOGIN_S"
  echo "== failover (run $run)"
  $B --json-out "$OUT" failover --users "$FAIL_USERS"
done

# Rooms: one room of $MEMBERS members over 3 nodes, 10 senders; and membership memory.
for run in $(seq "$RUNS"); do
  for t in imgate socketio; do
    echo "== room $t (run $run)"
    $B --json-out "$OUT" room --target "$t" --members "$MEMBERS" --senders 10 --window 4 --seconds "$SECONDS_"
  done
done
echo "== room memory"
target/release/examples/room_memory --rooms 1000 --members 1000 | tail -1 >> "$OUT"

python3 bench/summarize.py "$OUT"
