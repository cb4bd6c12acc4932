#!/usr/bin/env bash
# Async-path benchmark: requests answered 202 (durably queued, SQLite WAL synchronous=FULL) →
# executed → result recorded, with a trivial function, for 1, 10 and 100 concurrent clients.
# End-to-end throughput = invocations completed / (time from the first request until the queue
# is drained). The 202 latency comes from wrk.
#
# Usage: bench/async.sh            (DURATION=10s CLIENTS="1 10 100" optional;
#                                   SLUICE=path/to/sluice measures another build, unbuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 10 100"}
need_wrk
sluice_bin
HELLO=$(hello_wasm)
data=$(bench_tmp)
start_node "$data/n"
export SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN
"$SLUICE" deploy hello "$HELLO" >/dev/null

echo "| clients | 202/s | 202 p50 ms | 202 p99 ms | completed | end-to-end inv/s | node CPU µs/inv |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for c in $CLIENTS; do
  before=$(queue_sql "$data/n/sluice.db" done)
  c0=$(cpu_ticks "$NODE_PID")
  t0=$(date +%s%3N)
  wrk -t1 -c"$c" -d"$DURATION" --latency -s bench/async.lua "$NODE_URL/fn/default/hello/" > "$data/wrk.out"
  queue_sql "$data/n/sluice.db" wait-drained
  t1=$(date +%s%3N)
  c1=$(cpu_ticks "$NODE_PID")
  alive "$NODE_PID" "the node"
  after=$(queue_sql "$data/n/sluice.db" done)
  read -r rps p50 p99 <<< "$(wrk_summary "$data/wrk.out")"
  done_n=$((after - before))
  e2e=$(awk -v n="$done_n" -v ms="$((t1 - t0))" 'BEGIN{printf "%.0f", n*1000/ms}')
  cpu=$(awk -v t="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v n="$done_n" 'BEGIN{printf "%.0f", t*1e6/hz/n}')
  echo "| $c | $rps | $p50 | $p99 | $done_n | $e2e | $cpu |"
done
echo
echo "wrk -t1 -d$DURATION on loopback, $(nproc) cores, SQLite WAL synchronous=FULL, RUST_BACKTRACE unset"
