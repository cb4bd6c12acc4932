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
unset RUST_BACKTRACE
SIZES=${SIZES:-"10000 100000"}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
  cargo build --release -q -p sluice-cli
  SLUICE=target/release/sluice
fi
HELLO=$(scripts/build-guests.sh | sed -n 1p)
PY=$(command -v /usr/bin/python3 || command -v python3)
data=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$data"' EXIT

start() {
  : > "$data/log"
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$data/n" \
    --tenant-queued-max 100000000 --tenant-queued-bytes-max 100GiB ${SERVE_ARGS:-} 2>> "$data/log" &
  pid=$!
  for _ in $(seq 1 3000); do grep -q 'listening on' "$data/log" && break; sleep 0.01; done
  URL=$(grep -o 'listening on http://[0-9.:]*' "$data/log" | sed 's/listening on //')
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

# One python process per step, not per poll (a process per poll, through a pyenv shim, took a
# tenth of the machine from the node it measured). The polls walk small partial indexes.
sql() {
  "$PY" - "$data/n/sluice.db" "$1" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
PENDING = ("SELECT count(*) FROM invocations INDEXED BY invocations_pending_age"
           " WHERE status IN ('queued','failed')")
step = sys.argv[2]
if step == "wait-drained":
    pause = 0.02
    while db.execute("SELECT EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_pending_age"
                     " WHERE status IN ('queued','failed'))"
                     " OR EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_leases"
                     " WHERE status = 'running')").fetchone()[0]:
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)
elif step.startswith("wait-pending-"):
    n = int(step.removeprefix("wait-pending-"))
    while db.execute(PENDING).fetchone()[0] < n:
        time.sleep(0.2)
elif step == "runnable":
    print(db.execute("UPDATE invocations SET run_after = 0 WHERE status IN ('queued','failed')").rowcount)
    db.commit()
else:
    sys.exit(f"unknown step {step}")
PY
}

echo "| backlog | enqueued/s while building it | drained in s | drain inv/s | node cores busy | node CPU µs per call |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in $SIZES; do
  rm -rf "$data/n"
  start
  export SLUICE_URL=$URL SLUICE_TOKEN=$(cat "$data/n/admin.token")
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
  grep -q 'Non-2xx' "$data/wrk.out" && { echo "non-2xx answers:" >&2; cat "$data/wrk.out" >&2; exit 1; }
  stop
  queued=$(sql runnable)
  start
  t2=$(date +%s%3N)
  cpu0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  [ -n "${PERF:-}" ] && { perf record -a -F 99 -o "$PERF.$n" 2> /dev/null & perf_pid=$!; }
  sql wait-drained
  t3=$(date +%s%3N)
  cpu1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  [ -n "${PERF:-}" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
  stop
  awk -v n="$queued" -v build="$((t1 - t0))" -v drain="$((t3 - t2))" -v cpu="$((cpu1 - cpu0))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN{printf "| %d | %.0f | %.1f | %.0f | %.2f | %.0f |\n", n, n*1000/build, drain/1000, n*1000/drain, cpu/hz*1000/drain, cpu/hz*1e6/n}'
done
echo
echo "$("$SLUICE" --version 2>/dev/null || echo sluice), $(nproc) cores, SQLite WAL synchronous=FULL, RUST_BACKTRACE unset"
