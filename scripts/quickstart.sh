#!/usr/bin/env bash
# One command for a newcomer: environment, data, a short Fashion-MNIST Exemplar VAE
# (RAT) training run on the CPU, then its evaluation (test NLL + sample picture).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
WORKDIR="${WORKDIR:-runs/quickstart}"
.venv/bin/python train.py --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
.venv/bin/python eval.py --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
