#!/usr/bin/env bash
# Two sluice binaries on the same hello component, alternating: req/s, p99 and the node's CPU time
# per request (from /proc, the steadier measure on a noisy machine). For telling whether a change
# costs the hot path anything: build the old commit, copy its binary away, build the new one.
#
# Usage: bench/compare-builds.sh OLD_BIN NEW_BIN     (ROUNDS=6 DURATION=5s CONNS=50 optional)
# SPLIT=1: where a build has aliases, deploy hello twice and split `latest` 50/50 over the two
# versions, so that every call of that build also pays for a weighted choice.
# Needs: wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
[ $# -eq 2 ] || { echo "usage: bench/compare-builds.sh OLD_BIN NEW_BIN" >&2; exit 2; }
need_wrk
HELLO=$(hello_wasm)
hz=$(getconf CLK_TCK)

# One round of one binary: prints "label req/s p99 cpu_us_per_request".
round() {
  local label=$1 SLUICE=$2 d pid url extra=()
  d=$(bench_tmp)
  # The load is keyless calls of a public function: lift their own bucket where a build has one.
  "$SLUICE" serve --help | grep -q -- --anonymous-rate && extra=(--anonymous-rate 0)
  start_node "$d/n" --tenant-rate 10000000 "${extra[@]}"
  pid=$NODE_PID url=$NODE_URL
  SLUICE_URL=$url SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello "$HELLO" --public > /dev/null
  if [ "${SPLIT:-0}" = 1 ] && "$SLUICE" alias --help > /dev/null 2>&1; then
    SLUICE_URL=$url SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" deploy hello "$HELLO" --public > /dev/null
    SLUICE_URL=$url SLUICE_TOKEN=$NODE_TOKEN "$SLUICE" alias set hello latest 1=50 2=50 > /dev/null
  fi
  curl -s "$url/fn/default/hello/" > /dev/null
  local t0 t1 n
  t0=$(cpu_ticks "$pid")
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$url/fn/default/hello/" > "$d/wrk"
  t1=$(cpu_ticks "$pid")
  alive "$pid" "$label"
  n=$(awk '/requests in/ {print $1}' "$d/wrk")
  awk -v l="$label" -v t0="$t0" -v t1="$t1" -v n="$n" -v hz="$hz" \
    '/Requests\/sec/ {r=$2} / 99%/ {p=$2} END {printf "%s %s %s %.1f\n", l, r, p, (t1-t0)*1e6/hz/n}' "$d/wrk"
  stop_node "$pid"; rm -rf "$d"
}

results=$(for i in $(seq 1 "$ROUNDS"); do round old "$1"; round new "$2"; done)
echo "$results" | sed 's/^/round /'
echo
echo "| build | req/s (mean of $ROUNDS) | CPU µs per request (mean) | min–max |"
echo "| --- | --- | --- | --- |"
echo "$results" | awk '{r[$1]+=$2; c[$1]+=$4; n[$1]++; if (!($1 in lo) || $4<lo[$1]) lo[$1]=$4; if ($4>hi[$1]) hi[$1]=$4}
  END {for (b in n) printf "| %s | %.0f | %.1f | %.1f–%.1f |\n", b, r[b]/n[b], c[b]/n[b], lo[b], hi[b]}' | sort
