#!/usr/bin/env bash
# What a guest that dirties its whole memory limit and is killed costs the node, per
# `serve --memory-keep-resident` setting: two connections call the test guest's `hog` mode back to
# back for DURATION; prints calls, node CPU per call (from /proc) and RSS after.
#
# Usage: bench/keep-resident.sh     (DURATION=8s SETTINGS="4MiB 64MiB" optional)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
DURATION=${DURATION:-8s}
SETTINGS=${SETTINGS:-"4MiB 64MiB"}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p sluice-cli
TESTGUEST=$(scripts/build-guests.sh | sed -n 2p)
SLUICE=target/release/sluice
hz=$(getconf CLK_TCK)
echo "| --memory-keep-resident | hog calls in $DURATION | node CPU ms per call | RSS after, MiB |"
echo "| --- | --- | --- | --- |"
for kr in $SETTINGS; do
  d=$(mktemp -d)
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$d/n" --memory-keep-resident "$kr" 2> "$d/log" &
  pid=$!
  for _ in $(seq 1 500); do grep -q 'listening on' "$d/log" && break; sleep 0.01; done
  url=$(grep -o 'listening on http://[0-9.:]*' "$d/log" | sed 's/listening on //')
  SLUICE_URL=$url SLUICE_TOKEN=$(cat "$d/n/admin.token") \
    "$SLUICE" deploy tg "$TESTGUEST" --public --memory 64MiB --timeout 2s > /dev/null
  t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  wrk -t1 -c2 -d"$DURATION" --timeout 10s "$url/fn/default/tg/hog" > "$d/wrk"
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  n=$(awk '/requests in/ {print $1}' "$d/wrk")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  echo "| $kr | $n | $(awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f", (b-a)*1000/hz/n}') | $((rss / 1024)) |"
  kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$d"
done
