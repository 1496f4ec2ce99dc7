#!/usr/bin/env bash
# Full-budget reproduction of the paper's Fashion-MNIST MLP VAE rows, paper protocol:
# KL warm-up 100 epochs, early stopping (patience 50 after warm-up), at most 2000 epochs,
# best-on-validation parameters, test NLL with S = 5000 on all 10000 test images against
# all 50000 training exemplars. One command resumes and finishes every run:
#
#   [RUNS=~/exvae-runs] [CONFIGS="fashion_vae_gaussian ..."] [PY=.venv/bin/python] scripts/paper_runs.sh
#
# Each run trains in $RUNS/<config> (resuming from its checkpoints), is evaluated, copied
# into results/<config>/ (scripts/collect_result.py), and the README table is regenerated
# (scripts/results_table.py). Start it with nohup from a checkout of its own so edits to
# this tree never change a running job: git worktree add ~/exvae-runs/src-<sha> <sha>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUNS="${RUNS:-$HOME/exvae-runs}"
for cfg in ${CONFIGS:-fashion_vae_gaussian fashion_vae_vampprior fashion_vae_exemplar_rat}; do
  wd="$RUNS/$cfg"
  mkdir -p "$wd"
  if [ ! -f "$wd/provenance.json" ]; then
    printf '{"commit": "%s", "started": "%s", "command": "scripts/paper_runs.sh"}\n' \
      "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(date -u +%FT%TZ)" > "$wd/provenance.json"
  fi
  $PY train.py --config="configs/$cfg.py" --workdir="$wd" --config.progress=False
  $PY eval.py --config="configs/$cfg.py" --workdir="$wd" --config.progress=False | tail -1
  $PY scripts/collect_result.py --workdir "$wd" --name "$cfg"
done
$PY scripts/results_table.py --write-readme README.md
