#!/usr/bin/env bash
# The README results tables: configs trained for the same number of epochs,
# then importance-sampled test NLL.
# Usage: EPOCHS=10 WARMUP=5 S=1000 [CONFIGS="..."] [EVAL_ARGS="--config.eval.max_test_examples=1000"] scripts/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
EPOCHS="${EPOCHS:-10}"; WARMUP="${WARMUP:-5}"; S="${S:-1000}"; OUT="${OUT:-runs/results}"
for cfg in ${CONFIGS:-fashion_vae_gaussian fashion_vae_vampprior fashion_vae_exemplar_rat fashion_vae_exemplar}; do
  wd="$OUT/$cfg"
  start=$(date +%s)
  $PY train.py --config=configs/$cfg.py --workdir="$wd" --config.num_epochs="$EPOCHS" \
    --config.warmup_epochs="$WARMUP" --config.progress=False
  echo "$cfg train_wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltimes.txt"
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
  $PY eval.py --config=configs/$cfg.py --workdir="$wd" --config.eval.num_importance_samples="$S" \
    --config.progress=False ${EVAL_ARGS:-} | tail -1
done
