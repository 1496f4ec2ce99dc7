"""exvae against the authors' code over seeds: the equal-epoch figures of the README, from results/.

Usage: python reference/seed_spread.py [--json results/fidelity/equal_epoch_rat.json]
       python reference/seed_spread.py --pairs results/fidelity/fresh_pairs_epoch12.json

Reads ``epoch52_on_reference_val_images`` of the fidelity record: every exvae
seed's epoch-52 validation loss on the reference's validation images (one
scorer: ``reference/ref_val_loss.py``) and every reference seed's own
``evaluate_loss`` at epoch 52 (which agrees with that scorer within 0.03 nats
on the two reference seeds scored both ways). Prints each group's mean and
standard deviation over seeds, and the difference exvae - reference with its
Welch standard error, degrees of freedom and two-sided p-value, so the gap the
README states is recomputed from the stored values, never typed.

``--pairs`` reads the summaries of ``reference/ref_continue.py --ref_fresh_seed``
runs (one pair per shared initialisation, collected as a JSON list) and prints
the paired differences exvae - reference: per epoch on each code's own scorer,
and at the last epoch with one scorer (exvae's validation of both codes'
final weights), with their mean, standard error and one-sample t p-value.
``--draws`` reads ``reference/ref_draws_run.py`` summaries (the reference's code
from its seed-S start, fed some or all of exvae's random inputs) together
with the ``--pairs`` file of the same seeds, and prints, per run, its mean
difference over epochs 1-12, 13-24, 25-52 and 44-52 from exvae on the same start and
draws (``ref_continue``) and from the reference's own from-scratch run, and at
its last epoch from exvae (and, for a run as long as theirs, from their own
run) with one scorer. Its last lines compare the full-length streams whose
torch seed is not the initialisation's (as in the authors' own script) with
the coupled run and with exvae from the same starts.

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
  df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
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
  return {
    "mean": float(d.mean()),
    "se": se,
    "n": int(d.size),
    "p": float(2 * stats.t.sf(abs(d.mean()) / se, d.size - 1)),
  }


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
    print(
      f"pair {sm['ref_fresh_seed']}: exvae - reference per epoch (own scorers) "
      + " ".join(f"{v:+.2f}" for v in d)
      + f"; final, one scorer {finals[-1]:+.3f}"
    )
  rows = np.stack(rows)
  print("mean per epoch: " + " ".join(f"{v:+.2f}" for v in rows.mean(0)))
  print("mean over epochs (own scorers), per pair: " + " ".join(f"{v:+.3f}" for v in rows.mean(1)))
  if len(finals) > 1:
    f = paired(finals)
    print(
      f"final epoch, one scorer: {f['mean']:+.3f} +- {f['se']:.3f} nats over {f['n']} pairs "
      f"(p = {f['p']:.3f})"
    )
  return [next(iter(sm["exvae"].values()))["val"][-1] for sm in summaries]


# Epoch windows of the --draws means: the early swings, the epochs where the gap
# appears, the rest of a 52-epoch run, and its last nine epochs.
_WINDOWS = ((0, 12), (12, 24), (24, 52), (43, 52))


def print_draws(runs: list, pairs: list) -> list[dict]:
  """How far the reference's code on (some of) exvae's draws is from exvae and from itself.

  Args:
    runs: ``ref_draws_run`` summaries (``ref_fresh_seed``, ``exvae_inputs``,
      ``val_own_scorer`` per epoch, ``final_exvae_scorer``).
    pairs: ``ref_continue --ref_fresh_seed`` summaries whose ``reference`` entry is
      the reference's own run from that start (``refinit_pairs_epoch52.json``).

  Returns:
    one dict per run: ``seed``, ``inputs``, ``vs_exvae`` and ``vs_ref_own`` (mean
    differences per epoch range, own scorers), ``final_vs_exvae`` (one scorer) and,
    for a run as long as the reference's own, ``final_vs_ref_own`` (one scorer).
  """
  by_seed = {sm["ref_fresh_seed"]: sm for sm in pairs}
  out = []
  for r in runs:
    sm = by_seed.get(r["ref_fresh_seed"])
    if sm is None:
      raise ValueError(f"no pair for seed {r['ref_fresh_seed']} in the --pairs file")
    (ex,) = sm["exvae"].values()
    (own,) = sm["reference"].values()
    a = np.asarray(r["val_own_scorer"], np.float64)
    n = a.size
    if len(ex["val"]) < n or len(own["val_own_scorer"]) < n:
      raise ValueError(f"seed {r['ref_fresh_seed']}: the pair has fewer than {n} epochs")
    d_ex = a - np.asarray(ex["val"][:n])
    d_own = a - np.asarray(own["val_own_scorer"][:n])
    ranges = [(lo, min(hi, n)) for lo, hi in _WINDOWS if lo < n]
    row = {
      "seed": r["ref_fresh_seed"],
      "inputs": r.get("exvae_inputs", ["batch", "cand", "eps"]),
      "stream_seed": r.get("stream_seed"),
      "epochs": n,
      "vs_exvae": {f"{lo + 1}-{hi}": float(d_ex[lo:hi].mean()) for lo, hi in ranges},
      "vs_ref_own": {f"{lo + 1}-{hi}": float(d_own[lo:hi].mean()) for lo, hi in ranges},
      "final_vs_exvae": float(r["final_exvae_scorer"] - ex["val"][n - 1]),
    }
    if n == len(own["val_own_scorer"]):
      # Both final weights scored by exvae's validation: no scorer offset in this one.
      row["final_vs_ref_own"] = float(r["final_exvae_scorer"] - own["final_exvae_scorer"])
    out.append(row)
    stream = "" if row["stream_seed"] is None else f" (torch re-seeded with {row['stream_seed']})"
    print(
      f"seed {row['seed']}, exvae's {'+'.join(row['inputs']) or 'nothing'}{stream}, {n} epochs: "
      "mean difference from exvae from this start (on all its draws) "
      + ", ".join(f"epochs {k} {v:+.3f}" for k, v in row["vs_exvae"].items())
      + "; from their own run "
      + ", ".join(f"epochs {k} {v:+.3f}" for k, v in row["vs_ref_own"].items())
      + f"; epoch {n}, one scorer, from exvae {row['final_vs_exvae']:+.3f}"
      + (
        ""
        if "final_vs_ref_own" not in row
        else f", from their own run {row['final_vs_ref_own']:+.3f}"
      )
    )
  return out


def print_decoupled(rows: list[dict]) -> dict | None:
  """Full-length reference streams whose torch seed is not the initialisation's.

  The authors' script builds the model before it seeds torch, so its training
  draws never reuse the initial weights' draws; the harness's from-scratch runs
  (``driver.py train --seed S``) seed both with S. This compares, start by start,
  such a decoupled stream (``--exvae_inputs none --stream_seed T``, T != S) with
  the coupled run and with exvae: at the last epoch with one scorer, and as
  means over the late windows (each code's own scorer), which average out the
  single epochs' swings.

  Args:
    rows: the output of :func:`print_draws`.

  Returns:
    ``{"n", "starts", "final": {"vs_ref_own", "vs_exvae"}, "<window>": {...}}``:
    per comparison the differences per start (decoupled stream minus the other),
    plus a ``paired`` summary of each when there are two starts or more; None
    when no row qualifies.
  """
  sel = [
    r
    for r in rows
    if "final_vs_ref_own" in r
    and not r["inputs"]
    and r["stream_seed"] is not None
    and r["stream_seed"] != r["seed"]
  ]
  if not sel:
    return None
  out = {
    "n": len(sel),
    "starts": [r["seed"] for r in sel],
    "final": {
      "vs_ref_own": [r["final_vs_ref_own"] for r in sel],
      "vs_exvae": [r["final_vs_exvae"] for r in sel],
    },
  }
  windows = [
    w for w in (f"{lo + 1}-{hi}" for lo, hi in _WINDOWS[2:]) if all(w in r["vs_exvae"] for r in sel)
  ]
  for w in windows:
    out[w] = {
      "vs_ref_own": [r["vs_ref_own"][w] for r in sel],
      "vs_exvae": [r["vs_exvae"][w] for r in sel],
    }
  print(
    f"decoupled reference streams from {len(sel)} start(s) "
    f"({', '.join(map(str, out['starts']))}), minus the coupled run / minus exvae "
    "from the same start:"
  )
  for label, key in (
    (f"epoch {sel[0]['epochs']}, one scorer", "final"),
    *((f"mean over epochs {w}", w) for w in windows),
  ):
    parts = []
    for cmp in ("vs_ref_own", "vs_exvae"):
      v = out[key][cmp]
      if len(v) > 1:
        out[key][cmp + "_paired"] = f = paired(v)
        parts.append(f"{f['mean']:+.3f} +- {f['se']:.3f} (p = {f['p']:.3f})")
      else:
        parts.append(f"{v[0]:+.3f}")
    print(
      f"  {label}: "
      + " / ".join(parts)
      + "   per start: "
      + " ".join(f"{x:+.3f}" for x in out[key]["vs_ref_own"])
      + " / "
      + " ".join(f"{x:+.3f}" for x in out[key]["vs_exvae"])
    )
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--json", default=os.path.join(ROOT, "results", "fidelity", "equal_epoch_rat.json")
  )
  ap.add_argument(
    "--pairs", default=None, help="a JSON list of ref_continue --ref_fresh_seed summaries"
  )
  ap.add_argument(
    "--draws",
    default=None,
    help="a JSON list of ref_draws_run summaries (needs --pairs for the same seeds)",
  )
  ap.add_argument(
    "--vs_own_init",
    action="store_true",
    help="with --pairs: Welch of the pairs' exvae finals against exvae's own-init seeds of --json",
  )
  a = ap.parse_args(argv)
  if (a.vs_own_init or a.draws) and not a.pairs:
    ap.error("--vs_own_init and --draws need --pairs")
  if a.draws:
    with open(a.draws) as f, open(a.pairs) as g:
      print_decoupled(print_draws(json.load(f), json.load(g)))
    return 0
  if a.pairs:
    with open(a.pairs) as f:
      finals = print_pairs(json.load(f))
    if a.vs_own_init:
      with open(a.json) as f:
        own = list(groups(json.load(f))[0].values())
      w = welch(finals, own)
      print(
        f"exvae from the reference's initialisations (n={len(finals)}, mean "
        f"{np.mean(finals):.3f}) - exvae from its own (n={len(own)}, mean {np.mean(own):.3f}): "
        f"{w['diff']:+.3f} +- {w['se']:.3f} nats (Welch, df {w['df']:.1f}, p = {w['p']:.3f})"
      )
    return 0
  with open(a.json) as f:
    ex, ref = groups(json.load(f))
  for name, g in (("exvae", ex), ("reference", ref)):
    v = np.array(list(g.values()))
    print(
      f"{name:9s} n={v.size}  mean {v.mean():.3f}  sd {v.std(ddof=1):.3f}  "
      f"range {v.min():.2f}-{v.max():.2f}  ({', '.join(f'{k} {x:.2f}' for k, x in g.items())})"
    )
  w = welch(list(ex.values()), list(ref.values()))
  print(
    f"exvae - reference: {w['diff']:+.3f} +- {w['se']:.3f} nats (Welch, df {w['df']:.1f}, "
    f"p = {w['p']:.3f})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
