#!/usr/bin/env bash
# Noisy neighbours: how much a hostile function costs a hello function, whether the hostile
# function is in another tenant (`mallory`) or in hello's own tenant (`default`).
#
# Measures hello's req/s and latency alone, then beside each hostile mode of the test guest
# (64 MiB memory, 2 s timeout), with two hostile calls running back to back the whole time (a
# second wrk, 2 connections); `benign` is the same driver on the guest's `/ok` (what the driver
# itself costs), `all` one driver per hostile mode at once, and `benign-all` the same seven
# one-connection drivers all on `/ok` (what `all`'s drivers cost by themselves: seven wrk
# processes on 2 cores take CPU from hello whatever they call). `all` is compared with
# `benign-all`, every other mode with `benign`. Prints a Markdown table per tenant.
#
# Then the async path: new async calls of hello (wrk -c10, bench/async.lua) alone, and while
# FLOOD (200) queued CPU-bound async calls of mallory's guest run; and whether any lease was
# reclaimed from this live node during the flood. Last, the same async load while a `read` key
# of mallory floods the control API, with the node's heartbeat age.
#
# Usage: bench/neighbours.sh        (DURATION=5s CONNS=20 MODES="benign spin alloc ... all"
#                                     TENANTS="mallory default" FLOOD=200 ROUNDS=1 optional)
# Needs: wrk (apt-get install wrk). Extra `sluice serve` flags: SERVE_FLAGS="--workers 2 ...".
# Another build: SLUICE=/tmp/sluice-old bench/neighbours.sh (no build is made then).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every error would capture a backtrace (every hostile call here is an error): lib.sh unsets it.
source bench/lib.sh
DURATION=${DURATION:-5s}
CONNS=${CONNS:-20}
MODES=${MODES:-"benign spin hog alloc recurse big panic no-response benign-all all"}
HOSTILE_MODES=${HOSTILE_MODES:-"spin hog alloc recurse big panic no-response"}
TENANTS=${TENANTS:-"mallory default"}
SERVE_FLAGS=${SERVE_FLAGS:-}
FLOOD=${FLOOD:-200}
# Each row is the round with the median p99 of ROUNDS rounds: on 2 cores shared with up to eight
# wrk processes one 5 s round's p99 moves by 2x from run to run.
ROUNDS=${ROUNDS:-1}

need_wrk
# SLUICE=path/to/sluice measures another build (e.g. the commit before a change) with this script.
sluice_bin
mapfile -t guests < <(scripts/build-guests.sh)
HELLO=${guests[0]}
TESTGUEST=${guests[1]}
data=$(bench_tmp)

# shellcheck disable=SC2086
start_node "$data/node" $SERVE_FLAGS
SLUICE_PID=$NODE_PID URL=$NODE_URL TOKEN=$NODE_TOKEN
export SLUICE_URL=$URL SLUICE_TOKEN=$TOKEN
"$SLUICE" deploy hello "$HELLO" >/dev/null
"$SLUICE" tenants create mallory >/dev/null
for t in $TENANTS; do
  [ "$t" = default ] || "$SLUICE" tenants create "$t" >/dev/null 2>&1 || true
  "$SLUICE" deploy tg "$TESTGUEST" --tenant "$t" --public --memory 64MiB --timeout 2s >/dev/null
done
# The queued flood: one attempt of at most 2 s each, so a reclaimed lease would show as
# `lease_lost` rather than hide behind a retry.
"$SLUICE" deploy tgq "$TESTGUEST" --tenant mallory --public --async-timeout 2s --attempts 1 >/dev/null

# The hostile request of each mode (the guest's mode is the last path segment).
hostile_path() {
  case $1 in
    benign) echo "/ok" ;;                         # answers at once: the driver's own cost
    spin) echo "/spin" ;;
    alloc) echo "/alloc?bytes=1000000000" ;;      # asks for 1 GB at once: refused, killed
    hog) echo "/hog" ;;                           # dirties its whole 64 MiB, then is killed
    recurse) echo "/recurse" ;;                   # stack overflow
    big) echo "/big?bytes=200000000" ;;           # a 200 MB streamed response
    panic) echo "/panic" ;;
    no-response) echo "/no-response" ;;
    burn) echo "/burn?ms=50" ;;                   # 50 ms of CPU, then an answer
    *) echo "unknown mode $1" >&2; exit 1 ;;
  esac
}

to_ms() { case $1 in *us) echo "${1%us}" | awk '{printf "%.2f", $1/1000}';; *ms) echo "${1%ms}";; *s) echo "${1%s}" | awk '{printf "%.2f", $1*1000}';; esac; }

# Runs the measured wrk on hello; prints "req/s p50_ms p99_ms".
measure() {
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "Authorization: Bearer $TOKEN" "$URL/fn/default/hello/" > "$data/wrk.out"
  if grep -q 'Non-2xx' "$data/wrk.out"; then echo "hello answered non-2xx:" >&2; cat "$data/wrk.out" >&2; exit 1; fi
  echo "$(awk '/Requests\/sec/ {print $2}' "$data/wrk.out") \
$(to_ms "$(awk '$1=="50%" {print $2}' "$data/wrk.out")") $(to_ms "$(awk '$1=="99%" {print $2}' "$data/wrk.out")")"
}

# Warm up, then hello alone.
wrk -t1 -c"$CONNS" -d1s -H "Authorization: Bearer $TOKEN" "$URL/fn/default/hello/" > /dev/null
read -r base_rps base_p50 base_p99 <<< "$(measure)"
echo "alone: $base_rps req/s p50 $base_p50 ms p99 $base_p99 ms" >&2

# Runs two back-to-back callers of one mode (or one caller of every hostile mode, for `all`) of
# tenant $1's guest for the measurement and a little before and after; prints hello's figures and
# the hostile calls made.
beside() {
  local tenant=$1 mode=$2 secs=${DURATION%s} drivers=() m calls=0 n path
  if [ "$mode" = all ] || [ "$mode" = benign-all ]; then
    for m in $HOSTILE_MODES; do
      path=$(hostile_path "$m"); [ "$mode" = benign-all ] && path=$(hostile_path benign)
      wrk -t1 -c1 -d"$((secs + 3))s" --timeout 10s "$URL/fn/$tenant/tg$path" > "$data/hostile-$m.out" 2>&1 &
      drivers+=($!)
    done
  else
    wrk -t1 -c2 -d"$((secs + 3))s" --timeout 10s "$URL/fn/$tenant/tg$(hostile_path "$mode")" > "$data/hostile-$mode.out" 2>&1 &
    drivers+=($!)
  fi
  sleep 1
  read -r rps p50 p99 <<< "$(measure)"
  for d in "${drivers[@]}"; do wait "$d" || true; done
  for f in "$data"/hostile-*.out; do
    n=$(awk '/requests in/ {print $1}' "$f"); calls=$((calls + ${n:-0})); rm -f "$f"
  done
  echo "$rps $p50 $p99 $calls"
}

for tenant in $TENANTS; do
  rows=()
  benign_p99= benign_all_p99=
  for mode in $MODES; do
    read -r rps p50 p99 calls <<< "$(for _ in $(seq 1 "$ROUNDS"); do beside "$tenant" "$mode"; done \
      | sort -g -k3 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)')"
    [ "$mode" = benign ] && benign_p99=$p99
    [ "$mode" = benign-all ] && benign_all_p99=$p99
    echo "$tenant/$mode: $rps req/s p50 $p50 ms p99 $p99 ms (hostile calls: $calls)" >&2
    # `all` against the same seven drivers on /ok where measured, the rest against `benign`.
    ref=$benign_p99; [ "$mode" = all ] && [ -n "$benign_all_p99" ] && ref=$benign_all_p99
    [ "$mode" = benign-all ] && ref=$benign_all_p99
    vs_benign=$( [ -n "$ref" ] && awk -v a="$p99" -v b="$ref" 'BEGIN{printf "%.2fx", a/b}' || echo -)
    rows+=("| $mode | $rps | $(awk -v a="$rps" -v b="$base_rps" 'BEGIN{printf "%.2fx", a/b}') | $p50 | $p99 | $(awk -v a="$p99" -v b="$base_p99" 'BEGIN{printf "%.2fx", a/b}') | $vs_benign | $calls |")
  done
  echo
  if [ "$tenant" = default ]; then where="hello's own tenant (default)"; else where="another tenant ($tenant)"; fi
  echo "hello (tenant default) beside two back-to-back calls of each mode of the test guest in $where"
  echo "(64 MiB, 2 s timeout; \`all\`: one caller per hostile mode at once, compared with \`benign-all\`: as many"
  echo "one-connection callers of /ok); wrk -t1 -c$CONNS -d$DURATION --latency; each row the median-p99 round of $ROUNDS;"
  echo "$(nproc) cores; RUST_BACKTRACE unset"
  echo
  echo "| beside | hello req/s | vs alone | p50 ms | p99 ms | p99 vs alone | p99 vs benign | hostile calls |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  echo "| (alone) | $base_rps | 1.00x | $base_p50 | $base_p99 | 1.00x | - | - |"
  printf '%s\n' "${rows[@]}"
done

# --- the async path beside a flood of queued CPU-bound calls ---
async_load() {
  SLUICE_TOKEN=$TOKEN wrk -t1 -c10 -d"$DURATION" --latency -s bench/async.lua "$URL/fn/default/hello/" > "$data/wrk.out"
  if grep -q 'Non-2xx' "$data/wrk.out"; then echo "async hello answered non-2xx:" >&2; cat "$data/wrk.out" >&2; exit 1; fi
  echo "$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$data/wrk.out") $(to_ms "$(awk '$1=="99%" {print $2}' "$data/wrk.out")")"
}
read -r idle_rps idle_p99 <<< "$(async_load)"
echo "async alone: $idle_rps 202/s p99 $idle_p99 ms" >&2
for _ in $(seq 1 "$FLOOD"); do
  curl -s -o /dev/null -X POST -H 'prefer: respond-async' "$URL/fn/mallory/tgq/spin"
done
read -r flood_rps flood_p99 <<< "$(async_load)"
echo "async beside $FLOOD queued spinners: $flood_rps 202/s p99 $flood_p99 ms" >&2
# Wait for the flood to finish, then count how its invocations ended.
for _ in $(seq 1 600); do
  open=$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/invocations?tenant=mallory&function=tgq&status=queued&limit=1000" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["invocations"]))')
  running=$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/invocations?tenant=mallory&function=tgq&status=running&limit=1000" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["invocations"]))')
  [ "$open" = 0 ] && [ "$running" = 0 ] && break
  sleep 1
done
kinds=$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/invocations?tenant=mallory&function=tgq&limit=1000" \
  | python3 -c 'import collections,json,sys; c=collections.Counter(i["error_kind"] or i["status"] for i in json.load(sys.stdin)["invocations"]); print(", ".join(f"{k}: {v}" for k,v in sorted(c.items())))')
echo
echo "new async calls of hello (wrk -t1 -c10 -d$DURATION, 202 = durably queued) beside $FLOOD queued calls"
echo "of a guest that spins until its 2 s timeout (tenant mallory, one attempt each)"
echo
echo "| async hello | 202/s | 202 p99 ms | p99 vs alone |"
echo "| --- | --- | --- | --- |"
echo "| alone | $idle_rps | $idle_p99 | 1.00x |"
echo "| beside the flood | $flood_rps | $flood_p99 | $(awk -v a="$flood_p99" -v b="$idle_p99" 'BEGIN{printf "%.2fx", a/b}') |"
echo
echo "how the $FLOOD flooded invocations ended: $kinds (lease_lost would mean a lease was reclaimed from this live node)"

# --- the control plane under a flood of reads from one tenant's `read` key ---
READ_KEY=$(curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"scopes":["read"]}' "$URL/v1/tenants/mallory/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# The node's heartbeat age (GET /v1/nodes, admin key) sampled every 200 ms; prints the largest.
heartbeat_age() {
  local until=$(( $(date +%s) + ${DURATION%s} )) worst=0 age
  while [ "$(date +%s)" -lt "$until" ]; do
    age=$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/nodes" | python3 -c 'import json,sys; print(max(n["heartbeat_age_ms"] for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0)
    [ "$age" -gt "$worst" ] && worst=$age
    sleep 0.2
  done
  echo "$worst"
}
heartbeat_age > "$data/hb.out" &
hb=$!
read -r calm_rps calm_p99 <<< "$(async_load)"
wait "$hb"; calm_hb=$(cat "$data/hb.out")
wrk -t1 -c20 -d"$((${DURATION%s} + 2))s" -H "Authorization: Bearer $READ_KEY" \
  "$URL/v1/invocations?tenant=mallory&limit=1000" > "$data/cp.out" 2>&1 &
cp=$!
sleep 1
heartbeat_age > "$data/hb.out" &
hb=$!
read -r cp_rps cp_p99 <<< "$(async_load)"
wait "$hb"; cp_hb=$(cat "$data/hb.out")
wait "$cp" || true
cp_total=$(awk '/requests in/ {print $1}' "$data/cp.out")
cp_refused=$(awk '/Non-2xx/ {print $NF}' "$data/cp.out")
echo
echo "new async calls of hello (as above) while mallory's read key floods GET /v1/invocations?limit=1000"
echo "(wrk -c20); the node's heartbeat age sampled every 200 ms (it heartbeats every 2 s)"
echo
echo "| async hello | 202/s | 202 p99 ms | largest heartbeat age ms | flood requests (refused) |"
echo "| --- | --- | --- | --- | --- |"
echo "| calm | $calm_rps | $calm_p99 | $calm_hb | - |"
echo "| beside the /v1 flood | $cp_rps | $cp_p99 | $cp_hb | ${cp_total:-0} (${cp_refused:-0}) |"
