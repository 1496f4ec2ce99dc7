#!/usr/bin/env bash
# Full-budget reproduction of the paper's Fashion-MNIST MLP VAE rows, paper protocol:
# KL warm-up 100 epochs, early stopping (patience 50 after warm-up), at most 2000 epochs,
# best-on-validation parameters, test NLL with S = 5000 on all 10000 test images against
# all 50000 training exemplars. One command resumes and finishes every run:
#
#   [RUNS=~/exvae-runs] [CONFIGS="fashion_vae_gaussian ..."] [JOBS=1] [PY=.venv/bin/python] \
#     [REFERENCE_DRAW=1] scripts/paper_runs.sh
#
# Each run trains in $RUNS/<config> (resuming from its checkpoints; a finished one stops at
# once), is evaluated (a finished evaluation of the same parameters is kept, not redone), copied
# into results/<config>/ (scripts/collect_result.py), and the README table is regenerated
# (scripts/results_table.py) once every run has finished. With REFERENCE_DRAW=1 (the
# default) each run is also scored on the paper's own binarisation of the test images
# (eval_binarize=reference, written to $RUNS/<config>.eval_reference/, never into the run
# directory) and collected as results/<config>_reference_draw/. A run carried in carry/ from an
# earlier machine (scripts/carry_runs.py) is unpacked first where its directory is missing.
# Start it with nohup from a checkout of its own so edits to this tree never change a
# running job:
# git worktree add ~/exvae-runs/src-<sha> <sha>.
#
# JOBS=N runs up to N configs at once, each pinned (taskset) to its own block of
# nproc/N cores, so that XLA's thread pools do not fight over the same cores. Measured on
# 2 cores: RAT 39 s/epoch on one core while the Gaussian run takes 7.5 s/epoch on the
# other, against 20 and 4.8 s/epoch each alone on both cores, and 3-4x slower each when
# two unpinned runs share the cores. With JOBS > 1 each run writes $RUNS/<config>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RUNS="${RUNS:-$HOME/exvae-runs}"
JOBS="${JOBS:-1}"
REFERENCE_DRAW="${REFERENCE_DRAW:-1}"
CONFIGS="${CONFIGS:-fashion_vae_gaussian fashion_vae_vampprior fashion_vae_exemplar_rat}"
ncpu=$(nproc)
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || [ "$JOBS" -gt "$ncpu" ]; then
  echo "paper_runs.sh: JOBS must be an integer from 1 to nproc ($ncpu), got '$JOBS'" >&2
  exit 2
fi
per=$(( ncpu / JOBS ))
# A new machine has no run directories: recreate the ones carried in the repository
# (carry/, written by scripts/carry_runs.py pack) so that those runs resume, not restart.
# shellcheck disable=SC2086  # CONFIGS is a list of names
$PY scripts/carry_runs.py unpack --runs "$RUNS" $CONFIGS

run_one() {  # run_one <config>: train (resume), evaluate, collect
  local cfg="$1" wd="$RUNS/$1"
  mkdir -p "$wd"
  if [ ! -f "$wd/provenance.json" ]; then
    printf '{"commit": "%s", "started": "%s", "command": "scripts/paper_runs.sh"}\n' \
      "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(date -u +%FT%TZ)" > "$wd/provenance.json"
  fi
  $PY train.py --config="configs/$cfg.py" --workdir="$wd" --config.progress=False
  # Evaluation keeps config.progress on: without a terminal it prints a plain line a minute
  # (images done, elapsed, time left) to the log, so an hour-long test NLL is never silent.
  $PY eval.py --config="configs/$cfg.py" --workdir="$wd" | tail -1
  $PY scripts/collect_result.py --workdir "$wd" --name "$cfg"
  if [ "$REFERENCE_DRAW" = 1 ]; then
    $PY eval.py --config="configs/$cfg.py" --workdir="$wd" \
      --config.eval_binarize=reference --config.eval.out_dir="$wd.eval_reference" | tail -1
    $PY scripts/collect_result.py --workdir "$wd" --eval_dir "$wd.eval_reference" \
      --name "${cfg}_reference_draw"
  fi
}

if [ "$JOBS" -eq 1 ]; then
  for cfg in $CONFIGS; do run_one "$cfg"; done
else
  # A slot is a block of cores. The configs are dealt to the slots in turn, and each slot
  # works through its share one after another.
  mkdir -p "$RUNS"
  pids=()
  for (( slot = 0; slot < JOBS; slot++ )); do
    cores="$(( slot * per ))-$(( slot * per + per - 1 ))"
    mine=()
    i=0
    for cfg in $CONFIGS; do
      if [ $(( i % JOBS )) -eq "$slot" ]; then mine+=("$cfg"); fi
      i=$(( i + 1 ))
    done
    [ "${#mine[@]}" -eq 0 ] && continue
    (
      for cfg in "${mine[@]}"; do
        echo "paper_runs.sh: $cfg on cores $cores, log $RUNS/$cfg.log"
        taskset -c "$cores" bash -c "set -euo pipefail; $(declare -f run_one); PY='$PY' RUNS='$RUNS' REFERENCE_DRAW='$REFERENCE_DRAW'; run_one '$cfg'" \
          >> "$RUNS/$cfg.log" 2>&1
      done
    ) &
    pids+=("$!")
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  if [ "$status" -ne 0 ]; then
    echo "paper_runs.sh: a run failed; see the logs in $RUNS; the table was not regenerated" >&2
    exit 1
  fi
fi
$PY scripts/results_table.py --write-readme README.md
