#!/usr/bin/env bash
# The long form of the queue's chaos test: async load while nodes are SIGKILLed and restarted at
# random intervals; prints acknowledged, completed, lost, duplicated, unexpected. The broker modes
# do the same to a trigger's node while a publisher publishes.
#
# Usage: scripts/chaos.sh [SECONDS] [MODE]     (default 120 s, mode sqlite)
#   sqlite      one node on its embedded store
#   cluster     three nodes on one PostgreSQL database, a random one killed each time
#   cluster-pg  the same, and every database connection terminated now and then
#   nats        a broker trigger: JetStream messages published at 1000/s while the node is killed
#   amqp        every 8 s (and restarted); each message must be exactly one invocation at the end
#   mqtt        (MQTT at 40/s: Mosquitto keeps 1000 messages for a session whose node is down)
# The cluster modes need SLUICE_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_TEST_PG_URL="${SLUICE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
case "${2:-sqlite}" in
  sqlite) test=chaos::long ;;
  cluster) test=chaos::long_cluster ;;
  cluster-pg) test=chaos::long_cluster_pg ;;
  nats|amqp|mqtt) test=triggers::long_chaos_$2 ;;
  *) echo "unknown mode ${2}: sqlite, cluster, cluster-pg, nats, amqp or mqtt" >&2; exit 2 ;;
esac
scripts/build-guests.sh >/dev/null
CHAOS_SECONDS="${1:-120}" cargo test -p sluice-cli --test e2e "$test" -- --ignored --exact --nocapture
