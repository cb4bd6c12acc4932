#!/usr/bin/env bash
# The project's test command (README): builds the guests, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guests.sh >/dev/null
cargo test --workspace --all-targets "$@"
