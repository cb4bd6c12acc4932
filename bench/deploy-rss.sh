#!/usr/bin/env bash
# The memory a deploy leaves behind (issue 20: ≤ 150 MB after a deploy and load): a fresh node
# deploys a component (compiling it), then serves it; prints the node's RSS idle, right after the
# deploy and at its peak under `wrk -t1 -c10 -d5s`, with the largest resident mappings and, when
# gdb is installed, glibc's malloc_stats (heap in use against what the arenas hold) after the
# deploy. Two builds side by side, alternating: OLD=/tmp/sluice-old bench/deploy-rss.sh.
#
# Usage: bench/deploy-rss.sh [WASM]     (default: the Python example, scripts/build-examples.sh;
#                                        SLUICE=path/to/sluice, OLD=path/to/other, ROUNDS=2)
# Needs: wrk; gdb optional.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
need_wrk
sluice_bin
WASM=${1:-$(scripts/build-examples.sh | sed -n 2p)}
ROUNDS=${ROUNDS:-2}
data=$(bench_tmp)
# The examples are JSON greeters (hello answers any method).
post_lua=$(greeter_post_lua "$data")
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
mappings() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / {name = $6; range = $1} /^Rss:/ {if ($2 > 4096) print "  " int($2 / 1024) " MiB", range, name}' \
    "/proc/$1/smaps" | sort -rn | head -8
}

one() {
  local bin=$1 label=$2 dir peak=0 r w
  dir="$data/$label.$RANDOM"
  SLUICE=$bin start_node "$dir" > /dev/null
  local pid=$NODE_PID idle
  idle=$(rss "$pid")
  local compile_ms
  compile_ms=$(SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN "$bin" deploy f "$WASM" | sed -n 's/.*compiled in \([0-9]*\) ms.*/\1/p')
  sleep 1
  local after; after=$(rss "$pid")
  echo "== $label: after the deploy, mappings over 4 MiB:" >&2
  mappings "$pid" >&2
  if command -v gdb > /dev/null; then
    gdb -p "$pid" -batch -ex 'call (void)malloc_stats()' > /dev/null 2>&1 || true
    awk '/^Total \(incl. mmap\)/ {t = 1} t && /bytes/ {print "  malloc " $0}' "$dir.log" | tail -2 >&2
  fi
  wait_200 "$NODE_URL/fn/default/f/" -X POST -H 'content-type: application/json' -d "$GREETER_BODY" \
    -H "Authorization: Bearer $NODE_TOKEN"
  wrk -t1 -c10 -d5s -s "$post_lua" -H "Authorization: Bearer $NODE_TOKEN" "$NODE_URL/fn/default/f/" > "$data/wrk.out" &
  w=$!
  while kill -0 "$w" 2> /dev/null; do
    r=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2
  done
  alive "$pid" "the node"
  if grep -q 'Non-2xx' "$data/wrk.out"; then echo "non-2xx answers:" >&2; cat "$data/wrk.out" >&2; exit 1; fi
  echo "| $label | $compile_ms | $idle | $after | $((peak / 1024)) | $(awk '/Requests\/sec/ {printf "%.0f", $2}' "$data/wrk.out") |"
  stop_node "$pid"
}

echo "| build | compile ms | RSS idle MiB | RSS after the deploy MiB | peak RSS serving it MiB | req/s |"
echo "| --- | --- | --- | --- | --- | --- |"
for _ in $(seq 1 "$ROUNDS"); do
  [ -n "${OLD:-}" ] && one "$OLD" old
  one "$SLUICE" new
done
echo
echo "$(basename "$WASM") ($(( $(stat -c %s "$WASM") / 1024 / 1024 )) MiB), a node that compiled it at deploy; wrk -t1 -c10 -d5s; $(nproc) cores"
