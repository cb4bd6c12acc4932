#!/usr/bin/env bash
# How fast a node drains a backlog, for several backlog sizes: a queue that drains slower the
# longer it is collapses exactly when it is needed (issue 20).
#
# For each size N: a node queues N async calls of the hello function that may not start for an
# hour (wrk, `sluice-start-after`), stops, the backlog is made runnable at once (its `run_after`
# set to 0 in the stopped node's database), and the node starts again. The drain rate is N / the
# time from the restart until no call is queued or running; the table also shows the enqueue
# rate that built the backlog.
#
# Usage: bench/drain.sh     (SIZES="10000 100000" by default, e.g. SIZES="10000 100000 1000000";
#                            SLUICE=path/to/sluice measures another build, unbuilt;
#                            PERF=/tmp/drain.perf records each drain with perf, to PERF.N)
# Needs: wrk, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SIZES=${SIZES:-"10000 100000"}
need_wrk
sluice_bin
HELLO=$(hello_wasm)
data=$(bench_tmp)
pid=

start() {
  start_node "$data/n" --tenant-queued-max 100000000 --tenant-queued-bytes-max 100GiB ${SERVE_ARGS:-}
  pid=$NODE_PID URL=$NODE_URL
}
stop() { stop_node "$pid"; pid=; }
sql() { queue_sql "$data/n/sluice.db" "$1"; }

echo "| backlog | enqueued/s while building it | drained in s | drain inv/s | node cores busy | node CPU µs per call |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in $SIZES; do
  rm -rf "$data/n"
  start
  export SLUICE_URL=$URL SLUICE_TOKEN=$NODE_TOKEN
  "$SLUICE" deploy hello "$HELLO" >/dev/null
  conns=50
  export BACKLOG_PER_THREAD=$(( (n + 1) / 2 )) START_AFTER=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
  t0=$(date +%s%3N)
  # Each wrk thread stops sending after its share (bench/drain.lua); wrk itself stops on SIGINT.
  wrk -t2 -c"$conns" -d1h -s bench/drain.lua "$URL/fn/default/hello/" > "$data/wrk.out" &
  wrk_pid=$!
  sql "wait-pending-$n"
  t1=$(date +%s%3N)
  kill -INT "$wrk_pid"; wait "$wrk_pid" || true
  wrk_summary "$data/wrk.out" > /dev/null
  stop
  queued=$(sql runnable)
  start
  t2=$(date +%s%3N)
  cpu0=$(cpu_ticks "$pid")
  [ -n "${PERF:-}" ] && { perf record -a -F 99 -o "$PERF.$n" 2> /dev/null & perf_pid=$!; }
  sql wait-drained
  t3=$(date +%s%3N)
  cpu1=$(cpu_ticks "$pid")
  alive "$pid" "the node"
  [ -n "${PERF:-}" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
  stop
  awk -v n="$queued" -v build="$((t1 - t0))" -v drain="$((t3 - t2))" -v cpu="$((cpu1 - cpu0))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN{printf "| %d | %.0f | %.1f | %.0f | %.2f | %.0f |\n", n, n*1000/build, drain/1000, n*1000/drain, cpu/hz*1000/drain, cpu/hz*1e6/n}'
done
echo
echo "$("$SLUICE" --version 2>/dev/null || echo sluice), $(nproc) cores, SQLite WAL synchronous=FULL, RUST_BACKTRACE unset"
