#!/usr/bin/env bash
# XFaaS-style scheduling, measured on a live node: time-shifting and downstream protection.
#
# diurnal:    a day of async calls compressed into MINUTES (default 4), arrivals 4.3× peak to
#             trough, two tenants (`web`: no deadline; `batch`: deadlines 1/2-3/4 of the day
#             later), mixed criticality, sized from the node's capacity at its utilization
#             target. Writes OUT/diurnal.png (arrivals against executed load) and a table:
#             executed peak-to-trough (target ≤ 1.3×) and missed deadlines (target 0).
# downstream: steady async calls that each POST to a stub service (bench/downstream_stub.py)
#             whose capacity is halved for the middle third of MINUTES (default 3): how fast the
#             503s fall back under 1%, and whether the backlog drains after the recovery.
#             Writes OUT/downstream.png and a table.
#
# Usage: bench/diurnal.sh [diurnal|downstream|both] [MINUTES]      (default: both)
#   OUT=bench/results   where the PNG, the table (.md) and the raw series (.json) go
#   TARGET=0.8          the node's --utilization-target (also what the load is sized from)
#   PROMOTE_AHEAD=...   the node's --promote-ahead (a call this close to its deadline starts
#                       whatever the load), if it has the flag; default: one "hour" of the
#                       compressed day (MINUTES*60/24 s), since the node's 30 s would promote
#                       most of a short day's start windows at once
#   WEB_RESERVED=1 WEB_WEIGHT=1 BATCH_RESERVED=0 BATCH_WEIGHT=1   tenants' async quotas
#   STUB_CAPACITY=40 STUB_LATENCY_MS=500 ATTEMPTS=10               the downstream stub, and
#                       the attempts of the function that calls it
#   DIURNAL_FLAGS="--load 1.05 --burn-ms 20 ..."   more flags of `bench/diurnal.py diurnal`;
#                       "--days 3" replays three days and measures the last, which starts with
#                       the backlog the others left (BENCHMARKS.md, 2026-12-07)
#   DOWNSTREAM_FLAGS="--load 0.8 ..."              more flags of `bench/diurnal.py downstream`
#   SERVE_FLAGS="..."   more flags of `sluice serve`
#   LEGACY=1            a node without the scheduling features (no --utilization-target, no
#                       quotas): the baseline, executed load follows arrivals (on a node that has
#                       them, TARGET=1 comes closest)
#   SLUICE_BIN=PATH     run this sluice binary instead of building target/release/sluice
#   KEEP=1              keep the nodes' data directories and logs (the path is printed)
# Python: bench/diurnal.py needs matplotlib, installed into ~/.cache/sluice-bench-venv.
# Run it on a quiet machine: guests run at the lowest OS priority, so a compile beside the node
# starves them and flattens the measured load (the driver warns, and the table shows how many
# cores other processes used).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every error would capture a backtrace: benchmark without.
unset RUST_BACKTRACE
MODE=${1:-both}
MINUTES=${2:-}
case $MODE in
  diurnal | downstream | both) ;;
  *) echo "usage: bench/diurnal.sh [diurnal|downstream|both] [MINUTES]" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/results}
TARGET=${TARGET:-0.8}
LEGACY=${LEGACY:-0}
DIURNAL_FLAGS=${DIURNAL_FLAGS:-}
DOWNSTREAM_FLAGS=${DOWNSTREAM_FLAGS:-}
SERVE_FLAGS=${SERVE_FLAGS:-}
STUB_CAPACITY=${STUB_CAPACITY:-40}
STUB_LATENCY_MS=${STUB_LATENCY_MS:-500}

venv=$HOME/.cache/sluice-bench-venv
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "installing matplotlib into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q matplotlib
fi
PY=$venv/bin/python

if [ -n "${SLUICE_BIN:-}" ]; then
  SLUICE=$SLUICE_BIN
else
  cargo build --release -q -p sluice-cli
  SLUICE=target/release/sluice
fi
mapfile -t guests < <(scripts/build-guests.sh)
TESTGUEST=${guests[1]}
legacy_flag=()
if [ "$LEGACY" = 1 ]; then
  legacy_flag=(--legacy)
else
  "$SLUICE" serve --help | grep -q -- '--utilization-target' || {
    echo "this sluice has no 'serve --utilization-target' (the time-shifting scheduler): build one" \
      "that has, or run LEGACY=1 bench/diurnal.sh for the baseline without it" >&2
    exit 1
  }
  "$SLUICE" tenants --help | grep -q 'quota' || {
    echo "this sluice has no 'tenants quota': build one that has, or run LEGACY=1 for the baseline" >&2
    exit 1
  }
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Starts a node on a fresh data directory $work/$1 with the flags that follow; sets NODE_PID,
# URL, SLUICE_URL, SLUICE_TOKEN and DATA.
start_node() {
  DATA=$work/$1
  shift
  mkdir -p "$DATA"
  # shellcheck disable=SC2086
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$DATA" "$@" $SERVE_FLAGS 2> "$DATA.log" &
  NODE_PID=$!
  pids+=("$NODE_PID")
  URL=
  for _ in $(seq 1 500); do
    URL=$(grep -o 'listening on http://[0-9.:]*' "$DATA.log" | head -1 | sed 's/listening on //') || true
    [ -n "$URL" ] && break
    kill -0 "$NODE_PID" 2>/dev/null || { echo "sluice serve $* failed:" >&2; cat "$DATA.log" >&2; exit 1; }
    sleep 0.02
  done
  [ -n "$URL" ] || { echo "the node did not start:" >&2; cat "$DATA.log" >&2; exit 1; }
  export SLUICE_URL=$URL SLUICE_TOKEN
  SLUICE_TOKEN=$(cat "$DATA/admin.token")
}

# Stops a process this script started and forgets it, so that the cleanup never signals a
# process that took its pid since.
stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local kept=()
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  pids=("${kept[@]}")
}

# The scheduling flags of `sluice serve` for a run of $1 minutes.
scheduler_flags() {
  [ "$LEGACY" = 1 ] && return
  echo "--utilization-target $TARGET"
  if "$SLUICE" serve --help | grep -q -- '--promote-ahead'; then
    echo "--promote-ahead ${PROMOTE_AHEAD:-$(awk -v m="$1" 'BEGIN {printf "%dms", m * 60000 / 24}')}"
  fi
}

quota() {
  [ "$LEGACY" = 1 ] || "$SLUICE" tenants quota "$1" --reserved "$2" --weight "$3" >/dev/null
}

run_diurnal() {
  # shellcheck disable=SC2046
  start_node diurnal $(scheduler_flags "${MINUTES:-4}")
  "$SLUICE" tenants create web >/dev/null
  "$SLUICE" tenants create batch >/dev/null
  quota web "${WEB_RESERVED:-1}" "${WEB_WEIGHT:-1}"
  quota batch "${BATCH_RESERVED:-0}" "${BATCH_WEIGHT:-1}"
  "$SLUICE" deploy api "$TESTGUEST" --tenant web --memory 64MiB --async-timeout 10s >/dev/null
  "$SLUICE" deploy jobs "$TESTGUEST" --tenant batch --memory 64MiB --async-timeout 10s >/dev/null
  # shellcheck disable=SC2086
  "$PY" bench/diurnal.py diurnal --url "$URL" --db "$DATA/sluice.db" --node-pid "$NODE_PID" \
    --cores "$(nproc)" --target "$TARGET" --minutes "${MINUTES:-4}" --out "$OUT" \
    "${legacy_flag[@]}" $DIURNAL_FLAGS
  stop_pid "$NODE_PID"
}

run_downstream() {
  "$PY" bench/downstream_stub.py --capacity "$STUB_CAPACITY" --latency-ms "$STUB_LATENCY_MS" \
    --log "$work/stub.log" > "$work/stub.out" &
  local stub=$!
  pids+=("$stub")
  local port=
  for _ in $(seq 1 200); do
    port=$(awk '/^port / {print $2}' "$work/stub.out")
    [ -n "$port" ] && break
    sleep 0.05
  done
  [ -n "$port" ] || { echo "the downstream stub did not start" >&2; exit 1; }
  # shellcheck disable=SC2046
  start_node downstream --outbound-allow-private $(scheduler_flags "${MINUTES:-3}")
  "$SLUICE" tenants create shop >/dev/null
  # Enough attempts that a call outlives the halved third with backoff (1 s doubling).
  "$SLUICE" deploy notify "$TESTGUEST" --tenant shop --memory 64MiB --async-timeout 10s \
    --attempts "${ATTEMPTS:-10}" --allow-outbound "127.0.0.1:$port" >/dev/null
  # shellcheck disable=SC2086
  "$PY" bench/diurnal.py downstream --url "$URL" --db "$DATA/sluice.db" --node-pid "$NODE_PID" \
    --cores "$(nproc)" --stub-url "http://127.0.0.1:$port" --minutes "${MINUTES:-3}" --out "$OUT" \
    "${legacy_flag[@]}" $DOWNSTREAM_FLAGS
  stop_pid "$NODE_PID"
  stop_pid "$stub"
}

echo "sluice $("$SLUICE" --version 2>/dev/null | awk '{print $2}'), $(nproc) cores, RUST_BACKTRACE unset," \
  "utilization target ${TARGET}$([ "$LEGACY" = 1 ] && echo ' (LEGACY: not applied)')" >&2
case $MODE in
  diurnal) run_diurnal ;;
  downstream) run_downstream ;;
  both) run_diurnal; echo; run_downstream ;;
esac
