"""The tables of docs/fidelity.md, generated from the records in ``results/fidelity/``.

Usage: python reference/fidelity_tables.py [--results results/fidelity] [--write docs/fidelity.md]

Each table sits in docs/fidelity.md between ``<!-- fidelity:NAME:begin -->`` and
``<!-- fidelity:NAME:end -->``; ``--write`` replaces those blocks, and
``tests/reference/test_fidelity_tables.py`` checks that the page holds exactly
what this prints. Tables:

  equal_epoch   validation loss per epoch of every exvae and reference seed
                (each code's own validation draw; equal_epoch_rat.json)
  seeds52       epoch 52 on the reference's validation images: per group mean,
                sd, range and the Welch difference (equal_epoch_rat.json)
  continue      both codes continuing one reference state: mean per epoch
                (ref_continue_epoch52.json)
  vampprior     the first epochs from either VampPrior start, against the
                reference (vampprior_init.json)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reference.seed_spread import welch  # noqa: E402
from reference.vampprior_init import table as vampprior_table  # noqa: E402

EQUAL_EPOCHS = (4, 12, 24, 36, 44, 48, 52)
NAMES = ("equal_epoch", "seeds52", "continue", "vampprior")


def _load(results: str, name: str):
  with open(os.path.join(results, name)) as f:
    return json.load(f)


def _label(key: str) -> str:
  """'exvae_seed2 (notes)' -> 'exvae, seed 2': the run, without its notes."""
  base = key.split(" (", 1)[0].strip()
  m = re.fullmatch(r"(exvae|reference)_?seed(\d+)", base)
  return f"{m.group(1)}, seed {m.group(2)}" if m else base


def _seed(key: str) -> str:
  return re.sub(r"\D", "", key.split(" (", 1)[0])


def equal_epoch(results: str) -> str:
  """Validation loss at EQUAL_EPOCHS for every seed of both codes, plus epoch 52 on the
  reference's validation images (exvae's seeds scored by reference/ref_val_loss.py; the
  reference's own evaluate_loss, which is on those images already)."""
  rec = _load(results, "equal_epoch_rat.json")
  on_ref = rec["epoch52_on_reference_val_images"]
  ref_imgs = {("exvae", _seed(k)): v for k, v in on_ref["exvae"].items()}
  ref_imgs.update(
    {("reference", _seed(k)): v for k, v in on_ref["reference_own_evaluate_loss"].items()}
  )
  runs = sorted(
    rec["val_per_epoch_own_draw"].items(),
    key=lambda kv: (not kv[0].startswith("reference"), int(_seed(kv[0]))),
  )
  lines = [
    "| run | "
    + " | ".join(f"epoch {e}" for e in EQUAL_EPOCHS)
    + " | epoch 52, reference's validation images |",
    "|---|" + "---|" * (len(EQUAL_EPOCHS) + 1),
  ]
  for key, curve in runs:
    code = "reference" if key.startswith("reference") else "exvae"
    cells = [f"{curve[str(e)]['loss']:.2f}" if str(e) in curve else "" for e in EQUAL_EPOCHS]
    r = ref_imgs.get((code, _seed(key)))
    cells.append(f"{r:.2f}" if r is not None else "")
    lines.append(f"| {_label(key)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def seeds52(results: str) -> str:
  """Epoch-52 validation loss on the reference's images: both groups and their difference."""
  sec = _load(results, "equal_epoch_rat.json")["epoch52_on_reference_val_images"]
  groups = {
    "exvae": list(sec["exvae"].values()),
    "reference": list(sec["reference_own_evaluate_loss"].values()),
  }
  lines = ["| code | seeds | mean | sd over seeds | range |", "|---|---|---|---|---|"]
  for name, v in groups.items():
    a = np.asarray(v, np.float64)
    lines.append(
      f"| {name} | {a.size} | {a.mean():.2f} | {a.std(ddof=1):.2f} | {a.min():.2f}-{a.max():.2f} |"
    )
  w = welch(groups["exvae"], groups["reference"])
  lines.append(
    f"| exvae - reference | | {w['diff']:+.2f} +- {w['se']:.2f} | "
    f"Welch df {w['df']:.1f} | p = {w['p']:.3f} |"
  )
  return "\n".join(lines)


def continue_table(results: str) -> str:
  """Mean validation loss per epoch of the continuations of one reference state."""
  rounds = _load(results, "ref_continue_epoch52.json")["rounds"]
  start, n = rounds[0]["start_epoch"], rounds[0]["epochs"]
  ex = [r["val"] for rd in rounds for r in rd["exvae"].values()]
  ref = [r["val_own_scorer"] for rd in rounds for r in rd["reference"].values()]
  ex_final = [r["val"][-1] for rd in rounds for r in rd["exvae"].values()]
  ref_final = [r["final_exvae_scorer"] for rd in rounds for r in rd["reference"].values()]
  epochs = range(start + 1, start + n + 1)
  lines = [
    "| mean of | continuations | "
    + " | ".join(f"epoch {e}" for e in epochs)
    + " | last epoch, one scorer (sd) |",
    "|---|---|" + "---|" * (n + 1),
  ]
  for name, curves, fin in (("exvae", ex, ex_final), ("reference", ref, ref_final)):
    m = np.mean(np.asarray(curves, np.float64), axis=0)
    f = np.asarray(fin, np.float64)
    lines.append(
      f"| {name} | {len(curves)} | "
      + " | ".join(f"{x:.2f}" for x in m)
      + f" | {f.mean():.2f} ({f.std(ddof=1):.2f}) |"
    )
  w = welch(ex_final, ref_final)
  lines.append(
    "| exvae - reference | | "
    + " | " * (n - 1)
    + f" | {w['diff']:+.2f} +- {w['se']:.2f} (p = {w['p']:.2f}) |"
  )
  return "\n".join(lines)


def vampprior(results: str) -> str:
  """Validation loss of the first six epochs from either VampPrior start."""
  return "\n".join(vampprior_table(_load(results, "vampprior_init.json"), range(1, 7)))


def tables(results: str) -> dict[str, str]:
  """Every table, by marker name.

  Args:
    results: the folder of the fidelity records (``results/fidelity``).

  Returns:
    ``{name: markdown table}`` for each name in ``NAMES``.
  """
  return {
    "equal_epoch": equal_epoch(results),
    "seeds52": seeds52(results),
    "continue": continue_table(results),
    "vampprior": vampprior(results),
  }


def markers(name: str) -> tuple[str, str]:
  return f"<!-- fidelity:{name}:begin -->", f"<!-- fidelity:{name}:end -->"


def blocks(text: str) -> dict[str, str]:
  """The current content of each marked block of a page (stripped)."""
  out = {}
  for name in NAMES:
    b, e = markers(name)
    if b in text and e in text:
      out[name] = text.split(b, 1)[1].split(e, 1)[0].strip()
  return out


def fill(text: str, new: dict[str, str]) -> str:
  """``text`` with each marked block replaced by ``new[name]``; a missing marker is an error."""
  for name, body in new.items():
    b, e = markers(name)
    if b not in text or e not in text:
      raise SystemExit(f"fidelity_tables: the page has no {b} ... {e} markers.")
    head, rest = text.split(b, 1)
    _, tail = rest.split(e, 1)
    text = f"{head}{b}\n{body}\n{e}{tail}"
  return text


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default=os.path.join(ROOT, "results", "fidelity"))
  ap.add_argument("--write", default=None, metavar="PAGE")
  a = ap.parse_args(argv)
  new = tables(a.results)
  for name, body in new.items():
    print(f"## {name}\n{body}\n")
  if a.write:
    with open(a.write) as f:
      text = fill(f.read(), new)
    with open(a.write + ".tmp", "w") as f:
      f.write(text)
    os.replace(a.write + ".tmp", a.write)
  return 0


if __name__ == "__main__":
  sys.exit(main())
