#!/usr/bin/env bash
# What TLS costs a sync call (issue 24): the same binary serving hello over plain HTTP and over
# HTTPS (`serve --tls-cert --tls-key`, a P-256 certificate made by openssl), wrk alternating
# between the two nodes: keep-alive connections (a handshake per connection, HTTP/1.1: wrk does
# not speak HTTP/2), then `Connection: close` (a TLS 1.3 handshake per request). Prints req/s, p99
# and the node's CPU time per request, and HTTPS against HTTP.
#
# Usage: bench/tls.sh      (ROUNDS=3 DURATION=5s CONNS=50 optional; SLUICE=path skips the build)
# Needs: wrk, openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
unset RUST_BACKTRACE
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
need_wrk
sluice_bin
HELLO=$(hello_wasm)
tmp=$(bench_tmp)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -addext basicConstraints=critical,CA:FALSE -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2> /dev/null
flags=(--tenant-rate 10000000 --anonymous-rate 0)
start_node "$tmp/plain" "${flags[@]}"
http_url=$NODE_URL http_pid=$NODE_PID
SLUICE_URL=$http_url SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello "$HELLO" --public > /dev/null
start_node "$tmp/tls" "${flags[@]}" --tls-cert "$tmp/cert.pem" --tls-key "$tmp/key.pem"
https_url=$NODE_URL https_pid=$NODE_PID
SLUICE_URL=$https_url SLUICE_TOKEN=$NODE_TOKEN SLUICE_CA_CERT=$tmp/cert.pem "$SLUICE" deploy hello "$HELLO" --public > /dev/null
curl -sf --cacert "$tmp/cert.pem" "$https_url/fn/default/hello/" > /dev/null
hz=$(getconf CLK_TCK)

# round MODE SCHEME URL PID: one wrk run; appends "mode scheme req/s p99 cpu_us" to the results.
round() {
  local mode=$1 scheme=$2 url=$3 pid=$4 extra=() t0 t1 n
  [ "$mode" = close ] && extra=(-H "Connection: close")
  t0=$(cpu_ticks "$pid")
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${extra[@]}" "$url/fn/default/hello/" > "$tmp/wrk"
  t1=$(cpu_ticks "$pid")
  alive "$pid" "$scheme node"
  n=$(awk '/requests in/ {print $1}' "$tmp/wrk")
  echo "$mode $scheme $(awk '/Requests\/sec/ {print $2}' "$tmp/wrk") $(awk '$1 == "99%" {print $2}' "$tmp/wrk") \
    $(awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$hz" 'BEGIN {printf "%.1f", (b - a) / hz * 1e6 / n}')" >> "$tmp/results"
  tail -1 "$tmp/results"
}
for mode in keep-alive close; do
  for _ in $(seq 1 "$ROUNDS"); do
    round "$mode" http "$http_url" "$http_pid"
    round "$mode" https "$https_url" "$https_pid"
  done
done
echo
echo "| connections | scheme | req/s (mean of $ROUNDS) | p99 (last) | CPU µs per request | req/s vs http |"
echo "| --- | --- | --- | --- | --- | --- |"
awk '{ n[$1" "$2]++; r[$1" "$2] += $3; c[$1" "$2] += $5; p[$1" "$2] = $4 }
  END {
    split("keep-alive close", modes, " ")
    for (i = 1; i <= 2; i++) for (j = 0; j < 2; j++) {
      s = (j == 0) ? "http" : "https"; k = modes[i]" "s
      printf "| %s | %s | %.0f | %s | %.1f | %.2f |\n", modes[i], s, r[k] / n[k], p[k], c[k] / n[k], (r[k] / n[k]) / (r[modes[i]" http"] / n[modes[i]" http"])
    }
  }' "$tmp/results"
echo
echo "reproduce: ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS bench/tls.sh   ($(basename "$SLUICE"), $(nproc) cores, $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2))"
