#!/usr/bin/env bash
# How long an async call waits on an idle cluster: from its 202 to its start, when the node that
# accepted it runs nothing (`--async-inflight-max 0`) and another node must be woken. The other
# node learns of the call by a PostgreSQL notification at the enqueue's commit (LISTEN
# sluice_queue); without one it would find it at its next poll (every 200 ms).
#
# Usage: bench/wake-pg.sh        (CALLS=50 GAP=0.1 PGBASE=postgres://postgres@127.0.0.1:5432
#                                 SLUICE_BIN=<prebuilt binary: no cargo build> HELLO=<hello.wasm>)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
CALLS=${CALLS:-50}
GAP=${GAP:-0.1}
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
SLUICE=${SLUICE_BIN:-${SLUICE:-}}
sluice_bin
HELLO=${HELLO:-$(scripts/build-guests.sh | sed -n 1p)}
db="sluice_wake_$$"
dir=$(bench_tmp)
cleanup() {
  bench_cleanup
  psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql "$PGBASE/postgres" -qc "CREATE DATABASE $db" >/dev/null
start() { # start NAME EXTRA-ARGS...: sets $url to the node's URL
  local name=$1; shift
  start_node "$dir/$name" --store "$PGBASE/$db" "$@"
  url=$NODE_URL
}
start front --async-inflight-max 0
front=$url
start worker
export SLUICE_TOKEN=$(cat "$dir/front/admin.token")
SLUICE_URL=$front "$SLUICE" deploy hello "$HELLO" >/dev/null
sleep 1
for _ in $(seq 1 "$CALLS"); do
  curl -sf -o /dev/null -X POST -H "Prefer: respond-async" -H "Authorization: Bearer $SLUICE_TOKEN" "$front/fn/default/hello"
  sleep "$GAP"
done
for _ in $(seq 1 100); do
  [ "$(psql "$PGBASE/$db" -Atc "SELECT count(*) FROM invocations WHERE mode = 'async' AND status <> 'succeeded'")" = 0 ] && break
  sleep 0.1
done
echo "| calls | 202 → start p50 ms | p90 ms | max ms |"
echo "| --- | --- | --- | --- |"
psql "$PGBASE/$db" -Atc "
  SELECT '| ' || count(*) || ' | '
         || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - created_at)::numeric, 1) || ' | '
         || round(percentile_cont(0.9) WITHIN GROUP (ORDER BY started_at - created_at)::numeric, 1) || ' | '
         || max(started_at - created_at) || ' |'
  FROM invocations WHERE mode = 'async' AND status = 'succeeded'"
echo
echo "idle 2-node cluster on one PostgreSQL; the accepting node runs nothing, the other is woken by NOTIFY; ${GAP}s between calls; timestamps: created_at by the accepting node, started_at by the database clock (one machine)"
