"""exvae against the authors' code over seeds: the equal-epoch figures of the README, from results/.

Usage: python bench/seed_spread.py [--json results/fidelity/equal_epoch_rat.json]
       python bench/seed_spread.py --pairs results/fidelity/fresh_pairs_epoch12.json

Reads ``epoch52_on_reference_val_images`` of the fidelity record: every exvae
seed's epoch-52 validation loss on the reference's validation images (one
scorer: ``scripts/ref_val_loss.py``) and every reference seed's own
``evaluate_loss`` at epoch 52 (which agrees with that scorer within 0.03 nats
on the two reference seeds scored both ways). Prints each group's mean and
standard deviation over seeds, and the difference exvae - reference with its
Welch standard error, degrees of freedom and two-sided p-value, so the gap the
README states is recomputed from the stored values, never typed.

``--pairs`` reads the summaries of ``bench/ref_continue.py --ref_fresh_seed``
runs (one pair per shared initialisation, collected as a JSON list) and prints
the paired differences exvae - reference: per epoch on each code's own scorer,
and at the last epoch with one scorer (exvae's validation of both codes'
final weights), with their mean, standard error and one-sample t p-value.
With ``--vs_own_init`` it also compares the pairs' exvae runs (started from
the reference's initialisations) with exvae's own from-scratch seeds of the
``--json`` record (Welch): whether the initialisation explains a gap.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def welch(a, b) -> dict:
  """Welch's comparison of two independent samples.

  Args:
    a: values of the first group (exvae), at least two.
    b: values of the second group (the reference), at least two.

  Returns:
    dict with ``diff`` (mean a - mean b), ``se`` (sqrt(var_a/n_a + var_b/n_b),
    sample variances), ``df`` (Welch-Satterthwaite) and ``p`` (two-sided).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    raise ValueError(f"welch needs two values or more in each group, got {a.size} and {b.size}")
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  diff = float(a.mean() - b.mean())
  p = float(2 * stats.t.sf(abs(diff) / se, df))
  return {"diff": diff, "se": se, "df": df, "p": p}


def groups(record: dict) -> tuple[dict, dict]:
  """(exvae {seed: loss}, reference {seed: loss}) at epoch 52 from the fidelity record."""
  sec = record["epoch52_on_reference_val_images"]
  return dict(sec["exvae"]), dict(sec["reference_own_evaluate_loss"])


def paired(diffs) -> dict:
  """Mean, standard error and two-sided one-sample t p-value of paired differences."""
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    raise ValueError(f"paired needs two pairs or more, got {d.size}")
  se = float(d.std(ddof=1) / math.sqrt(d.size))
  return {"mean": float(d.mean()), "se": se, "n": int(d.size),
          "p": float(2 * stats.t.sf(abs(d.mean()) / se, d.size - 1))}


def print_pairs(summaries: list) -> list:
  """The paired table of ``ref_continue --ref_fresh_seed`` summaries (one exvae seed each).

  Returns:
    the exvae runs' last-epoch validation losses, in the summaries' order.
  """
  finals, rows = [], []
  for sm in summaries:
    (ex,) = sm["exvae"].values()
    (rf,) = sm["reference"].values()
    d = np.asarray(ex["val"]) - np.asarray(rf["val_own_scorer"])
    rows.append(d)
    finals.append(ex["val"][-1] - rf["final_exvae_scorer"])
    print(f"pair {sm['ref_fresh_seed']}: exvae - reference per epoch (own scorers) "
          + " ".join(f"{v:+.2f}" for v in d)
          + f"; final, one scorer {finals[-1]:+.3f}")
  rows = np.stack(rows)
  print("mean per epoch: " + " ".join(f"{v:+.2f}" for v in rows.mean(0)))
  print(f"mean over epochs (own scorers), per pair: "
        + " ".join(f"{v:+.3f}" for v in rows.mean(1)))
  if len(finals) > 1:
    f = paired(finals)
    print(f"final epoch, one scorer: {f['mean']:+.3f} +- {f['se']:.3f} nats over {f['n']} pairs "
          f"(p = {f['p']:.3f})")
  return [next(iter(sm["exvae"].values()))["val"][-1] for sm in summaries]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default=os.path.join(ROOT, "results", "fidelity", "equal_epoch_rat.json"))
  ap.add_argument("--pairs", default=None, help="a JSON list of ref_continue --ref_fresh_seed "
                  "summaries")
  ap.add_argument("--vs_own_init", action="store_true",
                  help="with --pairs: Welch of the pairs' exvae finals against exvae's own-init "
                       "seeds of --json")
  a = ap.parse_args(argv)
  if a.vs_own_init and not a.pairs:
    ap.error("--vs_own_init needs --pairs")
  if a.pairs:
    with open(a.pairs) as f:
      finals = print_pairs(json.load(f))
    if a.vs_own_init:
      with open(a.json) as f:
        own = list(groups(json.load(f))[0].values())
      w = welch(finals, own)
      print(f"exvae from the reference's initialisations (n={len(finals)}, mean "
            f"{np.mean(finals):.3f}) - exvae from its own (n={len(own)}, mean {np.mean(own):.3f}): "
            f"{w['diff']:+.3f} +- {w['se']:.3f} nats (Welch, df {w['df']:.1f}, p = {w['p']:.3f})")
    return 0
  with open(a.json) as f:
    ex, ref = groups(json.load(f))
  for name, g in (("exvae", ex), ("reference", ref)):
    v = np.array(list(g.values()))
    print(f"{name:9s} n={v.size}  mean {v.mean():.3f}  sd {v.std(ddof=1):.3f}  "
          f"range {v.min():.2f}-{v.max():.2f}  ({', '.join(f'{k} {x:.2f}' for k, x in g.items())})")
  w = welch(list(ex.values()), list(ref.values()))
  print(f"exvae - reference: {w['diff']:+.3f} +- {w['se']:.3f} nats (Welch, df {w['df']:.1f}, "
        f"p = {w['p']:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
