"""The downstream tables of docs/downstream.md, generated from ``results/`` (never typed by hand).

Usage: python scripts/downstream_table.py [--results results] [--write docs/downstream.md]
                                         [--check docs/downstream.md]

Five tables:
* kNN test error on encoder means, per model (``results/<name>/knn.json``),
  for k = 3, 5, 9, 15, with the query images and tie-break it used;
* the kNN differences between the priors of one model, paired over the same
  images (``results/<name>/knn_per_example.npz``), in the test setting and,
  where recorded, the validation setting: the mean of ``wrong_a - wrong_b``
  per image +- its standard error, beside the paper's claim;
* the same paired differences on the validation images minus those on the
  test images, both against the training references alone, with a
  family-wise permutation p-value per model;
* generative augmentation (``results/<name>/augment.json``): MLP test error
  without and with augmentation, mean +- standard deviation over classifier
  seeds, and their difference +- the standard deviation of the per-seed
  differences, beside the paper's figures;
* the augmentation classifier without augmentation, per code and training-set
  size (``augment.json`` and ``results/fidelity/classify_baseline/*.json``,
  exvae's records and the authors' ``classify_data`` run by
  ``reference/ref_classify.py``), beside the paper's baseline.

``--write`` replaces the text between ``<!-- downstream:begin -->`` and
``<!-- downstream:end -->``; ``--check`` exits 1 if the page is not what
this script generates.
"""

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae.compare import PRIORS, prior_family  # noqa: E402

BEGIN, END = "<!-- downstream:begin -->", "<!-- downstream:end -->"
KS = ("3", "5", "9", "15")
# The paper's Fashion-MNIST augmentation figures (MLP 784-1024-1024-10), test error in %.
PAPER_AUGMENT = {"fashion_mnist": (8.56, 8.16)}
PAPER_KNN = (
  "the Exemplar VAE's encoder means classify best of the three priors "
  "(shown as a figure, without numbers)"
)


def _load(root: str, filename: str) -> list[tuple[str, dict]]:
  out = []
  if not os.path.isdir(root):
    return out
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, filename)
    if os.path.isfile(path):
      with open(path) as f:
        out.append((name, json.load(f)))
  return out


def knn_table(rows: list[tuple[str, dict]]) -> str:
  """Markdown table of kNN test errors (%), one row per model."""
  if not rows:
    return "No kNN result in `results/` yet.\n"
  lines = [
    "| model | " + " | ".join(f"k = {k}" for k in KS) + " | queries, tie-break | parameters |",
    "|---|" + "---|" * len(KS) + "---|---|",
  ]
  for name, r in rows:
    errs = " | ".join(f"{100 * r['test'][k]:.2f}" if k in r["test"] else "-" for k in KS)
    model = r.get("model", {})
    params = f"best epoch {model['best_epoch']}" if "best_epoch" in model else "-"
    lines.append(
      f"| `{name}` | {errs} | {r.get('query_images', '-')}, {r.get('tie_break', '-')} | {params} |"
    )
  return "\n".join(lines) + "\n"


class RecordError(ValueError):
  """A record in ``results/`` does not agree with its companion file."""


def _knn_per_example(root: str, name: str) -> dict[str, np.ndarray] | None:
  """The arrays of ``knn_per_example.npz``, checked against the ``knn.json`` beside it.

  Raises:
    RecordError: the file is not the one ``knn.json`` records (its SHA-256), or its
      predictions give other error rates than ``knn.json`` reports.
  """
  from exvae import atomic
  from exvae.uses import knn as knn_lib

  path = os.path.join(root, name, "knn_per_example.npz")
  if not os.path.isfile(path):
    return None
  summary_path = os.path.join(root, name, "knn.json")
  summary = {}
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  recorded = summary.get("per_example_sha256")
  if recorded is not None and atomic.sha256_file(path) != recorded:
    raise RecordError(
      f"{path} is not the file {summary_path} was written with (its SHA-256 "
      "differs): run the kNN command again for this model"
    )
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  if recorded is not None:
    try:
      knn_lib.check_record(summary, arrays, os.path.join(root, name))
    except ValueError as e:
      raise RecordError(str(e)) from None
  return arrays


# (setting, prefix of its arrays in knn_per_example.npz)
KNN_SETTINGS = (
  ("test (references: training + validation)", ""),
  ("validation (references: training)", "val_"),
  ("test (references: training)", "test_on_train_"),
)


def paired_knn(
  a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: str, prefix: str = ""
) -> tuple[float, float] | None:
  """Mean and standard error (%) of ``wrong_a - wrong_b`` over the same images.

  Args:
    a, b: the two models' ``knn_per_example.npz`` arrays.
    k: the k, as a string.
    prefix: ``""`` for the test setting, ``"val_"`` for the validation setting.

  Returns:
    None when the two did not score the same images (other labels or sizes) or lack k.
  """
  d = _wrong_diff(a, b, k, prefix)
  if d is None:
    return None
  return 100 * float(d.mean()), 100 * float(d.std(ddof=1)) / math.sqrt(d.size)


def _wrong_diff(
  a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: str, prefix: str
) -> np.ndarray | None:
  """Per image ``wrong_a - wrong_b`` (0 or +-1), or None if the two did not score the same images."""
  key, lab = f"{prefix}pred_k{k}", f"{prefix}labels"
  if (
    key not in a
    or key not in b
    or lab not in a
    or lab not in b
    or a[lab].shape != b[lab].shape
    or not np.array_equal(a[lab], b[lab])
  ):
    return None
  return (a[key] != a[lab]).astype(np.float64) - (b[key] != b[lab]).astype(np.float64)


def _knn_pairs(root: str, names: list[str]) -> list[tuple[tuple[str, str], str, str, dict, dict]]:
  """``((data set, model), richer, simpler, its arrays, its arrays)`` for each two priors of one model.

  Rows of one model (data set and network, from config.json) that differ in the
  prior pair; each ``knn_per_example.npz`` is read once.
  """
  groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
  loaded: dict[str, dict[str, np.ndarray]] = {}
  for name in names:
    fam = prior_family(os.path.join(root, name))
    per_example = _knn_per_example(root, name) if fam is not None else None
    if per_example is not None:
      loaded[name] = per_example
      groups.setdefault(fam[0], []).append((-PRIORS.index(fam[1]), name))  # richest first
  return [
    (fam, a, b, loaded[a], loaded[b])
    for fam in sorted(groups)
    for (_, a), (_, b) in itertools.combinations(sorted(groups[fam]), 2)
  ]


def knn_paired_table(root: str, names: list[str]) -> str:
  """Markdown table of paired kNN differences between the priors of each model family."""
  pairs = _knn_pairs(root, names)
  lines = [
    "| richer - simpler prior | setting | " + " | ".join(f"k = {k}" for k in KS) + " |",
    "|---|---|" + "---|" * len(KS),
  ]
  for setting, prefix in KNN_SETTINGS:
    for _, a, b, pa, pb in pairs:
      if prefix and f"{prefix}labels" not in pa and f"{prefix}labels" not in pb:
        continue  # neither kept this setting
      cells = []
      for k in KS:
        r = paired_knn(pa, pb, k, prefix)
        cells.append("not paired" if r is None else f"{r[0]:+.2f} +- {r[1]:.2f}")
      lines.append(f"| `{a}` - `{b}` | {setting} | " + " | ".join(cells) + " |")
  if len(lines) == 2:
    return "No paired kNN result in `results/` yet.\n"
  lines.append(f"| paper | test | {PAPER_KNN} |" + " |" * (len(KS) - 1))
  return "\n".join(lines) + "\n"


def _wrong_differences(pa: dict, pb: dict, prefix: str) -> np.ndarray | None:
  """(images, len(KS)) ``wrong_a - wrong_b`` in one setting, or None if it does not pair."""
  d = [_wrong_diff(pa, pb, k, prefix) for k in KS]
  return None if any(x is None for x in d) else np.stack(d, 1)


def query_set_test(
  dv: np.ndarray, dt: np.ndarray, permutations: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
  """Do two query sets give the same paired differences?

  Args:
    dv: (Nv, C) per-image differences ``wrong_a - wrong_b`` on one query set
      (C comparisons: pairs of priors times k).
    dt: (Nt, C) the same on the other query set, with the same references.
    permutations: random reassignments of the pooled images to the two sets.
    seed: seed of the permutations.

  Returns:
    ``mean(dv) - mean(dt)`` (C,), its standard error (C,), and the
    family-wise p-value: the share of permutations whose largest
    ``|difference / SE|`` over the C comparisons reaches the observed largest.
  """

  def z(a, b):
    diff = a.mean(0) - b.mean(0)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return diff, se

  def zmax(diff, se):  # a comparison without spread (two equal models) says nothing
    return np.max(np.abs(np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)))

  diff, se = z(dv, dt)
  obs = zmax(diff, se)
  pool, n = np.concatenate([dv, dt]), len(dv)
  rng = np.random.default_rng(seed)
  hits = 0
  for _ in range(permutations):
    idx = rng.permutation(len(pool))
    d, e = z(pool[idx[:n]], pool[idx[n:]])
    hits += zmax(d, e) >= obs
  return diff, se, (hits + 1) / (permutations + 1)


def query_set_table(root: str, names: list[str]) -> str:
  """Markdown table: the paired differences on validation queries minus those on test queries.

  Both settings classify against the training references alone, so they
  differ only in which held-out images are queried. Below the table, per
  model, the family-wise permutation p-value over its pairs of priors and k.
  """
  per_family: dict[tuple[str, str], list[tuple[str, np.ndarray, np.ndarray]]] = {}
  for fam, a, b, pa, pb in _knn_pairs(root, names):
    dv, dt = _wrong_differences(pa, pb, "val_"), _wrong_differences(pa, pb, "test_on_train_")
    if dv is not None and dt is not None:
      per_family.setdefault(fam, []).append((f"`{a}` - `{b}`", dv, dt))
  if not per_family:
    return "No model kept both query sets against the training references yet.\n"
  lines = [
    "| richer - simpler prior | " + " | ".join(f"k = {k}" for k in KS) + " |",
    "|---|" + "---|" * len(KS),
  ]
  notes = []
  for fam, pairs in per_family.items():
    # Pairs of one model scored the same images, so their columns pool.
    diff, se, p = query_set_test(
      np.concatenate([dv for _, dv, _ in pairs], 1), np.concatenate([dt for _, _, dt in pairs], 1)
    )
    for i, (row, _, _) in enumerate(pairs):
      cells = [
        f"{100 * diff[j]:+.2f} +- {100 * se[j]:.2f}" for j in range(i * len(KS), (i + 1) * len(KS))
      ]
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
    notes.append(
      f"`{fam[1]}` on `{fam[0]}`: family-wise permutation p-value over these "
      f"{diff.size} differences (2000 reassignments of the pooled images, seed 0): "
      f"{p:.3f}."
    )
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def augment_table(rows: list[tuple[str, dict]], dataset: str = "fashion_mnist") -> str:
  """Markdown table of augmentation test errors (%), with the paper's figures."""
  paper = PAPER_AUGMENT.get(dataset)
  head = (
    "| model | seeds | epochs | without | with | difference | encoder input | s2 "
    "| augmented copies misread |",
    "|---|---|---|---|---|---|---|---|---|",
  )
  lines = list(head)
  if paper:
    lines.append(
      f"| paper (Exemplar VAE) | - | 100 | {paper[0]:.2f} | {paper[1]:.2f} | "
      f"{paper[1] - paper[0]:+.2f} | - | - | - |"
    )
  for name, r in rows:

    def pm(tag):
      if f"test_error_{tag}" not in r:  # an arm that was not trained
        return "-"
      return f"{100 * r[f'test_error_{tag}']:.2f} +- {100 * r.get(f'test_error_{tag}_std', 0):.2f}"

    diff = (
      f"{100 * (r['test_error_with'] - r['test_error_without']):+.2f}"
      if "test_error_with" in r and "test_error_without" in r
      else "-"
    )
    # Both arms of a seed share the initialisation and batch order: the spread
    # of the per-seed differences (not of either arm) says how sure the gain is.
    per_seed = [
      x["test_error_with"] - x["test_error_without"]
      for x in r.get("runs", [])
      if "test_error_with" in x and "test_error_without" in x
    ]
    if len(per_seed) > 1 and diff != "-":
      diff += f" +- {100 * float(np.std(per_seed, ddof=1)):.2f}"
    s2 = f"exp({r['log_var']:.2f})" if "log_var" in r else "-"
    # How often the classifier trained on real images alone disagrees with the
    # label an augmented copy keeps (the augmentation's label noise).
    misread = (
      f"{100 * r['aug_error_without']:.2f} (real: {100 * r['train_error_without']:.2f})"
      if "aug_error_without" in r
      else "-"
    )
    lines.append(
      f"| `{name}` | {len(r.get('seeds', [r.get('seed', 0)]))} | {r.get('epochs')} | "
      f"{pm('without')} | {pm('with')} | {diff} | "
      f"{r.get('encode_input', 'bernoulli')} | {s2} | {misread} |"
    )
  if len(lines) == len(head) + (1 if paper else 0):
    lines.append("| (no augmentation result in `results/` yet) | | | | | | | | |")
  return "\n".join(lines) + "\n"


BASELINE_DIR = os.path.join("fidelity", "classify_baseline")


def baseline_table(root: str, dataset: str = "fashion_mnist") -> str:
  """Markdown table of the augmentation classifier's test error without augmentation (%).

  One row per record in ``results/fidelity/classify_baseline/`` (exvae's
  ``exvae-uses augment --arms=without`` records, and the authors'
  ``classify_data`` run by ``reference/ref_classify.py``) and per model's
  ``augment.json``, so the baseline is seen per code and per training-set size.
  """
  rows = []
  for name, r in _load(root, "augment.json"):
    if "test_error_without" in r:
      rows.append(
        (
          f"exvae (`results/{name}/augment.json`)",
          r.get("num_train", "-"),
          r["test_error_without"],
          r.get("test_error_without_std"),
          r.get("seeds", []),
        )
      )
  d = os.path.join(root, BASELINE_DIR)
  for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    if not f.endswith(".json"):
      continue
    with open(os.path.join(d, f)) as fh:
      r = json.load(fh)
    rel = f"`results/{BASELINE_DIR}/{f}`"
    if "sajadn" in str(r.get("code", "")):  # reference/ref_classify.py: errors in percent
      rows.append(
        (
          f"authors' `classify_data` ({rel})",
          r.get("num_train"),
          r["test_error"] / 100,
          None,
          [r.get("seed")],
        )
      )
    elif "test_error_without" in r:
      rows.append(
        (
          f"exvae ({rel})",
          r.get("num_train"),
          r["test_error_without"],
          r.get("test_error_without_std"),
          r.get("seeds", []),
        )
      )
  lines = ["| code (record) | training images | seeds | test error (%) |", "|---|---|---|---|"]
  if dataset in PAPER_AUGMENT:
    lines.append(f"| paper | - | - | {PAPER_AUGMENT[dataset][0]:.2f} |")
  for what, n, err, sd, seeds in rows:
    spread = f" +- {100 * sd:.2f}" if sd and len(seeds) > 1 else ""
    lines.append(f"| {what} | {n} | {', '.join(str(x) for x in seeds)} | {100 * err:.2f}{spread} |")
  if len(rows) == 0:
    lines.append("| (no record in `results/` yet) | | | |")
  return "\n".join(lines) + "\n"


def generate(root: str) -> str:
  """The text between the markers."""
  knn = _load(root, "knn.json")
  return (
    "\n### kNN test error on encoder means (%)\n\n"
    + knn_table(knn)
    + "\n### kNN: paired error differences (percentage points)\n\n"
    + knn_paired_table(root, [name for name, _ in knn])
    + "\n### kNN: validation queries against test queries (percentage points)\n\n"
    "The paired difference of the validation setting minus that of the test images "
    "against the same references (training images alone).\n\n"
    + query_set_table(root, [name for name, _ in knn])
    + "\n### Generative augmentation: MLP test error (%)\n\n"
    + augment_table(_load(root, "augment.json"))
    + "\n### Augmentation classifier without augmentation: test error by code (%)\n\n"
    + baseline_table(root)
    + "\n"
  )


def _splice(page: str, text: str, path: str) -> str:
  if BEGIN not in page or END not in page:
    raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
  return page[: page.index(BEGIN) + len(BEGIN)] + "\n" + text + page[page.index(END) :]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results", default="results")
  p.add_argument("--write", default=None, help="page to update in place")
  p.add_argument("--check", default=None, help="page that must equal the generated text")
  args = p.parse_args(argv)
  try:
    text = generate(args.results)
  except RecordError as e:
    print(f"downstream_table: error: {e}", file=sys.stderr)
    return 1
  for path in filter(None, (args.write, args.check)):
    with open(path) as f:
      page = f.read()
    try:
      new = _splice(page, text, path)
    except ValueError as e:
      print(f"downstream_table: error: {e}", file=sys.stderr)
      return 2
    if args.check and path == args.check:
      if new != page:
        print(f"downstream_table: {path} is out of date; run --write {path}", file=sys.stderr)
        return 1
    else:
      with open(path, "w") as f:
        f.write(new)
  if not args.write and not args.check:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
