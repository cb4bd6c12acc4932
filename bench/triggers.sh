#!/usr/bin/env bash
# Broker triggers (issue 23): messages per second from each broker into durable invocations on
# one SQLite node, and each message's time from its batch's commit to its ack (p50, p99, from
# the node's `sluice_trigger_commit_to_ack_seconds` histogram: the bucket bound), beside the
# broker's own ceiling in the same run: a bare consumer that only acks (bench/broker-load drain).
#
# NATS and AMQP: N messages are published first, then the trigger is created; the time is from
# its creation until the node stored all N. MQTT has no backlog for a new subscriber, and
# Mosquitto drops what a subscriber's queue cannot hold (1000): the trigger subscribes first,
# then MQTT_N messages (6000) are offered at MQTT_RATE (default 300/s); the time is from the first publish
# until all are stored. The invocations wait while this runs (`--utilization-target 0.05`): the
# table measures ingest, not the function.
#
# Usage: bench/triggers.sh [MESSAGES (50000)] [BATCH (100)] [WINDOW (20ms)]    KINDS="nats amqp mqtt" MQTT_RATE=300 MQTT_N=6000
# SLUICE=target/debug/sluice uses that binary instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

n=${1:-50000}
batch=${2:-100}
window=${3:-20ms}
mqtt_rate=${MQTT_RATE:-300}
mqtt_n=${MQTT_N:-6000}
kinds=" ${KINDS:-nats amqp mqtt} "
sluice_bin
cargo build --release -q -p broker-load
load=target/release/broker-load
run=$(date +%s%N)

dir=$(bench_tmp)/node
start_node "$dir" --tenant-queued-max 10000000 --tenant-queued-bytes-max 8GiB --utilization-target 0.05
export SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN
"$SLUICE" deploy hello "$(hello_wasm)" >/dev/null

now_ms() { date +%s%3N; }
enqueued() { "$SLUICE" triggers show "$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["enqueued"])'; }
wait_enqueued() { # NAME N: waits until the trigger stored N invocations
  local seen last=-1 still=0
  while :; do
    seen=$(enqueued "$1")
    [ "$seen" -ge "$2" ] && return 0
    if [ "$seen" = "$last" ]; then still=$((still + 1)); else still=0; fi
    [ $still -ge 300 ] && { echo "bench: trigger $1 stuck at $seen of $2" >&2; "$SLUICE" triggers show "$1" >&2; return 1; }
    last=$seen
    sleep 0.05
  done
}
# p50 and p99 of the commit-to-ack histogram since the last call (bucket upper bounds, in ms).
declare -A before
ack_quantiles() {
  curl -sS -H "authorization: Bearer $NODE_TOKEN" "$NODE_URL/metrics" \
    | python3 -c '
import sys, json
b = {}
for line in sys.stdin:
    if line.startswith("sluice_trigger_commit_to_ack_seconds_bucket"):
        le = line.split("le=\"")[1].split("\"")[0]
        b[le] = float(line.rsplit(" ", 1)[1])
prev = json.loads(sys.argv[1]) if sys.argv[1] else {}
d = {k: v - prev.get(k, 0) for k, v in b.items()}
total = d.get("+Inf", 0)
def q(p):
    for le, c in sorted(((float(k), v) for k, v in d.items()), key=lambda x: x[0]):
        if c >= p * total:
            return "%g" % (le * 1000) if le != float("inf") else ">5000"
print(json.dumps(b), "p50<=%s p99<=%s" % (q(0.5), q(0.99)))' "${ack_snapshot:-}"
}
measure_acks() { local out; out=$(ack_quantiles); ack_snapshot=${out%% p50*}; ACKS=p50${out##* p50}; }
measure_acks

rows=()
# --- NATS JetStream
if [[ $kinds == *" nats "* ]]; then
stream="BENCH_$run"
python3 - "$stream" <<'PY'
import json, socket, sys
s = socket.create_connection(("127.0.0.1", 4222)); f = s.makefile("rwb")
f.readline()
name = sys.argv[1]
cfg = json.dumps({"name": name, "subjects": [name.lower() + ".>"], "storage": "file"})
f.write(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.b 1\r\n')
f.write(b"PUB $JS.API.STREAM.CREATE.%s _INBOX.b %d\r\n%s\r\nPING\r\n" % (name.encode(), len(cfg), cfg.encode()))
f.flush()
while True:
    line = f.readline()
    if line.startswith(b"MSG"):
        body = f.readline()
        assert b'"error"' not in body, body
        break
PY
"$load" publish nats "$stream" "$n" >/dev/null
t0=$(now_ms)
"$SLUICE" triggers create nats-bench --function hello --nats nats://127.0.0.1:4222 --stream "$stream" \
  --subject "$(tr A-Z a-z <<<"$stream").>" --batch "$batch" --window "$window" --path /ok >/dev/null
wait_enqueued nats-bench "$n"
t1=$(now_ms)
measure_acks
sluice_rate=$(( n * 1000 / (t1 - t0) ))
ceiling=$("$load" drain nats "$stream" "$n" | grep -o '[0-9]*/s$' | tr -d /s)
rows+=("nats JetStream (backlog)|$n|$sluice_rate|$ACKS|$ceiling")
echo "nats: $sluice_rate/s, $ACKS; bare consumer $ceiling/s" >&2
"$SLUICE" triggers delete nats-bench >/dev/null
fi

# --- AMQP (RabbitMQ)
if [[ $kinds == *" amqp "* ]]; then
queue="bench-$run"
python3 - "$queue" <<'PY'
import socket, struct, sys
# Declares a durable queue with the AMQP 0-9-1 frames themselves (no client library needed).
q = sys.argv[1].encode()
s = socket.create_connection(("127.0.0.1", 5672))
def frame(t, ch, payload): s.sendall(struct.pack(">BHI", t, ch, len(payload)) + payload + b"\xce")
def read():
    h = b""
    while len(h) < 7: h += s.recv(7 - len(h))
    t, ch, n = struct.unpack(">BHI", h); p = b""
    while len(p) < n + 1: p += s.recv(n + 1 - len(p))
    return t, ch, p[:-1]
def short(x): return bytes([len(x)]) + x
def long_(x): return struct.pack(">I", len(x)) + x
s.sendall(b"AMQP\x00\x00\x09\x01"); read()
frame(1, 0, struct.pack(">HH", 10, 11) + struct.pack(">I", 0) + short(b"PLAIN") + long_(b"\x00guest\x00guest") + short(b"en_US"))
_, _, tune = read()
frame(1, 0, struct.pack(">HH", 10, 31) + tune[4:])
frame(1, 0, struct.pack(">HH", 10, 40) + short(b"/") + short(b"") + b"\x00"); read()
frame(1, 1, struct.pack(">HH", 20, 10) + short(b"")); read()
frame(1, 1, struct.pack(">HH", 50, 10) + struct.pack(">H", 0) + short(q) + b"\x02" + long_(b"")); read()
PY
"$load" publish amqp "$queue" "$n" >/dev/null
t0=$(now_ms)
"$SLUICE" triggers create amqp-bench --function hello --amqp amqp://guest:guest@127.0.0.1:5672/%2f --queue "$queue" \
  --batch "$batch" --window "$window" --path /ok >/dev/null
wait_enqueued amqp-bench "$n"
t1=$(now_ms)
measure_acks
sluice_rate=$(( n * 1000 / (t1 - t0) ))
"$SLUICE" triggers delete amqp-bench >/dev/null
sleep 1
"$load" publish amqp "$queue" "$n" >/dev/null
ceiling=$("$load" drain amqp "$queue" "$n" | grep -o '[0-9]*/s$' | tr -d /s)
rows+=("amqp RabbitMQ (backlog)|$n|$sluice_rate|$ACKS|$ceiling")
echo "amqp: $sluice_rate/s, $ACKS; bare consumer $ceiling/s" >&2
fi

# --- MQTT (Mosquitto)
if [[ $kinds == *" mqtt "* ]]; then
topic="bench/$run"
"$SLUICE" triggers create mqtt-bench --function hello --mqtt mqtt://127.0.0.1:1883 --topic "$topic" \
  --batch "$batch" --window "$window" --path /ok >/dev/null
for _ in $(seq 1 100); do
  "$SLUICE" triggers show mqtt-bench -o json | grep -q '"node":"' && break
  sleep 0.1
done
sleep 1
t0=$(now_ms)
"$load" publish mqtt "$topic" "$mqtt_n" 64 "$mqtt_rate" >/dev/null
wait_enqueued mqtt-bench "$mqtt_n"
t1=$(now_ms)
measure_acks
sluice_rate=$(( mqtt_n * 1000 / (t1 - t0) ))
"$SLUICE" triggers delete mqtt-bench >/dev/null
"$load" drain mqtt "$topic" "$mqtt_n" > "$dir.drain" &
drain=$!
sleep 1
t0=$(now_ms)
"$load" publish mqtt "$topic" "$mqtt_n" 64 "$mqtt_rate" >/dev/null
wait "$drain"
t1=$(now_ms)
ceiling=$(( mqtt_n * 1000 / (t1 - t0) ))
rows+=("mqtt Mosquitto (offered $mqtt_rate/s)|$mqtt_n|$sluice_rate|$ACKS|$ceiling")
echo "mqtt: $sluice_rate/s, $ACKS; bare consumer $ceiling/s" >&2
fi
alive "$NODE_PID" "the node"

echo
echo "Broker triggers into durable invocations, one SQLite node ($(basename "$SLUICE") $(git rev-parse --short HEAD), batch $batch, window $window, $(nproc) cores)"
printf '%-36s  %8s  %14s  %-22s  %18s  %6s\n' "source" "messages" "sluice msg/s" "commit-to-ack (ms)" "bare consumer /s" "ratio"
for r in "${rows[@]}"; do
  IFS='|' read -r name count rate acks ceil <<<"$r"
  printf '%-36s  %8s  %14s  %-22s  %18s  %6s\n' "$name" "$count" "$rate" "$acks" "$ceil" "$(python3 -c "print(f'{$rate/$ceil:.2f}')")"
done
echo "reproduce: bench/triggers.sh $n $batch $window"
