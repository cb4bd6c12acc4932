#!/usr/bin/env bash
# Sync-path benchmark: sluice vs `wasmtime serve` (48.0.8, tuned pooling) on the same hello
# component, wrk on loopback, alternating A/B rounds. Also: compile time, deploy-to-first-
# response, first response after a restart (artifact cache), and RSS after load.
#
# Usage: bench/sync.sh            (ROUNDS=3 DURATION=10s CONNS=50 WASMTIME=path are optional)
# Needs: wrk (apt-get install wrk); wasmtime 48.0.8 for the comparison
#        (cargo install wasmtime-cli@48.0.8 --locked --root ~/.cache/wasmtime48), else sluice only.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every error would capture a backtrace: it distorts both servers, so benchmark without it.
unset RUST_BACKTRACE
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-50}
WASMTIME=${WASMTIME:-$(command -v wasmtime || { [ -x ~/.cache/wasmtime48/bin/wasmtime ] && echo ~/.cache/wasmtime48/bin/wasmtime; } || echo /opt/wasmtime48/bin/wasmtime)}

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p sluice-cli
HELLO=$(scripts/build-guests.sh | sed -n 1p)
SLUICE=target/release/sluice
data=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$data"; }
trap cleanup EXIT

ms() { date +%s%3N; }

# Starts sluice on $data, sets SLUICE_PID and URL.
start_sluice() {
  : > "$data/log"
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$data/node" --tenant-rate 10000000 --anonymous-rate 0 2> "$data/log" &
  SLUICE_PID=$!
  pids+=("$SLUICE_PID")
  for _ in $(seq 1 500); do
    URL=$(grep -o 'listening on http://[0-9.:]*' "$data/log" | head -1 | sed 's/listening on //') && [ -n "$URL" ] && break
    sleep 0.01
  done
}

wait_200() {
  local url=$1; shift
  for _ in $(seq 1 5000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.001
  done
  echo "no 200 from $url" >&2; return 1
}

t0=$(ms); start_sluice
TOKEN=$(cat "$data/node/admin.token")
AUTH=(-H "Authorization: Bearer $TOKEN")
export SLUICE_URL=$URL SLUICE_TOKEN=$TOKEN
deploy_out=$("$SLUICE" deploy hello "$HELLO")
wait_200 "$URL/fn/default/hello/" "${AUTH[@]}"
t1=$(ms)
compile_ms=$(echo "$deploy_out" | grep -o 'compiled in [0-9]*' | grep -o '[0-9]*$')
"$SLUICE" deploy hello-rl "$HELLO" --rate 10000000/s >/dev/null
"$SLUICE" deploy hello-public "$HELLO" --public >/dev/null
deploy_first_ms=$((t1 - t0))

# Restart: the artifact comes from the disk cache, nothing is compiled.
kill -TERM "$SLUICE_PID"; wait "$SLUICE_PID" 2>/dev/null || true
t0=$(ms); start_sluice; wait_200 "$URL/fn/default/hello/" "${AUTH[@]}"; t1=$(ms)
restart_first_ms=$((t1 - t0))

# The same node without metrics (`--no-metrics`), to show what counting costs on this path.
"$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$data/node-off" --tenant-rate 10000000 --anonymous-rate 0 --no-metrics 2> "$data/log-off" &
pids+=("$!")
for _ in $(seq 1 500); do
  URL_OFF=$(grep -o 'listening on http://[0-9.:]*' "$data/log-off" | head -1 | sed 's/listening on //') && [ -n "$URL_OFF" ] && break
  sleep 0.01
done
AUTH_OFF=(-H "Authorization: Bearer $(cat "$data/node-off/admin.token")")
SLUICE_URL=$URL_OFF SLUICE_TOKEN=$(cat "$data/node-off/admin.token") "$SLUICE" deploy hello "$HELLO" >/dev/null
wait_200 "$URL_OFF/fn/default/hello/" "${AUTH_OFF[@]}"

have_wasmtime=no
if [ -x "$WASMTIME" ] && "$WASMTIME" --version | grep -q '^wasmtime 48\.0\.8'; then
  have_wasmtime=yes
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$WASMTIME" serve -Scli --addr "127.0.0.1:$port" -O pooling-allocator=y -O pooling-pagemap-scan=y \
    -O pooling-memory-keep-resident=4194304 -O pooling-table-keep-resident=1048576 "$HELLO" 2> "$data/wt.log" &
  WT_PID=$!; pids+=("$WT_PID")
  wait_200 "http://127.0.0.1:$port/"
fi

# Runs wrk; prints "req/s p50_ms p99_ms".
load() {
  local url=$1; shift
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" "$url" > "$data/wrk.out"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$data/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$data/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$data/wrk.out")
  grep -q 'Non-2xx' "$data/wrk.out" && { echo "non-2xx responses from $url:" >&2; cat "$data/wrk.out" >&2; exit 1; }
  echo "$rps $(to_ms "$p50") $(to_ms "$p99")"
}
to_ms() { case $1 in *us) echo "${1%us}" | awk '{printf "%.2f", $1/1000}';; *ms) echo "${1%ms}";; *s) echo "${1%s}" | awk '{printf "%.2f", $1*1000}';; esac; }

declare -A sum_rps
declare -A last
variants=("sluice auth:$URL/fn/default/hello/" "sluice auth, --no-metrics:$URL_OFF/fn/default/hello/" "sluice auth+rate-limit:$URL/fn/default/hello-rl/" "sluice public, no limits:$URL/fn/default/hello-public/")
[ "$have_wasmtime" = yes ] && variants+=("wasmtime serve (tuned):http://127.0.0.1:$port/")
for r in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    name=${v%%:http*}; url=http${v#*:http}
    if [[ $name == *no-metrics* ]]; then out=$(load "$url" "${AUTH_OFF[@]}");
    elif [[ $name == "sluice auth"* ]]; then out=$(load "$url" "${AUTH[@]}"); else out=$(load "$url"); fi
    echo "round $r  $name: $out" >&2
    sum_rps[$name]=$(awk -v a="${sum_rps[$name]:-0}" -v b="${out%% *}" 'BEGIN{print a+b}')
    last[$name]=$out
  done
done

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo
echo "wrk -t1 -c$CONNS -d$DURATION --latency, $ROUNDS alternating rounds, $(nproc) cores, RUST_BACKTRACE unset"
echo
echo "| server | req/s (mean of rounds) | p50 ms (last) | p99 ms (last) | vs wasmtime serve |"
echo "| --- | --- | --- | --- | --- |"
base=""
[ "$have_wasmtime" = yes ] && base=$(awk -v s="${sum_rps["wasmtime serve (tuned)"]}" -v n="$ROUNDS" 'BEGIN{print s/n}')
for v in "${variants[@]}"; do
  name=${v%%:http*}
  mean=$(awk -v s="${sum_rps[$name]}" -v n="$ROUNDS" 'BEGIN{printf "%.0f", s/n}')
  read -r _ p50 p99 <<< "${last[$name]}"
  ratio="-"; [ -n "$base" ] && ratio=$(awk -v a="$mean" -v b="$base" 'BEGIN{printf "%.2fx", a/b}')
  echo "| $name | $mean | $p50 | $p99 | $ratio |"
done
echo
echo "| measure | value |"
echo "| --- | --- |"
echo "| compile at deploy (hello, $(stat -c %s "$HELLO") bytes) | ${compile_ms} ms |"
echo "| deploy to first response (start node, upload, compile, first 200) | ${deploy_first_ms} ms |"
echo "| restart to first response (artifact from disk cache) | ${restart_first_ms} ms |"
echo "| sluice RSS after load | $(( $(rss_kb "$SLUICE_PID") / 1024 )) MiB |"
[ "$have_wasmtime" = yes ] && echo "| wasmtime serve RSS after load | $(( $(rss_kb "$WT_PID") / 1024 )) MiB |"
[ "$have_wasmtime" = yes ] || echo "(wasmtime 48.0.8 not found at $WASMTIME: comparison skipped)"
