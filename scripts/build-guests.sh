#!/usr/bin/env bash
# Builds the WebAssembly guests (each its own cargo project, outside the host workspace) for
# wasm32-wasip2 and prints the path of each .wasm. The e2e tests call this too.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >&2
for dir in examples/hello guests/testguest; do
  name=$(basename "$dir")
  cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$root/$dir/Cargo.toml" >&2
  echo "$root/$dir/target/wasm32-wasip2/release/$name.wasm"
done
