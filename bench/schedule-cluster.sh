#!/usr/bin/env bash
# Schedules in a cluster (issue 23): NODES nodes on one PostgreSQL database fire SCHEDULES
# schedules every EVERY seconds for SECONDS; then, from the database: every occurrence due while
# they ran, enqueued exactly once (0 double fires, 0 missed), and the fire lateness (the
# invocation's created_at minus its occurrence) p50 / p99 / max. No node leads: each races the
# others for every due schedule (see ARCHITECTURE.md, "Schedules").
#
# Lateness, three ways: *runnable* (when the invocation was stored and its time had come,
# max(created_at, occurrence), minus the occurrence: what a scheduler promises); *stored*
# (created_at minus the occurrence; negative when fired ahead); *start* (started_at minus the
# occurrence: the runnable lateness plus the queue's wait for a slot, which for 10,000 calls due
# in one second on 2 cores is their execution time).
#
# Usage: bench/schedule-cluster.sh [NODES (3)] [SCHEDULES (10000)] [SECONDS (60)] [EVERY (10)]
#        PGBASE=postgres://postgres@127.0.0.1:5432 (a database is created and dropped)
#        SLUICE=target/debug/sluice uses that binary instead of building the release one.
#        SERVE_FLAGS="--schedule-fire-ahead 0" passes flags to every node.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
unset RUST_BACKTRACE
nodes=${1:-3}
schedules=${2:-10000}
seconds=${3:-60}
every=${4:-10}
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
sluice_bin
db="sluice_sched_$(date +%s)"
sql() { psql -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
sql "$PGBASE/postgres" -c "CREATE DATABASE $db"
cleanup() { bench_cleanup; sql "$PGBASE/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; }
trap cleanup EXIT
url="$PGBASE/$db"

urls=()
# shellcheck disable=SC2206
flags=(--store "$url" --tenant-schedules-max "$schedules" --tenant-queued-max 10000000 ${SERVE_FLAGS:-})
dir=$(bench_tmp)/node1
start_node "$dir" "${flags[@]}"
token=$NODE_TOKEN
urls+=("$NODE_URL")
# The others join: the database has keys already, so they make no token of their own.
for i in $(seq 2 "$nodes"); do
  dir=$(bench_tmp)/node$i
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$dir" "${flags[@]}" 2> "$dir.log" &
  BENCH_PIDS+=("$!")
  urls+=("$(wait_listening "$dir.log" "$!")")
done
export SLUICE_URL=${urls[0]} SLUICE_TOKEN=$token
"$SLUICE" deploy hello "$(hello_wasm)" >/dev/null
# Created through the nodes in turn, over keep-alive connections.
python3 - "$token" "$schedules" "$every" "${urls[@]}" <<'PY'
import http.client, json, sys, urllib.parse
token, n, every, urls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
conns = [http.client.HTTPConnection(urllib.parse.urlparse(u).netloc) for u in urls]
for i in range(n):
    c = conns[i % len(conns)]
    body = json.dumps({"name": f"s{i}", "function": "hello", "every_ms": every * 1000, "catchup": "all", "overlap": "allow"})
    c.request("POST", "/v1/tenants/default/schedules", body, {"authorization": f"Bearer {token}", "content-type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 201, (r.status, i)
PY
start_ms=$(date +%s%3N)
sleep "$seconds"
end_ms=$(date +%s%3N)
for i in $(seq 1 "$nodes"); do alive "${BENCH_PIDS[$((i-1))]}" "node $i"; done
# Pause them all in one statement: nothing fires while the database is read.
sql "$url" -c "UPDATE schedules SET paused = 1, revision = revision + 1" >/dev/null
sleep 1
sql "$url" -c "COPY (SELECT idempotency_key, created_at, started_at FROM invocations WHERE idempotency_key LIKE 'sched:%') TO STDOUT WITH CSV" \
  | python3 -c '
import csv, sys
start, end, every, n, nodes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) * 1000, int(sys.argv[4]), int(sys.argv[5])
seen, late, runnable, started, ahead, unstarted = {}, [], [], [], 0, 0
for key, created, began in csv.reader(sys.stdin):
    _, sid, t = key.split(":")
    k = (int(sid), int(t))
    seen[k] = seen.get(k, 0) + 1
    created, t = int(created), int(t)
    late.append(created - t)
    runnable.append(max(created, t) - t)
    ahead += created < t
    # Start lateness over the occurrences a whole period before the end (later ones may still
    # be waiting when the database is read); any of those not started counts as a gap.
    if t < end - every:
        if began:
            started.append(int(began) - t)
        else:
            unstarted += 1
double = sum(1 for c in seen.values() if c > 1)
# Due while they ran: every occurrence of the grid in (start + every, end - 2 s] (the first
# after the creations, which took a while, and none the pause could have cut short).
due = [t for t in range((start // every + 2) * every, end - 2000, every)]
ids = sorted({s for s, _ in seen})
missed = sum(1 for s in ids for t in due if (s, t) not in seen)
def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")
print(f"{nodes} nodes, {n} schedules every {every // 1000} s for {(end - start) // 1000} s: "
      f"{len(late)} fires ({ahead} ahead), {double} double, {missed} missed of {len(due) * len(ids)} due in the window")
print(f"  runnable lateness p50 {q(runnable, 0.5)} ms, p99 {q(runnable, 0.99)} ms, max {max(runnable)} ms")
print(f"  stored   lateness p50 {q(late, 0.5)} ms, p99 {q(late, 0.99)} ms, max {max(late)} ms")
print(f"  start    lateness p50 {q(started, 0.5)} ms, p99 {q(started, 0.99)} ms, max {max(started, default=0)} ms (of those due a period before the end: {len(started)} started, {unstarted} not)")
' "$start_ms" "$end_ms" "$every" "$schedules" "$nodes"
echo "reproduce: ${SERVE_FLAGS:+SERVE_FLAGS=\"$SERVE_FLAGS\" }bench/schedule-cluster.sh $nodes $schedules $seconds $every   ($(basename "$SLUICE"), $(nproc) cores, PostgreSQL $(sql "$PGBASE/postgres" -c 'SHOW server_version'))"
