#!/usr/bin/env bash
# The long form of the queue's chaos test: async load while nodes are SIGKILLed and restarted at
# random intervals; prints acknowledged, completed, lost, duplicated, unexpected.
#
# Usage: scripts/chaos.sh [SECONDS] [MODE]     (default 120 s, mode sqlite)
#   sqlite      one node on its embedded store
#   cluster     three nodes on one PostgreSQL database, a random one killed each time
#   cluster-pg  the same, and every database connection terminated now and then
# The cluster modes need SLUICE_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_TEST_PG_URL="${SLUICE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
case "${2:-sqlite}" in
  sqlite) test=chaos::long ;;
  cluster) test=chaos::long_cluster ;;
  cluster-pg) test=chaos::long_cluster_pg ;;
  *) echo "unknown mode ${2}: sqlite, cluster or cluster-pg" >&2; exit 2 ;;
esac
scripts/build-guests.sh >/dev/null
CHAOS_SECONDS="${1:-120}" cargo test -p sluice-cli --test e2e "$test" -- --ignored --exact --nocapture
