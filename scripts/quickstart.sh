#!/usr/bin/env bash
# Starts a sluice node on the embedded default (./.sluice), deploys the example function and
# prints the curl line to call it. The node runs in the foreground; Ctrl-C stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
LISTEN=${SLUICE_LISTEN:-127.0.0.1:8080}
echo "building sluice and the example (first time: ~10 minutes on 2 cores) ..." >&2
cargo build --release -q -p sluice-cli
HELLO=$(scripts/build-guests.sh | sed -n 1p)
BIN=target/release/sluice
log=$(mktemp)
"$BIN" serve --listen "$LISTEN" 2> >(tee "$log" >&2) &
node=$!
trap 'kill -INT $node 2>/dev/null; wait $node' INT TERM
for _ in $(seq 1 300); do grep -q 'listening on' "$log" && break; sleep 0.05; done
grep -q 'listening on' "$log" || { echo "the node did not start" >&2; exit 1; }
URL=http://$LISTEN
SLUICE_URL=$URL "$BIN" deploy hello "$HELLO"
cat >&2 <<MSG

sluice is serving the example. Call it:

  curl -H "Authorization: Bearer \$(cat .sluice/admin.token)" $URL/fn/default/hello/

or queue a call (202 with its Location) and fetch its result later:

  curl -i -X POST -H "Prefer: respond-async" -H "Authorization: Bearer \$(cat .sluice/admin.token)" $URL/fn/default/hello/
  curl -H "Authorization: Bearer \$(cat .sluice/admin.token)" $URL/v1/invocations/<id>/response

The CLI does the same: target/release/sluice invoke hello --async; target/release/sluice invocations list
(or put it on your PATH: cargo install --path crates/sluice-cli). Watch the node: sluice top.

Ctrl-C stops the node.
MSG
wait $node
