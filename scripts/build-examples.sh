#!/usr/bin/env bash
# Builds the example function in each language (examples/rust, examples/python, examples/js: the
# same JSON greeter, no sluice SDK) and prints the path of each .wasm, in that order. Their tools
# go into project-local places and stay there between runs: componentize-py into a venv under
# target/, componentize-js (npm ci) into examples/js/node_modules. A component is rebuilt only
# when one of its sources, or its tool, is newer than it.
#
#   --no-install   use the tools already installed, and fail saying what is missing (the e2e
#                  tests build this way: they never install anything)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
install=1
[[ "${1:-}" == "--no-install" ]] && install=0

COMPONENTIZE_PY=0.25.1
venv="$root/target/examples-venv"
js="$root/examples/js"
py="$root/examples/python"

missing() {
  echo "build-examples: $1 is not installed: run scripts/build-examples.sh (without --no-install) once; CI does" >&2
  exit 1
}

# True when $1 exists and nothing else named (files, or directories searched whole) is newer.
fresh() {
  local out=$1
  shift
  [[ -f "$out" ]] && [[ -z "$(find "$@" -newer "$out" -print -quit)" ]]
}

# Rust: cargo knows what is fresh.
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >&2
cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$root/examples/rust/Cargo.toml" >&2
echo "$root/examples/rust/target/wasm32-wasip2/release/greet.wasm"

# Python: componentize-py from PyPI, pinned, in a venv; the stamp marks a finished install.
stamp="$venv/.componentize-py-$COMPONENTIZE_PY"
if [[ ! -f "$stamp" ]]; then
  [[ $install == 1 ]] || missing "componentize-py $COMPONENTIZE_PY (in target/examples-venv)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY" >&2
  touch "$stamp"
fi
if ! fresh "$py/greet.wasm" "$py/app.py" "$py/wit" "$stamp"; then
  (cd "$py" && "$venv/bin/componentize-py" -d wit -w greet componentize app -o greet.wasm >&2)
fi
echo "$py/greet.wasm"

# JavaScript: componentize-js from npm, as package-lock.json pins it. The stamp holds the hash of
# the lockfile that was installed.
lock_hash=$(sha256sum "$js/package-lock.json" | cut -d' ' -f1)
stamp="$js/node_modules/.sluice-installed"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$lock_hash" ]]; then
  [[ $install == 1 ]] || missing "componentize-js (npm ci in examples/js)"
  (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$lock_hash" >"$stamp"
fi
if ! fresh "$js/greet.wasm" "$js/app.js" "$js/package.json" "$js/wit" "$stamp"; then
  (cd "$js" && npm run --silent build >&2)
fi
echo "$js/greet.wasm"
