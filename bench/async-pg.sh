#!/usr/bin/env bash
# Async end-to-end on PostgreSQL: sluice with 1, 2 and 3 nodes sharing one database, and the same
# workload through graphile-worker (npm, bench/peers/graphile) on the same server in the same run.
#
# Workload: 50 clients, each enqueueing its own request one after another (sluice: wrk, POST
# /fn/default/hello/ with `Prefer: respond-async`, answered 202 once durably queued; graphile-worker:
# addJob('noop') through WorkerUtils on a shared pool), a trivial function / no-op job, for
# DURATION; then wait until every invocation has completed. Time = first enqueue → last completion.
# For N sluice nodes the 50 connections are split across the nodes (one wrk -t1 per node); all
# nodes, wrk and PostgreSQL share this machine's cores, so more nodes means more processes on the
# same cores, not more hardware.
#
# CPU per invocation = utime+stime of the serving processes (sluice nodes, or graphile-worker's
# worker process) + all PostgreSQL processes (including backends that exit during the run, via the
# postmaster's cutime/cstime), before/after, divided by completed invocations. The load generators
# (wrk, the graphile client process) are not counted; the graphile client's CPU is printed below
# the table. Any other activity on the PostgreSQL server during the run is counted too.
#
# Usage: bench/async-pg.sh     (DURATION=10s NODES="1 2 3" JOBS=<graphile job count instead of
#                               DURATION> GW_CONCURRENCY=24 GW_LOCAL_QUEUE=500 GW_CLIENT_POOL=10
#                               PGBASE=postgres://postgres@127.0.0.1:5432 DRAIN_TIMEOUT=300
#                               SLUICE_BIN=<prebuilt binary: no cargo build> HELLO=<hello.wasm>
#                               optional)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
DURATION=${DURATION:-10s}
NODES=${NODES:-"1 2 3"}
JOBS=${JOBS:-}
CLIENTS=50
GW_CONCURRENCY=${GW_CONCURRENCY:-24}
GW_LOCAL_QUEUE=${GW_LOCAL_QUEUE:-500}
GW_CLIENT_POOL=${GW_CLIENT_POOL:-10}
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
for tool in wrk psql node npm curl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (wrk: apt-get install wrk)" >&2; exit 1; }
done
PEER=bench/peers/graphile
[ -d "$PEER/node_modules/graphile-worker" ] || npm ci --prefix "$PEER" --no-audit --no-fund --loglevel=error >&2
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release -q -p sluice-cli
  SLUICE_BIN=$PWD/target/release/sluice
fi
SLUICE=$SLUICE_BIN
[ -n "${HELLO:-}" ] || HELLO=$(scripts/build-guests.sh | sed -n 1p)
CLK_TCK=$(getconf CLK_TCK)

tmp=$(mktemp -d)
pids=()
dbs=()
sql() { psql -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
stop_nodes() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  local db
  stop_nodes
  for db in "${dbs[@]}"; do sql "$PGBASE/postgres" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
new_db() { # name → creates it, remembers it for the trap
  dbs+=("$1")
  sql "$PGBASE/postgres" -c "CREATE DATABASE \"$1\"" >/dev/null
}
drop_db() { sql "$PGBASE/postgres" -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" >/dev/null; }
run_id="sluice_bench_$$_$(date +%s)"

# CPU ticks: utime+stime+cutime+cstime of the given pids plus of every process named `postgres`
# (only the postmaster has cutime/cstime: its exited children).
cpu_ticks() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v want=" $* " '
    { o = index($0, "("); c = 0; for (i = length($0); i > 0; i--) if (substr($0, i, 1) == ")") { c = i; break }
      pid = substr($0, 1, o - 2); comm = substr($0, o + 1, c - o - 1)
      if (comm != "postgres" && index(want, " " pid " ") == 0) next
      n = split(substr($0, c + 2), f, " ")
      t += f[12] + f[13] + f[14] + f[15] }
    END { printf "%d\n", t }'
}
ms() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%d", t * 1000 / hz }'; }
now_ms() { date +%s%3N; }

# wrk script: bench/async.lua plus a done() that writes wrk's latency quantiles (every 0.05 %, in
# µs) and its request count, so that the 202 percentiles of several wrk processes can be merged.
cat bench/async.lua > "$tmp/async-q.lua"
cat >> "$tmp/async-q.lua" <<'LUA'
done = function(summary, latency, requests)
  local f = assert(io.open(os.getenv("WRK_QUANTILES"), "w"))
  f:write(summary.requests, "\n")
  for i = 1, 1999 do f:write(latency:percentile(i / 20), "\n") end
  f:write(latency.max, "\n")
  f:close()
end
LUA
# merged_pct P FILE... → the P-th percentile in ms of the union (each file's points weighted by its
# request count).
merged_pct() {
  local p=$1; shift
  local f
  for f in "$@"; do awk 'NR == 1 { w = $1 / 2000; next } { print $1, w }' "$f"; done | sort -n -k1,1 |
    awk -v p="$p" '{ v[NR] = $1; w[NR] = $2; tot += $2 }
      END { need = tot * p / 100; acc = 0
            for (i = 1; i <= NR; i++) { acc += w[i]; if (acc >= need - 1e-9) { printf "%.2f", v[i] / 1000; exit } }
            printf "%.2f", v[NR] / 1000 }'
}
wait_listening() { # dir pid what
  local _
  for _ in $(seq 1 1500); do
    grep -q 'listening on http://' "$1/log" && return 0
    kill -0 "$2" 2>/dev/null || { echo "sluice $3 exited:" >&2; cat "$1/log" >&2; exit 1; }
    sleep 0.01
  done
  echo "sluice $3 did not start within 15 s:" >&2; cat "$1/log" >&2; exit 1
}
start_node() { # store-url dir what [nowait]
  mkdir -p "$2"
  "$SLUICE" serve --store "$1" --listen 127.0.0.1:0 --data-dir "$2" 2> "$2/log" &
  pids+=($!)
  [ "${4:-}" = nowait ] || wait_listening "$2" "$!" "$3"
}
# until_drained db-url timeout-s: polls every 50 ms until no async invocation is open.
until_drained() {
  local deadline=$(($(date +%s) + $2)) open
  while :; do
    open=$(sql "$1" -c "$open_q")
    [ "$open" = 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { echo "still $open async invocations open after $2 s" >&2; exit 1; }
    sleep 0.05
  done
}
open_q="SELECT count(*) FROM invocations WHERE mode='async' AND status IN ('queued','running','failed')"
done_q="SELECT count(*) FROM invocations WHERE mode='async' AND status='succeeded'"
jget() { node -e 'const o = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log(o[process.argv[2]])' "$1" "$2"; }

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
rows=()

# ---- graphile-worker ----------------------------------------------------------------------------
gw_db="${run_id}_gw"
new_db "$gw_db"
if [ -n "$JOBS" ]; then gw_size=(--jobs "$JOBS"); gw_what="$JOBS jobs"; else gw_size=(--duration "$DURATION"); gw_what="enqueueing for $DURATION"; fi
node "$PEER/bench.mjs" --url "$PGBASE/$gw_db" "${gw_size[@]}" --clients "$CLIENTS" \
  --concurrency "$GW_CONCURRENCY" --local-queue "$GW_LOCAL_QUEUE" --client-pool "$GW_CLIENT_POOL" > "$tmp/gw.json"
drop_db "$gw_db"
gw_rate=$(jget "$tmp/gw.json" jobs_per_s)
[ "$(jget "$tmp/gw.json" completed)" -ge "$(jget "$tmp/gw.json" jobs)" ] || { echo "graphile-worker: not every job completed" >&2; cat "$tmp/gw.json" >&2; exit 1; }
rows+=("| graphile-worker $(jget "$tmp/gw.json" version) | 1 worker (concurrency $GW_CONCURRENCY) | $(jget "$tmp/gw.json" jobs) | $(jget "$tmp/gw.json" seconds) | $gw_rate | $(jget "$tmp/gw.json" enqueue_p50_ms) | $(jget "$tmp/gw.json" enqueue_p99_ms) | $(jget "$tmp/gw.json" cpu_ms_per_job) | 1.00× |")

# ---- sluice, N nodes on one database ------------------------------------------------------------
verdicts=()
for n in $NODES; do
  db="${run_id}_n$n"
  new_db "$db"
  url="$PGBASE/$db"
  urls=()
  # Node 1 creates the schema, tenant and admin key: it starts alone, the others once it listens.
  start_node "$url" "$tmp/n$n-1" "node 1 of $n"
  for i in $(seq 2 "$n"); do start_node "$url" "$tmp/n$n-$i" "node $i of $n" nowait; done
  for i in $(seq 2 "$n"); do wait_listening "$tmp/n$n-$i" "${pids[$((i - 1))]}" "node $i of $n"; done
  for i in $(seq 1 "$n"); do
    urls+=("$(grep -o 'listening on http://[0-9.:]*' "$tmp/n$n-$i/log" | head -1 | sed 's/listening on //')")
  done
  token=$(cat "$tmp/n$n-1/admin.token")
  SLUICE_URL=${urls[0]} SLUICE_TOKEN=$token "$SLUICE" deploy hello "$HELLO" >/dev/null

  # Every node must serve the deployment (and has its module ready) before the clock starts: one
  # async call per node until it is answered 202, then wait until they have run.
  for u in "${urls[@]}"; do
    code=
    for _ in $(seq 1 500); do
      code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Prefer: respond-async' \
        -H "Authorization: Bearer $token" --data x "$u/fn/default/hello/" || true)
      [ "$code" = 202 ] && break
      sleep 0.02
    done
    [ "$code" = 202 ] || { echo "sluice node $u answers $code, not 202, to an async call" >&2; exit 1; }
  done
  until_drained "$url" 30

  before=$(sql "$url" -c "$done_q")
  c0=$(cpu_ticks "${pids[@]}")
  t0=$(now_ms)
  wrk_pids=()
  for i in $(seq 1 "$n"); do
    c=$((CLIENTS / n + (i <= CLIENTS % n ? 1 : 0)))
    SLUICE_TOKEN=$token WRK_QUANTILES="$tmp/n$n-$i/q" \
      wrk -t1 -c"$c" -d"$DURATION" --latency -s "$tmp/async-q.lua" "${urls[$((i - 1))]}/fn/default/hello/" \
      > "$tmp/n$n-$i/wrk.out" &
    wrk_pids+=($!)
  done
  for p in "${wrk_pids[@]}"; do wait "$p"; done
  until_drained "$url" "$DRAIN_TIMEOUT"
  t1=$(now_ms)
  c1=$(cpu_ticks "${pids[@]}")
  after=$(sql "$url" -c "$done_q")
  qfiles=()
  for i in $(seq 1 "$n"); do
    out="$tmp/n$n-$i/wrk.out"
    if grep -q 'Non-2xx\|Socket errors' "$out"; then echo "node $i of $n: errors from wrk:" >&2; cat "$out" >&2; exit 1; fi
    qfiles+=("$tmp/n$n-$i/q")
  done
  done_n=$((after - before))
  secs=$(awk -v ms="$((t1 - t0))" 'BEGIN { printf "%.3f", ms / 1000 }')
  rate=$(awk -v n="$done_n" -v ms="$((t1 - t0))" 'BEGIN { printf "%.0f", n * 1000 / ms }')
  p50=$(merged_pct 50 "${qfiles[@]}")
  p99=$(merged_pct 99 "${qfiles[@]}")
  cpu=$(awk -v t="$((c1 - c0))" -v hz="$CLK_TCK" -v n="$done_n" 'BEGIN { printf "%.3f", t * 1000 / hz / n }')
  ratio=$(awk -v a="$rate" -v b="$gw_rate" 'BEGIN { printf "%.2f", a / b }')
  rows+=("| sluice | $n | $done_n | $secs | $rate | $p50 | $p99 | $cpu | ${ratio}× |")
  verdicts+=("$n node(s): $(awk -v r="$ratio" -v p="$p99" 'BEGIN { print ((r >= 5 ? "≥5× yes" : "≥5× NO") ", " (p <= 20 ? "p99 ≤ 20 ms yes" : "p99 ≤ 20 ms NO")) }')")
  stop_nodes
  drop_db "$db"
done

echo "| system | nodes | completed | first enqueue→last completion s | inv/s | 202 (enqueue) p50 ms | p99 ms | CPU ms per invocation (serving processes + postgres) | ratio vs graphile-worker |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "$CLIENTS clients, sluice: wrk -t1 per node for $DURATION (connections split across nodes); graphile-worker: $gw_what, worker in its own process, concurrency $GW_CONCURRENCY, local queue $GW_LOCAL_QUEUE, batched completion, clients sharing a pool of $GW_CLIENT_POOL connections; $(nproc) cores shared by everything; $(psql --version | awk '{print "PostgreSQL client " $3}'), server $(sql "$PGBASE/postgres" -c 'SHOW server_version'), synchronous_commit=$(sql "$PGBASE/postgres" -c 'SHOW synchronous_commit'); load average at start $load_at_start, at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews everything); RUST_BACKTRACE unset"
echo "graphile-worker client process (load generator, not in the CPU column): $(jget "$tmp/gw.json" cpu_client_ms) ms; worker $(jget "$tmp/gw.json" cpu_worker_ms) ms, postgres $(jget "$tmp/gw.json" cpu_pg_ms) ms"
echo "target (≥5× graphile-worker in the same run, 202 p99 ≤ 20 ms): $(IFS=';'; echo "${verdicts[*]}" | sed 's/;/; /g')"
