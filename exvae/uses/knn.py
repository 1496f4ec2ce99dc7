"""k-nearest-neighbour classification on encoder means (unsupervised latents).

The paper's test of how well latents cluster classes: encode every image to
its encoder mean mu(x), classify a query by majority vote among its k
nearest reference codes (Euclidean distance), for k in 3, 5, ..., 15.

The neighbours come from the streamed retrieval kernel
:func:`exvae.kernels.topk_neighbors`, called ONCE with the largest k; the
votes for every smaller k reuse the first k columns of that sorted list.

Vote rule (ties): the class with the most votes among the k neighbours; if
several classes tie on votes, the lowest label (``tie_break="lowest_label"``,
the default: the authors' ``knn_on_latent.py`` takes the argmax of the vote
counts) or the one whose voting neighbours have the smallest summed Euclidean
distance to the query, then the lowest label (``tie_break="distance"``).

Query images: grey levels by default (``query_images="grey"``), as the
authors' ``analysis.py --KNN`` loads every split with ``no_binarization=True``;
``"binarised"`` uses the loader's fixed binarisation of validation and test.
The reference codes are the bank's (training images encoded as grey levels).

Settings: validation (queries = validation split, reference = training
split) and test (queries = test split, reference = training + validation).
Only the encoder is used, so any trained model works (Gaussian, VampPrior or
exemplar prior).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exvae import kernels
from exvae.data import DataFormatError
from exvae.uses import classifier

DEFAULT_KS: tuple[int, ...] = (3, 5, 7, 9, 11, 13, 15)
TIE_BREAKS = ("lowest_label", "distance")
QUERY_IMAGES = ("grey", "binarised")


def neighbors(
  queries: np.ndarray,
  reference: np.ndarray,
  k: int,
  *,
  batch_size: int = 1024,
  progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest reference rows of every query (squared L2), in query batches.

  Args:
    queries: (Q, d) codes.
    reference: (N, d) codes.
    k: neighbours (<= N).
    batch_size: queries per kernel call (the last batch is padded).
    progress: show a tqdm bar.

  Returns:
    ``(sq_dists (Q, k) float32 ascending, idx (Q, k) int32)``.
  """
  q = queries.shape[0]
  if k > reference.shape[0]:
    raise ValueError(f"k={k} exceeds the {reference.shape[0]} reference codes")
  ref = jnp.asarray(reference, jnp.float32)
  bs = max(1, min(batch_size, q))
  dists = np.zeros((q, k), np.float32)
  idx = np.zeros((q, k), np.int32)
  starts = range(0, q, bs)
  if progress:
    from tqdm.auto import tqdm

    starts = tqdm(starts, desc="knn", unit="batch", dynamic_ncols=True)
  for lo in starts:
    hi = min(lo + bs, q)
    zb = np.zeros((bs, queries.shape[1]), np.float32)
    zb[: hi - lo] = queries[lo:hi]
    d, i = jax.device_get(kernels.topk_neighbors(jnp.asarray(zb), ref, int(k)))
    dists[lo:hi], idx[lo:hi] = d[: hi - lo], i[: hi - lo]
  return dists, idx


def vote(
  neighbor_labels: np.ndarray,
  neighbor_dists: np.ndarray,
  num_classes: int,
  tie_break: str = "lowest_label",
) -> np.ndarray:
  """Majority vote with the documented tie-breaking.

  Args:
    neighbor_labels: (Q, k) int labels of the neighbours.
    neighbor_dists: (Q, k) Euclidean (not squared) distances.
    num_classes: C (labels in [0, C)).
    tie_break: one of :data:`TIE_BREAKS`.

  Returns:
    (Q,) int32 predicted labels: most votes, then (``"distance"``) smallest
    summed distance of the voters, then lowest label.
  """
  if tie_break not in TIE_BREAKS:
    raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
  q, k = neighbor_labels.shape
  onehot = np.zeros((q, k, num_classes), np.float64)
  onehot[np.arange(q)[:, None], np.arange(k)[None, :], neighbor_labels] = 1.0
  counts = onehot.sum(1)  # (Q, C)
  dsum = (onehot * neighbor_dists[:, :, None].astype(np.float64)).sum(1)  # (Q, C)
  top = counts == counts.max(1, keepdims=True)
  if tie_break == "lowest_label":
    return np.argmax(top, axis=1).astype(np.int32)  # first (lowest) label with most votes
  # argmin returns the first (lowest) label among equal summed distances.
  return np.argmin(np.where(top, dsum, np.inf), axis=1).astype(np.int32)


def knn_predict(
  queries: np.ndarray,
  reference: np.ndarray,
  reference_labels: np.ndarray,
  ks: Sequence[int] = DEFAULT_KS,
  *,
  batch_size: int = 1024,
  tie_break: str = "lowest_label",
  progress: bool = False,
) -> dict[int, np.ndarray]:
  """kNN predictions for several k from one top-k retrieval with max(ks).

  Args:
    queries: (Q, d) codes.
    reference: (N, d) codes.
    reference_labels: (N,) int labels.
    ks: the k values (each <= N).
    batch_size: queries per kernel call.
    tie_break: one of :data:`TIE_BREAKS`.
    progress: show a progress bar.

  Returns:
    ``{k: (Q,) int32 predictions}``.
  """
  ks = sorted({int(k) for k in ks})
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be positive integers, got {ks}")
  reference_labels = np.asarray(reference_labels, np.int64)
  kmax = ks[-1]
  sq, idx = neighbors(
    np.asarray(queries, np.float32),
    np.asarray(reference, np.float32),
    kmax,
    batch_size=batch_size,
    progress=progress,
  )
  if (idx < 0).any():
    raise ValueError("fewer reference codes than neighbours requested")
  labels = reference_labels[idx]
  dist = np.sqrt(np.maximum(sq, 0.0))
  c = int(reference_labels.max()) + 1
  return {k: vote(labels[:, :k], dist[:, :k], c, tie_break) for k in ks}


def error_rates(predictions: dict[int, np.ndarray], labels: np.ndarray) -> dict[int, float]:
  """``{k: fraction of predictions[k] != labels}``."""
  y = np.asarray(labels)
  return {k: float(np.mean(p != y)) for k, p in predictions.items()}


def evaluate_knn(
  trained: Any,
  bank: Any = None,
  ks: Sequence[int] = DEFAULT_KS,
  *,
  batch_size: int = 2048,
  query_images: str = "grey",
  tie_break: str = "lowest_label",
  progress: bool = False,
) -> dict[str, Any]:
  """kNN error rates of a trained run in the validation and test settings.

  Args:
    trained: a :class:`exvae.bank.Trained`.
    bank: the training bank (built from ``trained`` if None).
    ks: the k values.
    batch_size: images per encoder call / queries per kernel call.
    query_images: validation/test images as grey levels or binarised, one of
      :data:`QUERY_IMAGES`.
    tie_break: one of :data:`TIE_BREAKS`.
    progress: show progress bars.

  Returns:
    ``{'val': {k: err}, 'test': {k: err}, 'num_train', 'num_val', 'num_test', 'ks',
    'tie_break', 'query_images', 'test_predictions': {k: (num_test,) int32},
    'test_labels': (num_test,) int32, 'val_predictions': {k: (num_val,) int32},
    'val_labels': (num_val,) int32, 'test_on_train': {k: err},
    'test_on_train_predictions', 'test_on_train_labels'}``: the test images
    against the training references alone. The ``*_predictions`` and
    ``*_labels`` entries are arrays (for :func:`save_per_example`), the rest is
    JSON.

  Raises:
    DataFormatError: the data set has no labels (a ValueError).
  """
  from exvae import bank as bank_lib

  s = trained.splits
  _require_labels(s)
  if bank is None:
    bank = bank_lib.from_checkpoint(
      trained.config, "", trained=trained, batch_size=batch_size, progress=progress
    )
  model, mp = trained.setup.model, trained.params["model"]
  val_x, test_x, query_images = _queries(trained, query_images)
  key = jax.random.PRNGKey(0)  # queries are encoded as given: no binarisation here

  def enc(x):
    return bank_lib.encode_images(
      model, mp, x, np.arange(x.shape[0]), key, binary=False, batch_size=batch_size
    )

  val_codes, test_codes = enc(val_x), enc(test_x)
  predict = functools.partial(
    knn_predict, ks=ks, batch_size=batch_size, tie_break=tie_break, progress=progress
  )
  runs = _predict_settings(predict, bank, val_codes, test_codes, s)
  out = {
    "num_train": int(bank.codes.shape[0]),
    "num_val": int(val_codes.shape[0]),
    "num_test": int(test_codes.shape[0]),
    "ks": [int(k) for k in sorted(set(ks))],
    "tie_break": tie_break,
    "query_images": query_images,
  }
  for _, split in SETTINGS:
    preds, y = runs[split]
    out[split] = {str(k): v for k, v in error_rates(preds, y).items()}
    out[f"{split}_predictions"] = {int(k): p for k, p in preds.items()}
    out[f"{split}_labels"] = y.astype(np.int32)
  return out


def _predict_settings(
  predict: Any, bank: Any, val_codes: np.ndarray, test_codes: np.ndarray, s: Any
) -> dict[str, tuple[dict[int, np.ndarray], np.ndarray]]:
  """The kNN predictions of :func:`evaluate_knn`'s three settings (see :data:`SETTINGS`).

  Args:
    predict: :func:`knn_predict` with ``ks`` and its keyword settings bound.
    bank: the training bank: the codes and labels of the training references.
    val_codes: the encoded validation images.
    test_codes: the encoded test images.
    s: the run's data splits (the validation and test labels).

  Returns:
    ``{setting: (predictions, labels)}``: ``val`` against the training references,
    ``test`` against the training and validation ones, ``test_on_train`` the test
    images against the training references alone.
  """
  train_codes, train_y = bank.codes, bank.labels
  val_preds = predict(val_codes, train_codes, train_y)
  ref = np.concatenate([train_codes, val_codes])
  ref_y = np.concatenate([train_y, s.val_y])
  test_preds = predict(test_codes, ref, ref_y)
  # The test queries against the validation setting's references too: with the
  # references fixed, the two settings differ only in their query images.
  tot_preds = predict(test_codes, train_codes, train_y)
  test_y = np.asarray(s.test_y)
  return {
    "test": (test_preds, test_y),
    "val": (val_preds, np.asarray(s.val_y)),
    "test_on_train": (tot_preds, test_y),
  }


def _require_labels(s) -> None:
  """Checks that the splits ``s`` have labels for all three parts.

  Raises:
    DataFormatError: a part has no labels (the message says which).
  """
  if s.train_y is None or s.val_y is None or s.test_y is None:
    missing = [
      k for k, y in (("y_train", s.train_y), ("y_val", s.val_y), ("y_test", s.test_y)) if y is None
    ]
    raise DataFormatError(
      f"kNN classification needs labels; data set {s.name!r} has none for "
      f"{', '.join(missing)} (an .npz or a plug-in gives them as y_train, "
      "y_val and y_test; without x_val the validation labels come from "
      "y_train)"
    )


def _queries(trained: Any, query_images: str) -> tuple[np.ndarray, np.ndarray, str]:
  """The validation and test query images of :func:`evaluate_knn`.

  Args:
    trained: a :class:`exvae.bank.Trained`.
    query_images: one of :data:`QUERY_IMAGES`.

  Returns:
    ``(val_x, test_x, query_images)``, the last as the record reports it ('grey', or why
    binarised images are used instead).

  Raises:
    ValueError: an unknown ``query_images``.
  """
  if query_images not in QUERY_IMAGES:
    raise ValueError(f"query_images must be one of {QUERY_IMAGES}, got {query_images!r}")
  s = trained.splits
  if query_images != "grey":
    return s.val_x, s.test_x, query_images
  g = classifier.grey_splits(trained.config, s)
  return (
    g.val_x,
    g.test_x,
    "grey" if g.grey_eval else "binarised (no grey reader for this data set)",
  )


PER_EXAMPLE = "knn_per_example.npz"
# (array prefix in PER_EXAMPLE, key in evaluate_knn's result) of each setting.
SETTINGS = (("", "test"), ("val_", "val"), ("test_on_train_", "test_on_train"))


def per_example_arrays(result: dict[str, Any]) -> dict[str, np.ndarray]:
  """The arrays of ``knn_per_example.npz`` from the result of :func:`evaluate_knn`.

  In the test setting ``labels`` (num_test,) and ``pred_k<k>`` (num_test,) int32 for
  each k, in the validation setting ``val_labels`` and ``val_pred_k<k>`` (num_val,),
  so that two models scored on the same images can be compared image by image
  (paired), not only by their error rates. The ``test_on_train_`` arrays hold the
  test images classified against the training references alone (the validation
  setting's references).
  """
  arrays = {}
  for prefix, split in SETTINGS:
    arrays[f"{prefix}labels"] = np.asarray(result[f"{split}_labels"], np.int32)
    arrays.update(
      {
        f"{prefix}pred_k{k}": np.asarray(p, np.int32)
        for k, p in sorted(result[f"{split}_predictions"].items())
      }
    )
  return arrays


def save_per_example(path: str, result: dict[str, Any]) -> str:
  """Writes :func:`per_example_arrays` of ``result`` to ``path`` (atomically).

  Returns:
    The file's SHA-256.
  """
  from exvae import atomic  # pylint: disable=import-outside-toplevel

  atomic.write_npz(path, per_example_arrays(result))
  return atomic.sha256_file(path)


def check_record(summary: dict[str, Any], arrays: dict[str, np.ndarray], where: str) -> None:
  """Raises ValueError unless the error rates of ``knn.json`` are those of its per-example file.

  Args:
    summary: ``knn.json`` (``test``, ``val``, ``test_on_train``: ``{k: error}``).
    arrays: its ``knn_per_example.npz``.
    where: the directory, for the message.
  """
  for prefix, split in SETTINGS:
    for k, err in (summary.get(split) or {}).items():
      pred, lab = arrays.get(f"{prefix}pred_k{k}"), arrays.get(f"{prefix}labels")
      if pred is None or lab is None:
        if prefix:  # files written before a setting was recorded lack it
          continue
        raise ValueError(f"{where}: {PER_EXAMPLE} lacks the k={k} predictions knn.json reports")
      got = float(np.mean(pred != lab))
      if not isinstance(err, (int, float)) or abs(float(err) - got) > 1e-9:
        raise ValueError(
          f"{where}: knn.json reports the {split} error {err} for k={k}, its "
          f"{PER_EXAMPLE} gives {got}: the two were not written together"
        )
