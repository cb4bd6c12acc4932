#!/usr/bin/env bash
# Density benchmark: N distinct functions on one node (issue 10). Deploys N copies of the hello
# component made distinct by a custom section, then prints a table: RSS idle after deploy, after
# one call each and after a restart; restart-to-listening; first-call latency of functions not
# called since the restart; hot throughput (wrk) over 10 functions while the code cache holds 10%
# of them; disk use. The hot sync ratio against `wasmtime serve` is bench/sync.sh's.
#
# Usage: bench/density.sh N        (e.g. 1000, 10000; DURATION=10s optional)
# Needs: wrk (apt-get install wrk), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${1:?usage: bench/density.sh N}
need_wrk
sluice_bin
SLUICE=$SLUICE python3 bench/density.py "$N" "$(hello_wasm)"
