"""Plots: a 2-D t-SNE embedding of latent codes and the training curves.

* :func:`plot_embedding`: ``sklearn.manifold.TSNE`` on a random subsample of
  the bank's codes, one colour per label -> PNG.
* :func:`plot_training_curves`: ``<workdir>/metrics.jsonl`` (train ``loss``
  per logged step, ``val_loss`` per epoch) -> PNG.

matplotlib runs with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from exvae import atomic


def _plt():
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def _atomic_savefig(fig, path: str, dpi: int = 120) -> str:
  return atomic.write_with(
    path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
  )


def tsne_embedding(
  codes: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  num_points: int = 5000,
  seed: int = 0,
  perplexity: float = 30.0,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """t-SNE of a random subsample of codes.

  Args:
    codes: (N, d) latent codes.
    labels: (N,) labels or None.
    num_points: subsample size (all codes if N is smaller).
    seed: subsample and t-SNE seed.
    perplexity: t-SNE perplexity (lowered automatically for tiny subsamples).

  Returns:
    ``(embedding (M, 2), labels (M,) or None, rows (M,))`` with M = min(N, num_points).
  """
  from sklearn.manifold import TSNE

  n = codes.shape[0]
  if n < 3:
    raise ValueError(f"t-SNE needs at least 3 codes, got {n}")
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(n, size=min(n, int(num_points)), replace=False))
  m = rows.shape[0]
  perp = float(min(perplexity, max(1.0, (m - 1) / 3.0)))
  emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(
    np.asarray(codes[rows], np.float64)
  )
  return emb.astype(np.float32), (None if labels is None else np.asarray(labels)[rows]), rows


def plot_embedding(
  path: str,
  embedding: np.ndarray,
  labels: np.ndarray | None = None,
  title: str = "t-SNE of encoder means",
) -> str:
  """Scatter plot of a 2-D embedding coloured by label.

  Args:
    path: PNG path.
    embedding: (M, 2).
    labels: (M,) int labels or None (one colour).
    title: plot title.

  Returns:
    ``path``.
  """
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 6))
  if labels is None:
    ax.scatter(embedding[:, 0], embedding[:, 1], s=3, alpha=0.7)
  else:
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20")
    for i, c in enumerate(classes):
      sel = labels == c
      ax.scatter(
        embedding[sel, 0], embedding[sel, 1], s=3, alpha=0.7, color=cmap(i % cmap.N), label=str(c)
      )
    ax.legend(markerscale=4, fontsize=8, loc="best", ncol=2)
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])
  try:
    return _atomic_savefig(fig, path)
  finally:
    plt.close(fig)


def read_loss_curves(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Parses metrics.jsonl into (train records with 'loss', validation records with 'val_loss').

  Unparseable lines (e.g. a line torn by a kill) are skipped
  (:func:`exvae.rundir.read_metrics` returns every record and counts those lines).
  """
  train, val = [], []
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(r, dict) or "summary" in r:
        continue
      if "val_loss" in r:
        val.append(r)
      elif "loss" in r and "step" in r:
        train.append(r)
  return train, val


def plot_training_curves(workdir_or_metrics: str, path: str) -> str:
  """Training loss per logged step and validation loss per epoch -> PNG.

  Args:
    workdir_or_metrics: a training workdir (reads ``metrics.jsonl`` in it) or
      the metrics file itself.
    path: PNG path.

  Returns:
    ``path``.

  Raises:
    FileNotFoundError: no metrics file.
    ValueError: the file holds no training or validation records.
  """
  mpath = workdir_or_metrics
  if os.path.isdir(mpath):
    mpath = os.path.join(mpath, "metrics.jsonl")
  if not os.path.exists(mpath):
    raise FileNotFoundError(f"No metrics file {mpath}: train first (train.py writes it).")
  train, val = read_loss_curves(mpath)
  if not train and not val:
    raise ValueError(f"{mpath} holds no training or validation records")
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("training loss (-ELBO with KL warm-up, nats)")
  axes[0].set_title("training loss")
  if val:
    axes[1].plot([r["epoch"] for r in val], [r["val_loss"] for r in val], marker="o", ms=3)
  axes[1].set_xlabel("epoch")
  axes[1].set_ylabel("validation loss (-ELBO, nats)")
  axes[1].set_title("validation loss")
  for ax in axes:
    ax.grid(alpha=0.3)
  try:
    return _atomic_savefig(fig, path)
  finally:
    plt.close(fig)
