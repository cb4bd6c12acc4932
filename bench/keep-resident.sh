#!/usr/bin/env bash
# What a guest that dirties its whole memory limit and is killed costs the node, per
# `serve --memory-keep-resident` setting: two connections call the test guest's `hog` mode back to
# back for DURATION; prints calls, node CPU per call (from /proc) and RSS after.
#
# Usage: bench/keep-resident.sh     (DURATION=8s SETTINGS="4MiB 64MiB" optional)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-8s}
SETTINGS=${SETTINGS:-"4MiB 64MiB"}
need_wrk
sluice_bin
TESTGUEST=$(scripts/build-guests.sh | sed -n 2p)
hz=$(getconf CLK_TCK)
echo "| --memory-keep-resident | hog calls in $DURATION | node CPU ms per call | RSS after, MiB |"
echo "| --- | --- | --- | --- |"
for kr in $SETTINGS; do
  d=$(bench_tmp)
  start_node "$d/n" --memory-keep-resident "$kr"
  pid=$NODE_PID url=$NODE_URL
  SLUICE_URL=$url SLUICE_TOKEN=$NODE_TOKEN \
    "$SLUICE" deploy tg "$TESTGUEST" --public --memory 64MiB --timeout 2s > /dev/null
  t0=$(cpu_ticks "$pid")
  wrk -t1 -c2 -d"$DURATION" --timeout 10s "$url/fn/default/tg/hog" > "$d/wrk"
  t1=$(cpu_ticks "$pid")
  alive "$pid" "the node"
  n=$(awk '/requests in/ {print $1}' "$d/wrk")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  echo "| $kr | $n | $(awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f", (b-a)*1000/hz/n}') | $((rss / 1024)) |"
  stop_node "$pid"
done
