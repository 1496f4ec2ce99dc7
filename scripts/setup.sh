#!/usr/bin/env bash
# Creates .venv with the pinned requirements and exvae (editable, with its console
# scripts: . .venv/bin/activate puts exvae-train etc. on the PATH) and, where the system allows,
# installs the genuine Fashion-MNIST (Debian package dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# exvae itself, editable (the checkout is the package) with its console scripts in
# .venv/bin (exvae-train, exvae-eval, ...); its dependencies and the build backend
# (setuptools) come from requirements.txt above, so this step needs no index.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "NOTE: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped." >&2
  else
    echo "NOTE: Fashion-MNIST not found; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
