"""VampPrior pseudo-input initialisation: which start does the reference's validation curve follow?

The reference's constructor draws its pseudo-inputs N(0.05, 0.01), then its He
initialiser overwrites them with N(0, 2/K) (``vampprior.init=he``, exvae's
default; ``normal`` is the N(0.05, 0.01) start of the VampPrior paper's code). This
prints the validation loss of the first epochs, mean over seeds, for the
reference's own training loop and for exvae with either start:

  python reference/vampprior_init.py                       # the committed record
  python reference/vampprior_init.py --collect ~/exvae-runs --out results/fidelity/vampprior_init.json

The runs (one pinned core each; ``../shared/reference/driver.py`` for the reference):
  driver.py train --mode vampprior --epochs 6 --seed S --threads 1 --out RUNS/vampinit/ref_sS
  train.py --config=configs/fashion_vae_vampprior.py --config.seed=S --config.num_epochs=6 \\
      --config.vampprior.init={he,normal} --workdir=RUNS/vampinit/exvae_{he,normal}_sS
Seed 1 of the reference is the first 6 epochs of a 24-epoch run; exvae's seed 0 is the
paper-protocol run with each start (the ``normal`` curve is in
``results/fidelity/vampprior_normal_init_epoch460/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "results", "fidelity", "vampprior_init.json")


def exvae_curve(metrics_jsonl: str) -> dict[int, float]:
  """Validation loss per epoch from an exvae run's metrics.jsonl."""
  out = {}
  with open(metrics_jsonl) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if "val_loss" in r:
        out[int(r["epoch"])] = float(r["val_loss"])
  return out


def reference_curve(log: str) -> dict[int, float]:
  """Validation loss per epoch from the reference's printed log (``o Val.  loss: X``)."""
  with open(log) as f:
    vals = re.findall(r"Val\.\s+loss:\s+([\d.]+)", f.read())
  return {i + 1: float(v) for i, v in enumerate(vals)}


def table(groups: dict[str, list[dict]], epochs) -> list[str]:
  """Markdown rows: mean (per seed) for each group, and reference minus each exvae start."""
  names = list(groups)
  rows = [
    "| epoch | "
    + " | ".join(names)
    + " | "
    + " | ".join(f"reference - {n}" for n in names[1:])
    + " |",
    "|---|" + "---|" * (2 * len(names) - 1),
  ]
  for e in epochs:
    m = {k: np.array([c[str(e)] if str(e) in c else c[e] for c in v]) for k, v in groups.items()}
    cells = [f"{m[k].mean():.2f} ({', '.join(f'{x:.2f}' for x in m[k])})" for k in names]
    ref = m[names[0]]
    diffs = []
    for k in names[1:]:
      se = np.sqrt(ref.var(ddof=1) / len(ref) + m[k].var(ddof=1) / len(m[k]))
      diffs.append(f"{ref.mean() - m[k].mean():+.2f} +- {se:.2f}")
    rows.append(f"| {e} | " + " | ".join(cells + diffs) + " |")
  return rows


def collect(runs: str) -> dict:
  """The record from the run directories named in this module's docstring."""
  v = os.path.join(runs, "vampinit")
  normal_run = os.path.join(ROOT, "results", "fidelity", "vampprior_normal_init_epoch460")
  with open(os.path.join(normal_run, "curve.csv")) as f:
    old = {int(r[0]): float(r[1]) for r in csv.reader(f) if r[0].isdigit()}
  cut = lambda c: {str(e): c[e] for e in range(1, 7)}  # noqa: E731
  return {
    "reference": [cut(reference_curve(os.path.join(runs, "refvamp_s1_e24.log")))]
    + [cut(reference_curve(os.path.join(v, f"ref_s{s}.log"))) for s in (2, 3)],
    "exvae he": [cut(exvae_curve(os.path.join(runs, "fashion_vae_vampprior", "metrics.jsonl")))]
    + [cut(exvae_curve(os.path.join(v, f"exvae_he_s{s}", "metrics.jsonl"))) for s in (1, 2)],
    "exvae normal": [cut(old)]
    + [cut(exvae_curve(os.path.join(v, f"exvae_normal_s{s}", "metrics.jsonl"))) for s in (1, 2)],
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--collect", default=None, help="runs folder to read the curves from")
  p.add_argument("--out", default=None, help="write the collected record here")
  args = p.parse_args(argv)
  if args.collect:
    record = collect(os.path.expanduser(args.collect))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
  else:
    with open(RECORD) as f:
      record = json.load(f)
  print("\n".join(table(record, range(1, 7))))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
