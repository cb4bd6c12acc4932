#!/usr/bin/env bash
# A/B: async 202s with 1 MiB bodies (the writer hex-encodes them) and sync calls with 1 MiB bodies.
set -euo pipefail
cd /work/main
source bench/lib.sh
data=$(bench_tmp)
cat > $data/big.lua <<'LUA'
wrk.method = "POST"
wrk.headers["Prefer"] = "respond-async"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SLUICE_TOKEN")
wrk.body = string.rep("x", 1000000)
LUA
for round in 1 2; do for b in ${BUILDS:-base new}; do
  SLUICE=/tmp/sluice-$b
  start_node "$data/$b$round" --tenant-queued-bytes-max 100GiB --tenant-queued-max 10000000
  SLUICE_URL=$NODE_URL SLUICE_TOKEN=$NODE_TOKEN $SLUICE deploy hello "$(hello_wasm)" >/dev/null
  c0=$(cpu_ticks $NODE_PID)
  SLUICE_TOKEN=$NODE_TOKEN wrk -t1 -c10 -d5s -s $data/big.lua "$NODE_URL/fn/default/hello/" > $data/w.out
  c1=$(cpu_ticks $NODE_PID)
  n=$(awk '/requests in/ {print $1}' $data/w.out)
  echo "$b: $(awk '/Requests\/sec/ {print $2}' $data/w.out) 202/s, non2xx: $(awk '/Non-2xx/ {print $NF}' $data/w.out), node CPU per request $(( (c1-c0)*10000/ (n>0?n:1) )) us, rss $(awk '/VmRSS/ {print int($2/1024)}' /proc/$NODE_PID/status) MiB"
  stop_node $NODE_PID
done; done
