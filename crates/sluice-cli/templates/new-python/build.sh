#!/bin/sh
# Builds {{name}}.wasm from app.py with componentize-py, which it installs into .venv the first
# time (pinned in requirements.txt). A componentize-py of that version already on the PATH is
# used as it is.
set -eu
cd "$(dirname "$0")"
version=$(sed -n 's/^componentize-py==//p' requirements.txt)
if command -v componentize-py >/dev/null 2>&1 && [ "$(componentize-py --version)" = "componentize-py $version" ]; then
  tool=componentize-py
else
  if [ ! -x .venv/bin/componentize-py ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  fi
  tool=.venv/bin/componentize-py
fi
"$tool" -d wit -w function componentize app -o {{name}}.wasm
