#!/usr/bin/env bash
# The downstream records of a finished, published model (docs/downstream.md):
#
#   scripts/downstream.sh CONFIG [knn] [augment] [pictures]     # default: knn augment
#
# reads results/CONFIG/model (scripts/publish_model.py writes it) and
#   knn       writes results/CONFIG/knn.json and knn_per_example.npz (k = 3, 5, 9, 15;
#             about a minute);
#   augment   writes results/CONFIG/augment.json (the MLP without and with generative
#             augmentation, SEEDS classifier seeds, EPOCHS epochs; 2.2 h on 2 cores of an
#             Intel Xeon for 3 seeds x 100 epochs);
#   pictures  writes docs/images/{conditional,unconditional,cyclic,interpolation}.png, and
#             tsne.png and curves.png from the run directory RUN=~/exvae-runs/CONFIG if given;
# then regenerates the tables of docs/downstream.md. Each output is written in a scratch
# folder first and copied when its command succeeded, so a failed or stopped step leaves
# the committed records as they were. The scratch folder stays: the augmentation keeps
# each finished classifier there, and the state of the one in training every 10 epochs,
# so the same command started again after a stop continues where it stopped (a record
# made with other settings or another model is not used).
#
# Environment: PY (.venv/bin/python), SEEDS (0,1,2), EPOCHS (100), MAX_STEPS (0: no cap;
# for a smoke run), RUN (the run directory, for curves.png), RESULTS and IMAGES (where the
# records and pictures go: results, docs/images; elsewhere, docs/downstream.md is left as
# it is), MODEL (the published model: results/CONFIG/model), SCRATCH (the scratch folder:
# ${TMPDIR:-/tmp}/exvae_downstream_CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if [ $# -lt 1 ]; then
  echo "usage: scripts/downstream.sh CONFIG [knn] [augment] [pictures]" >&2
  exit 2
fi
cfg="$1"; shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(knn augment)
model="${MODEL:-results/$cfg/model}"
if [ ! -f "$model/model.json" ]; then
  echo "downstream.sh: no published model in $model: run scripts/publish_model.py" \
       "--workdir RUN_DIR --config $cfg first" >&2
  exit 2
fi
for s in "${steps[@]}"; do
  case "$s" in knn|augment|pictures) ;; *)
    echo "downstream.sh: unknown step '$s' (knn, augment, pictures)" >&2; exit 2;;
  esac
done
RESULTS="${RESULTS:-results}"; IMAGES="${IMAGES:-docs/images}"
mkdir -p "$RESULTS/$cfg" "$IMAGES"
tmp="${SCRATCH:-${TMPDIR:-/tmp}/exvae_downstream_$cfg}"
mkdir -p "$tmp"
uses=("$PY" uses.py)
for s in "${steps[@]}"; do
  case "$s" in
    knn)
      rm -rf "$tmp/knn"
      "${uses[@]}" knn --config="$model/config.json" --workdir="$model" --ks=3,5,9,15 \
        --out="$tmp/knn" --config.progress=False
      cp "$tmp/knn/knn_per_example.npz" "$RESULTS/$cfg/knn_per_example.npz"
      cp "$tmp/knn/knn.json" "$RESULTS/$cfg/knn.json";;
    augment)
      rm -f "$tmp/augment/augment.json"   # augment_runs/ stays: the finished classifiers
      "${uses[@]}" augment --config="$model/config.json" --workdir="$model" \
        --seeds="${SEEDS:-0,1,2}" --epochs="${EPOCHS:-100}" --max_steps="${MAX_STEPS:-0}" \
        --out="$tmp/augment" --config.progress=False
      cp "$tmp/augment/augment.json" "$RESULTS/$cfg/augment.json";;
    pictures)
      rm -rf "$tmp/pictures"
      "${uses[@]}" generate --config="$model/config.json" --workdir="$model" \
        --out="$tmp/pictures" --config.progress=False
      if [ -n "${RUN:-}" ]; then
        "${uses[@]}" plots --config="$model/config.json" --workdir="$RUN" \
          --out="$tmp/pictures" --config.progress=False
      else
        echo "downstream.sh: tsne.png and curves.png need the run directory (RUN=...): skipped" >&2
      fi
      for f in conditional unconditional cyclic interpolation tsne curves; do
        [ -f "$tmp/pictures/$f.png" ] && cp "$tmp/pictures/$f.png" "$IMAGES/$f.png"
      done;;
  esac
done
if [ "$RESULTS" = results ]; then
  "$PY" scripts/downstream_table.py --write docs/downstream.md
fi
echo "downstream.sh: $cfg: ${steps[*]} done; records in $RESULTS/$cfg/, scratch in $tmp"
