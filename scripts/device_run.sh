#!/usr/bin/env bash
# Paper runs in device-sized chunks (docs/gpu.md: "Long runs on a lent GPU").
#
#   scripts/device_run.sh --prepare CONFIG         # HERE: .carry-run/ (wheel, data), hold aside
#   scripts/device_run.sh --prepare --eval CONFIG  #   what the device does not read; exit 1 with
#                                                  #   one line if the call would carry > 64 MiB
#   scripts/device_run.sh CONFIG MINUTES [--config.KEY=VALUE ...]
#                                                  # THERE: resume carry/device/CONFIG, train at
#                                                  #   most MINUTES (may be fractional), stop at a
#                                                  #   checkpoint, pack the run into $OUT/CONFIG/
#   scripts/device_run.sh --eval CONFIG [MINUTES] [--config.KEY=VALUE ...]
#                                                  # THERE: S = 5000 on all test images; scores
#                                                  #   (or partial ones) into $OUT/CONFIG/eval/
#   scripts/device_run.sh --unpack CONFIG DIR      # HERE: the returned files into
#                                                  #   carry/device/CONFIG/; puts held files back
#   scripts/device_run.sh --restore                # HERE: puts held files back
#
# Training starts with SIGTERM ignored and gets SIGTERM every DEVICE_RUN_TERM_EVERY seconds
# (default 5) from the deadline on: the trainer saves a checkpoint and stops at the first one
# after it installs its handler, never before (no run dies in its start-up). SIGKILL after
# DEVICE_RUN_GRACE (default 120) more seconds. CONFIG is a file name in configs/ (no .py).
set -uo pipefail
cd "$(dirname "$0")/.."
HERE_PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
HELPER=scripts/device_run.py

case "${1:-}" in
  --prepare) shift; exec "$HERE_PY" "$HELPER" prepare "$@" ;;
  --unpack) shift; exec "$HERE_PY" "$HELPER" unpack "$@" ;;
  --restore) exec "$HERE_PY" "$HELPER" restore ;;
  --eval) MODE=eval; shift ;;
  ""|-h|--help) sed -n '2,21p' "$0"; exit 2 ;;
  *) MODE=train ;;
esac
CONFIG="${1:-}"; shift || true
if [ -z "$CONFIG" ] || [ ! -f "configs/$CONFIG.py" ]; then
  echo "device_run: no config configs/$CONFIG.py (CONFIG is a name in configs/)" >&2; exit 2
fi
MINUTES=9
if [ "$MODE" = train ] || [[ "${1:-}" =~ ^[0-9.]+$ ]]; then MINUTES="${1:-}"; shift || true; fi
if ! awk -v m="$MINUTES" 'BEGIN {exit !(m ~ /^[0-9]*\.?[0-9]+$/ && m > 0)}'; then
  echo "device_run: MINUTES must be a number > 0, got '$MINUTES'" >&2; exit 2
fi
SECS=$(awk -v m="$MINUTES" 'BEGIN {s = int(m * 60); print (s < 1 ? 1 : s)}')
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/exvae-device-out}"
BASE="${DEVICE_RUN_WORK:-/tmp/exvae-device}"
mkdir -p "$OUT/$CONFIG" "$BASE"
LOG="$OUT/$CONFIG.log"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/exvae-site "${DEVICE_RUN_CARRIED:-.carry-run}"/wheels/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/exvae-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Runs "$@" in the background, then stops it at the deadline: SIGTERM every TERM_EVERY
# seconds (the first ones may land while it still ignores them), SIGKILL after the grace.
run_until_deadline() {
  "$@" >>"$LOG" 2>&1 &
  local pid=$! t0=$SECONDS last=-1000
  while kill -0 "$pid" 2>/dev/null; do
    local el=$((SECONDS - t0))
    if [ "$el" -ge $((SECS + ${DEVICE_RUN_GRACE:-120})) ]; then
      echo "device_run: no stop within the grace; SIGKILL" >>"$LOG"; kill -KILL "$pid"
    elif [ "$el" -ge "$SECS" ] && [ $((el - last)) -ge "${DEVICE_RUN_TERM_EVERY:-5}" ]; then
      kill -TERM "$pid" 2>/dev/null; last=$el
    fi
    sleep 1
  done
  wait "$pid"
}

if [ "$MODE" = train ]; then
  WORK="$BASE/$CONFIG"
  DATA=$("$PY" "$HELPER" setup "$CONFIG" "$WORK" "$BASE/data" 2> >(tee -a "$LOG" >&2)) || exit 1
  DATA_FLAG=(); [ -n "$DATA" ] && DATA_FLAG=(--config.data_dir="$DATA")
  # SIGTERM ignored until the trainer installs its handler (which saves and stops).
  run_until_deadline bash -c 'trap "" TERM; exec "$@"' _ "$PY" train.py \
    --config="configs/$CONFIG.py" --workdir="$WORK" --config.progress=False "${DATA_FLAG[@]}" "$@"
  rc=$?
  tail -n 30 "$LOG"
  case $rc in 0|143) ;; *) echo "device_run: train.py exited with $rc" >&2 ;; esac
  "$PY" "$HELPER" pack "$CONFIG" "$WORK" "$OUT" 2> >(tee -a "$LOG" >&2) || exit 1
  case $rc in 0|143) exit 0 ;; *) exit "$rc" ;; esac
fi

EVAL_OUT="$BASE/$CONFIG-eval"
read -r MODEL DATA < <("$PY" "$HELPER" eval-setup "$CONFIG" "$EVAL_OUT" "$BASE/data" \
  2> >(tee -a "$LOG" >&2)) || exit 1
[ -n "${MODEL:-}" ] || exit 1
DATA_FLAG=(); [ -n "${DATA:-}" ] && DATA_FLAG=(--config.data_dir="$DATA")
# eval.py keeps its scores in eval_partial.npz once a minute: a SIGTERM loses at most that.
run_until_deadline "$PY" eval.py --config="configs/$CONFIG.py" --workdir="$MODEL" \
  --config.eval.out_dir="$EVAL_OUT" --config.eval.num_importance_samples=5000 \
  --config.eval.max_test_examples=0 --config.eval.max_queries=50000 --config.progress=False \
  "${DATA_FLAG[@]}" "$@"
rc=$?
tail -n 30 "$LOG"
"$PY" "$HELPER" eval-collect "$CONFIG" "$EVAL_OUT" "$OUT" 2> >(tee -a "$LOG" >&2)
exit "$rc"
