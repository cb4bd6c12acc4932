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
unset RUST_BACKTRACE
DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 10 100"}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
  cargo build --release -q -p sluice-cli
  SLUICE=target/release/sluice
fi
HELLO=$(scripts/build-guests.sh | sed -n 1p)
data=$(mktemp -d)
"$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$data" 2> "$data/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 500); do grep -q 'listening on' "$data/log" && break; sleep 0.01; done
URL=$(grep -o 'listening on http://[0-9.:]*' "$data/log" | sed 's/listening on //')
export SLUICE_URL=$URL SLUICE_TOKEN=$(cat "$data/admin.token")
"$SLUICE" deploy hello "$HELLO" >/dev/null

# Counts invocations by state straight from the database file (WAL allows a reader alongside);
# "wait-drained" asks two small partial indexes whether anything is open, not the table (a scan
# of every row ever run, every 50 ms, took a core's share from the node it measured).
# One python process per step, not per poll (a process per poll, through a pyenv shim, took a
# tenth of the machine from the node it measured): "wait-drained" polls in-process.
PY=$(command -v /usr/bin/python3 || command -v python3)
count() {
  "$PY" - "$data/sluice.db" "$1" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=10)
if sys.argv[2] == "wait-drained":
    while db.execute("SELECT EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_pending_age"
                     " WHERE status IN ('queued','failed'))"
                     " OR EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_leases"
                     " WHERE status = 'running')").fetchone()[0]:
        time.sleep(0.02)
    sys.exit(0)
q = {
    "done": "SELECT count(*) FROM invocations WHERE mode='async' AND status='succeeded'",
}[sys.argv[2]]
print(db.execute(q).fetchone()[0])
PY
}

echo "| clients | 202/s | 202 p50 ms | 202 p99 ms | completed | end-to-end inv/s |"
echo "| --- | --- | --- | --- | --- | --- |"
to_ms() { case $1 in *us) echo "${1%us}" | awk '{printf "%.2f", $1/1000}';; *ms) echo "${1%ms}";; *s) echo "${1%s}" | awk '{printf "%.2f", $1*1000}';; esac; }
for c in $CLIENTS; do
  before=$(count done)
  t0=$(date +%s%3N)
  wrk -t1 -c"$c" -d"$DURATION" --latency -s bench/async.lua "$URL/fn/default/hello/" > "$data/wrk.out"
  count wait-drained
  t1=$(date +%s%3N)
  after=$(count done)
  grep -q 'Non-2xx' "$data/wrk.out" && { echo "non-2xx answers:" >&2; cat "$data/wrk.out" >&2; exit 1; }
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$data/wrk.out")
  p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$data/wrk.out")")
  p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$data/wrk.out")")
  done_n=$((after - before))
  e2e=$(awk -v n="$done_n" -v ms="$((t1 - t0))" 'BEGIN{printf "%.0f", n*1000/ms}')
  echo "| $c | $rps | $p50 | $p99 | $done_n | $e2e |"
done
echo
echo "wrk -t1 -d$DURATION on loopback, $(nproc) cores, SQLite WAL synchronous=FULL, RUST_BACKTRACE unset"
