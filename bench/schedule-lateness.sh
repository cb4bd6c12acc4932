#!/usr/bin/env bash
# Fire lateness of schedules (issue 23): N schedules every second on one node for S seconds, then
# how late each occurrence was enqueued (the invocation's created_at minus its occurrence, read
# from its key `sched:{id}:{occurrence ms}`), as p50 / p99 / max: *runnable* (max(created_at,
# occurrence) minus the occurrence: an occurrence fired ahead, `serve --schedule-fire-ahead`, is
# on time) and *stored* (created_at minus the occurrence; negative when fired ahead). Pass
# `--schedule-fire-ahead 0` to measure the ticks' own lateness when due.
#
# Usage: bench/schedule-lateness.sh [SCHEDULES (100)] [SECONDS (20)] [serve flags, e.g. --store postgres://…]
# SLUICE=target/debug/sluice uses that binary instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

schedules=${1:-100}
seconds=${2:-20}
shift $(( $# > 2 ? 2 : $# ))
sluice_bin
dir=$(bench_tmp)/node
start_node "$dir" --tenant-schedules-max "$schedules" --tenant-queued-max 1000000 "$@"
export SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN
"$SLUICE" deploy hello "$(hello_wasm)" >/dev/null
for i in $(seq 1 "$schedules"); do
  curl -sS --fail-with-body -o /dev/null -H "authorization: Bearer $NODE_TOKEN" -H 'content-type: application/json' \
    -d "{\"name\": \"s$i\", \"function\": \"hello\", \"every_ms\": 1000, \"catchup\": \"all\", \"overlap\": \"allow\"}" \
    "$NODE_URL/v1/tenants/default/schedules"
done
sleep "$seconds"
for i in $(seq 1 "$schedules"); do
  curl -sS --fail-with-body -o /dev/null -X DELETE -H "authorization: Bearer $NODE_TOKEN" \
    "$NODE_URL/v1/tenants/default/schedules/s$i"
done
alive "$NODE_PID" "the node"
NODE_URL=$NODE_URL NODE_TOKEN=$NODE_TOKEN python3 - "$schedules" "$seconds" <<'PY'
import json, os, sys, urllib.request
from datetime import datetime
url, token = os.environ["NODE_URL"], os.environ["NODE_TOKEN"]
late, runnable, keys, before = [], [], set(), None
while True:
    q = f"{url}/v1/invocations?function=hello&limit=1000" + (f"&before={before}" if before else "")
    page = json.load(urllib.request.urlopen(urllib.request.Request(q, headers={"authorization": f"Bearer {token}"})))
    for inv in page["invocations"]:
        key = inv["idempotency_key"]
        assert key not in keys, f"fired twice: {key}"
        keys.add(key)
        created = datetime.fromisoformat(inv["created_at"].replace("Z", "+00:00")).timestamp() * 1000
        late.append(created - int(key.split(":")[2]))
        runnable.append(max(late[-1], 0))
    before = page["next_before"]
    if not before:
        break
late.sort()
runnable.sort()
at = lambda v, q: v[min(len(v) - 1, int(len(v) * q))]
print(f"{sys.argv[1]} schedules every 1 s for {sys.argv[2]} s: {len(late)} fires, 0 double; "
      f"runnable lateness p50 {at(runnable, 0.5):.0f} ms, p99 {at(runnable, 0.99):.0f} ms, max {runnable[-1]:.0f} ms; "
      f"stored p50 {at(late, 0.5):.0f} ms, p99 {at(late, 0.99):.0f} ms, max {late[-1]:.0f} ms")
PY
