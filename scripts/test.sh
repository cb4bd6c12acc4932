#!/usr/bin/env bash
# The project's test command (README): builds the guests and the examples (installing the
# examples' tools the first time), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guests.sh >/dev/null
scripts/build-examples.sh >/dev/null
# The /metrics test parses the node's text with the reference Prometheus parser (PyPI).
venv=target/metrics-venv
if ! "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "prometheus_client==0.21.1"
fi
export SLUICE_TEST_METRICS_PYTHON="$PWD/$venv/bin/python"
if [ $# -gt 0 ]; then
  cargo test --workspace --all-targets "$@"
  exit
fi
# The chaos tests run by themselves, after the rest: a node runs async work on its slow lane at
# the lowest OS priority (SCHED_IDLE), so the other tests' CPU (component compiles, CPU-bound
# guests) can starve a chaos node's calls past the test's deadline.
cargo test --workspace --all-targets -- --skip chaos::
cargo test -p sluice-cli --test e2e -- chaos:: --test-threads=1
