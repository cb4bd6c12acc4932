#!/usr/bin/env bash
# The long form of the queue's chaos test: async load while the node is SIGKILLed and
# restarted at random intervals; prints acknowledged, completed, lost, duplicated, unexpected.
# Usage: scripts/chaos.sh [SECONDS]   (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guests.sh >/dev/null
CHAOS_SECONDS="${1:-120}" cargo test -p sluice-cli --test e2e chaos::long -- --ignored --nocapture
