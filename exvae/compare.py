"""Paired comparison of evaluated runs on the same test images (``exvae compare``).

Every evaluated workdir (and every ``results/<config>/`` entry) holds a
``per_example.npz`` (:mod:`exvae.per_example`): one log-likelihood estimate
per test image. Two models scored on the *same* images are compared image by
image: the differences ``d_i = NLL_A(x_i) - NLL_B(x_i)`` remove the spread
between easy and hard images, which dominates the unpaired standard errors of
the two means, so the paired test sees differences that the unpaired
intervals hide.

For each pair the report gives the mean difference, its paired standard error
``sd(d) / sqrt(M)``, the two-sided p-value of the paired t-test (M - 1 degrees
of freedom; SciPy's ``ttest_rel``), the Holm-adjusted p-value over all pairs
of the call, and the share of images on which each model has the lower NLL.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Sequence

import numpy as np

from exvae import atomic, per_example

METRICS = ("log_px", "elbo")


class IdentityMismatchError(ValueError):
  """Two per-example files did not score the same images (a usage error: exit code 2)."""

  exit_code = 2


class PerExampleFileError(ValueError):
  """A per-example file that cannot be compared: unreadable, malformed, non-finite scores,
  or not the file its ``eval_metrics.json`` records (a usage error: exit code 2)."""

  exit_code = 2


class ScoringMismatchError(IdentityMismatchError):
  """Two per-example files scored the images differently (S, pruning, binarisation draw)."""


# How the images were scored: runs that differ here are not comparable without --force.
# (key, what it is); prune_keep is read from the eval_metrics.json beside the file.
SCORING = (
  ("num_importance_samples", "importance samples S"),
  ("prune_keep", "pruning (eval.prune_keep)"),
  ("eval_binarize", "binarisation draw (eval_binarize)"),
)


def _scoring(run: dict[str, Any]) -> dict[str, Any]:
  """The scoring settings of a loaded run (None where the files do not say)."""
  import json

  out = {k: run.get(k) for k, _ in SCORING}
  metrics = os.path.join(os.path.dirname(run["path"]), "eval_metrics.json")
  if os.path.isfile(metrics):
    try:
      with open(metrics) as f:
        m = json.load(f)
      if m.get("num_importance_samples") == out["num_importance_samples"]:
        for k, _ in SCORING:
          if out[k] is None or out[k] == "":
            out[k] = m.get(k)
    except (OSError, ValueError):
      pass
  return out


def stale_warning(run: dict[str, Any]) -> str | None:
  """A warning when ``run``'s per-example file predates its run's newest checkpoint.

  The file lies in a workdir (next to ``checkpoints/``) that was trained on
  after it was evaluated (a resumed run): its scores are not the newest
  parameters'.

  Returns:
    The warning, or None (fresh, or not inside a workdir).
  """
  d = os.path.dirname(os.path.abspath(run["path"]))
  ckpt = os.path.join(d, "checkpoints")
  if not os.path.isdir(ckpt):
    return None
  steps = [n for n in os.listdir(ckpt) if n.isdigit()]
  if not steps:
    return None
  newest = max(steps, key=int)
  scored = run.get("checkpoint_step")
  if isinstance(scored, int):
    later = int(newest) > scored
  else:  # a file that does not record its step: by time
    later = os.path.getmtime(run["path"]) < os.path.getmtime(os.path.join(ckpt, newest))
  if not later:
    return None
  return (
    f"{run['path']} is older than {d}'s newest checkpoint (step {newest}; scored: "
    f"{scored}): re-evaluate it (exvae-eval --workdir={d})."
  )


def paired_stats(nll_a: np.ndarray, nll_b: np.ndarray) -> dict[str, float]:
  """Paired statistics of two per-image losses (lower is better).

  Args:
    nll_a: (M,) model A's loss per image (e.g. NLL in nats).
    nll_b: (M,) model B's loss on the same images, in the same order.

  Returns:
    dict: ``n``; ``mean_diff`` (mean of ``nll_a - nll_b``: negative when A
    is better); ``stderr`` (paired standard error); ``t``; ``df``;
    ``p_value`` (two-sided, Student t with M - 1 degrees of freedom);
    ``a_wins``, ``b_wins``, ``ties`` (shares of images, summing to 1).

  Raises:
    ValueError: shapes differ or fewer than two images.
  """
  from scipy import special

  a = np.asarray(nll_a, np.float64).reshape(-1)
  b = np.asarray(nll_b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"paired arrays differ in length: {a.shape[0]} vs {b.shape[0]}.")
  n = a.shape[0]
  if n < 2:
    raise ValueError(f"a paired test needs at least two images, got {n}.")
  d = a - b
  mean = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(n))
  df = n - 1
  if se > 0:
    t = mean / se
    p = float(2.0 * special.stdtr(df, -abs(t)))
  else:  # identical differences everywhere
    t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    p = 1.0 if mean == 0 else 0.0
  return {
    "n": n,
    "mean_diff": mean,
    "stderr": se,
    "t": float(t),
    "df": df,
    "p_value": min(1.0, p),
    "a_wins": float(np.mean(d < 0)),
    "b_wins": float(np.mean(d > 0)),
    "ties": float(np.mean(d == 0)),
  }


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values (family-wise error over all pairs)."""
  p = np.asarray(p_values, np.float64)
  m = p.shape[0]
  order = np.argsort(p, kind="stable")
  adj = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adj[i] = running
  return adj.tolist()


# The priors a paper block compares, from the simplest to the richest: a paired
# row is always "richer - simpler".
PRIORS = ("gaussian", "vampprior", "exemplar")


def prior_family(run_dir: str) -> tuple[tuple[str, str], str] | None:
  """Which model a run directory or ``results/`` entry trained, from its ``config.json``.

  Rows of one family differ only in the prior, so their per-image results pair;
  the directory's name plays no part.

  Args:
    run_dir: a workdir or ``results/<name>/``.

  Returns:
    ``((dataset, model), prior)`` with ``prior`` in :data:`PRIORS`, or None when
    there is no readable ``config.json`` or its prior is another one.
  """
  import json

  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      c = json.load(f)
  except (OSError, ValueError):
    return None
  return config_family(c)


def config_family(config: Any) -> tuple[tuple[str, str], str] | None:
  """:func:`prior_family` of an already loaded ``config.json`` (a dict)."""
  if not isinstance(config, dict) or config.get("prior") not in PRIORS:
    return None
  return (str(config.get("dataset")), str(config.get("model"))), config["prior"]


def _label(path: str) -> str:
  """A short name of a run: its directory (or file) name."""
  f = os.path.abspath(path)
  if os.path.basename(f) == per_example.FILENAME:
    f = os.path.dirname(f)
  return os.path.basename(f.rstrip(os.sep)) or f


def load_checked(path: str) -> dict[str, Any]:
  """:func:`exvae.per_example.load`, and the checks before a file's scores are used.

  The file must be readable and well formed (``count`` scores in each array), its
  scores finite, and it must be the file the ``eval_metrics.json`` beside it records
  (``outputs_sha256``), where there is one.

  Raises:
    FileNotFoundError: no per-example file at ``path``.
    PerExampleFileError: any other failure of the checks (one line).
  """
  import json

  try:
    run = per_example.load(path)
  except FileNotFoundError:
    raise
  except atomic.NPZ_READ_ERRORS as e:
    raise PerExampleFileError(
      f"{path}: cannot be read as a per-example file "
      f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
      "evaluate the run again."
    ) from None
  f = run["path"]
  m = run.get("count")
  for k in per_example.SCORES:
    if k not in run:
      continue
    a = np.asarray(run[k])
    if not isinstance(m, int) or a.shape != (m,):
      raise PerExampleFileError(
        f"{f}: {k} holds {a.shape} scores, its count says {m}: the "
        "file is malformed; evaluate the run again."
      )
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
      raise PerExampleFileError(
        f"{f}: {bad.size} non-finite {k} score(s) (first: image "
        f"{int(bad[0])}, {a[bad[0]]}); evaluate the run again."
      )
  beside = os.path.join(os.path.dirname(f), "eval_metrics.json")
  if os.path.basename(f) == per_example.FILENAME and os.path.isfile(beside):
    try:
      with open(beside) as fh:
        recorded = (json.load(fh).get("outputs_sha256") or {}).get(per_example.FILENAME)
    except (OSError, ValueError, AttributeError) as e:
      raise PerExampleFileError(
        f"{beside}: unreadable ({type(e).__name__}), so {f} cannot "
        "be checked; evaluate the run again."
      ) from None
    if recorded is not None and atomic.sha256_file(f) != recorded:
      raise PerExampleFileError(
        f"{f} is not the file {beside} was written with (its SHA-256 "
        "differs): evaluate the run again."
      )
  return run


def load_runs(paths: Sequence[str], force: bool = False) -> list[dict[str, Any]]:
  """Loads the per-example files of ``paths`` and checks they are comparable.

  Args:
    paths: evaluated workdirs, ``results/`` entries or ``per_example.npz`` files.
    force: accept runs scored differently (:data:`SCORING`).

  Raises:
    FileNotFoundError: a path holds no per-example file.
    IdentityMismatchError: the identities (data set, split, binarisation
      seed, count, image digest) differ.
    ScoringMismatchError: the scoring settings differ, without ``force``.
  """
  runs = [load_checked(p) for p in paths]
  ref = per_example.identity(runs[0])
  for p, r in zip(paths[1:], runs[1:]):
    other = per_example.identity(r)
    if other != ref:
      diff = {k: (ref[k], other[k]) for k in ref if ref[k] != other[k]}
      raise IdentityMismatchError(
        f"{paths[0]} and {p} did not score the same test images; differing fields "
        f"(first, second): {diff}. Evaluate both with the same data set, "
        f"eval_binarize, eval_binarize_seed and eval.max_test_examples."
      )
  ref_scoring = _scoring(runs[0])
  for p, r in zip(paths[1:], runs[1:]):
    other = _scoring(r)
    diff = [
      f"{what} {ref_scoring[k]} vs {other[k]}"
      for k, what in SCORING
      if ref_scoring[k] not in (None, "")
      and other[k] not in (None, "")
      and ref_scoring[k] != other[k]
    ]
    if diff and not force:
      raise ScoringMismatchError(
        f"{paths[0]} and {p} were scored differently ({'; '.join(diff)}): their NLLs are "
        "not comparable. Evaluate both the same way, or pass --force."
      )
  labels = [_label(p) for p in paths]
  if len(set(labels)) < len(labels):  # two runs called the same: use the paths
    labels = list(paths)
  for r, lab in zip(runs, labels):
    r["label"] = lab
  return runs


def compare(paths: Sequence[str], metric: str = "log_px", force: bool = False) -> dict[str, Any]:
  """Every pair of ``paths`` compared on the per-image loss ``-metric``.

  Args:
    paths: two or more evaluated workdirs, ``results/`` entries, or
      ``per_example.npz`` files.
    metric: ``'log_px'`` (importance-sampled log-likelihood; the loss is the
      NLL) or ``'elbo'`` (the loss is the negative ELBO).

  Returns:
    dict: ``runs`` (label, path, mean loss, unpaired standard error),
    ``pairs`` (:func:`paired_stats` of each pair plus labels and
    ``p_holm``), ``identity`` and ``metric``.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
  if len(paths) < 2:
    raise ValueError(f"compare needs at least two runs, got {len(paths)}.")
  runs = load_runs(paths, force=force)
  losses = [-np.asarray(r[metric], np.float64) for r in runs]
  pairs = []
  for i, j in itertools.combinations(range(len(runs)), 2):
    s = paired_stats(losses[i], losses[j])
    pairs.append(dict(s, a=runs[i]["label"], b=runs[j]["label"], i=i, j=j))
  for pr, adj in zip(pairs, holm([pr["p_value"] for pr in pairs])):
    pr["p_holm"] = adj
  summary = [
    {
      "label": r["label"],
      "path": r["path"],
      "mean": float(l.mean()),
      "stderr": float(l.std(ddof=1) / math.sqrt(l.shape[0])),
      "num_importance_samples": r.get("num_importance_samples"),
    }
    for r, l in zip(runs, losses)
  ]
  return {
    "metric": metric,
    "identity": per_example.identity(runs[0]),
    "runs": summary,
    "pairs": pairs,
    "_losses": losses,
    "warnings": [w for w in map(stale_warning, runs) if w],
  }


def format_report(result: dict[str, Any]) -> str:
  """The human-readable table printed by ``exvae compare``."""
  name = "NLL" if result["metric"] == "log_px" else "-ELBO"
  ident = result["identity"]
  lines = [
    f"{name} per test image (nats), {ident['count']} images of "
    f"{ident['dataset']}/{ident['split']} (eval_binarize_seed="
    f"{ident['eval_binarize_seed']}, sha256 {str(ident['images_sha256'])[:12]}):"
  ]
  w = max(len(r["label"]) for r in result["runs"])
  for r in result["runs"]:
    lines.append(
      f"  {r['label']:<{w}}  {name} {r['mean']:.3f} +- {r['stderr']:.3f} (unpaired s.e.)"
    )
  lines.append(f"Pairs (diff = {name}(A) - {name}(B); negative: A better):")
  for p in result["pairs"]:
    lines.append(
      f"  {p['a']} vs {p['b']}: diff {p['mean_diff']:+.4f} +- {p['stderr']:.4f} (paired s.e.), "
      f"t = {p['t']:.2f}, p {format_p(p['p_value'])} (Holm {format_p(p['p_holm'])}); "
      f"A wins {100 * p['a_wins']:.1f}%, B wins {100 * p['b_wins']:.1f}%"
      + (f", ties {100 * p['ties']:.1f}%" if p["ties"] else "")
    )
  return "\n".join(lines)


def format_p(p: float, digits: int = 3) -> str:
  """``"= 0.0123"``, or ``"< 1e-300"`` where the p-value underflowed to 0 in float64.

  A paired difference of 40 standard errors over 10000 images has a p-value far
  below the smallest float64, which prints as a misleading ``p = 0``.
  """
  return "< 1e-300" if p == 0 else f"= {p:.{digits}g}"


def plot(result: dict[str, Any], path: str) -> str:
  """PNG of the per-image differences of every pair (histogram and sorted curve).

  Returns:
    ``path``.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  name = "NLL" if result["metric"] == "log_px" else "-ELBO"
  pairs = result["pairs"]
  losses = result["_losses"]
  fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 3.2 * len(pairs)), squeeze=False)
  for row, p in zip(axes, pairs):
    d = losses[p["i"]] - losses[p["j"]]
    row[0].hist(d, bins=min(100, max(10, d.shape[0] // 20)), color="tab:blue", alpha=0.8)
    row[0].axvline(0.0, color="k", lw=0.8)
    row[0].axvline(
      p["mean_diff"],
      color="tab:red",
      lw=1.5,
      label=f"mean {p['mean_diff']:+.3f} +- {p['stderr']:.3f}",
    )
    row[0].set_xlabel(f"{name}({p['a']}) - {name}({p['b']}) per image")
    row[0].set_ylabel("images")
    row[0].legend(fontsize=8)
    row[1].plot(np.sort(d), lw=1.2)
    row[1].axhline(0.0, color="k", lw=0.8)
    row[1].set_xlabel("images, sorted by difference")
    row[1].set_ylabel("difference (nats)")
    row[1].set_title(
      f"{p['a']} wins {100 * p['a_wins']:.1f}%  p {format_p(p['p_value'], 2)}", fontsize=9
    )
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
