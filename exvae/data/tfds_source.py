"""Loading MNIST / Fashion-MNIST through ``tfds.data_source`` (no TensorFlow).

``tensorflow-datasets`` installs without TensorFlow; its random-access
``tfds.data_source`` (array_record files) then still works. This module never
downloads: it reads a data set already prepared in a tfds ``data_dir``. Note
that tfds stores examples in its own (shuffled) order, so "the first 50000
training images" differ from the IDX files' first 50000.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import numpy as np

from exvae.errors import DataNotFoundError

__all__ = [
  "TFDS_NAMES",
  "default_tfds_data_dir",
  "tfds_prepared_dir",
  "load_tfds",
  "how_to_prepare",
  "open_data_source",
  "read_batches",
]

TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist"}
_BATCH = 2048


def default_tfds_data_dir() -> str:
  """The directory tfds uses when ``data_dir`` is None.

  Returns:
    ``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``.
  """
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def tfds_prepared_dir(name: str, data_dir: str | None) -> str | None:
  """Checks (from the file system only, no import, no download) whether tfds
  has prepared ``name`` in ``data_dir``.

  Args:
    name: exvae data set name ('mnist' or 'fashion_mnist').
    data_dir: tfds data directory, or None for the tfds default.

  Returns:
    The prepared version directory (``<data_dir>/<name>/<version>``), or None.
  """
  root = os.path.expanduser(data_dir) if data_dir is not None else default_tfds_data_dir()
  hits = sorted(glob.glob(os.path.join(root, TFDS_NAMES[name], "*", "dataset_info.json")))
  return os.path.dirname(hits[-1]) if hits else None


def how_to_prepare(name: str, data_dir: str | None) -> str:
  """Instructions to prepare ``name`` with tfds on a machine with internet.

  Args:
    name: exvae data set name.
    data_dir: target tfds directory (None: the tfds default).

  Returns:
    A human-readable, multi-line instruction string.
  """
  d = data_dir if data_dir is not None else "~/tensorflow_datasets"
  t = TFDS_NAMES[name]
  return (
    f"  tfds build {t} --data_dir {d} --file_format array_record\n"
    f"  or in Python: tfds.data_source('{t}', data_dir='{d}', download=True,\n"
    f"                                  builder_kwargs={{'file_format': 'array_record'}})\n"
    f"  then copy {d}/{t} to this machine if it has no internet access"
  )


def read_batches(ds: Any, n: int) -> Iterator[tuple[int, list[Any]]]:
  """The first ``n`` examples of a tfds data source, in batches of ``_BATCH``.

  Args:
    ds: a tfds data source (``tfds.data_source(...)[split]``).
    n: how many examples to read from the start.

  Yields:
    (start, examples): the index of the batch's first example and its examples (dicts).
  """
  batched = hasattr(ds, "__getitems__")
  for start in range(0, n, _BATCH):
    keys = list(range(start, min(n, start + _BATCH)))
    exs = None
    if batched:
      try:
        exs = ds.__getitems__(keys)  # one batched read of the array_record file
      except TypeError:  # e.g. tfds.testing.mock_data's data sources
        batched = False
    if exs is None:
      exs = [ds[i] for i in keys]
    yield start, exs


def _to_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole tfds data source into (images uint8 (N,H,W,C), labels int32)."""
  n = len(ds)
  images: np.ndarray | None = None
  labels = np.empty((n,), np.int32)
  for start, exs in read_batches(ds, n):
    imgs = np.stack([np.asarray(e["image"]) for e in exs])
    if images is None:
      images = np.empty((n,) + imgs.shape[1:], imgs.dtype)
    images[start : start + len(exs)] = imgs
    labels[start : start + len(exs)] = [int(e["label"]) for e in exs]
  if images is None:
    raise DataNotFoundError("tfds data source is empty")
  if images.ndim == 3:
    images = images[..., None]
  return images, labels


def open_data_source(
  tfds: Any, name: str, tfds_name: str, splits: list[str], data_dir: str | None, how: str
) -> list[Any]:
  """Opens prepared tfds splits without downloading, or says in one line that they are absent.

  Args:
    tfds: the imported ``tensorflow_datasets`` module.
    name: the exvae data set name, first word of the error.
    tfds_name: the tfds builder name.
    splits: split names to open.
    data_dir: tfds data directory (None: the tfds default).
    how: instructions appended below the error's first line.

  Returns:
    One data source per split, in order.

  Raises:
    DataNotFoundError: the data set is not prepared there. Its first line is short; the
      exception tfds raised and ``how`` follow on later lines.
  """
  import logging

  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  # tfds logs a warning per unprepared variant folder before failing: the error says it all.
  absl_logger.setLevel(logging.ERROR)
  try:
    return tfds.data_source(
      tfds_name,
      split=splits,
      data_dir=data_dir,
      download=False,
      # data_source only picks array_record itself when data_dir is None.
      builder_kwargs={"file_format": "array_record"},
    )
  except Exception as e:  # tfds raises assorted types when data is absent
    shown = data_dir if data_dir is not None else default_tfds_data_dir()
    raise DataNotFoundError(
      f"{name}: data not found: tfds data set '{tfds_name}' is not prepared in "
      f"data_dir={shown}.\n"
      f"(tfds: {type(e).__name__}: {str(e)[:300]})\n{how}"
    ) from e
  finally:
    absl_logger.setLevel(level)


def load_tfds(
  name: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
  """Reads the official train and test splits with ``tfds.data_source``.

  Args:
    name: 'mnist' or 'fashion_mnist'.
    data_dir: tfds data directory (None: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    (train_images, train_labels, test_images, test_labels, source): images
    uint8 (N, 28, 28, 1), labels int32, and a description like
    ``'tfds:mnist@/path'``.

  Raises:
    ImportError: tensorflow-datasets is not installed.
    DataNotFoundError: the data set is not prepared in ``data_dir``.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "source='tfds' needs tensorflow-datasets (pip install tensorflow-datasets; "
      "TensorFlow itself is not needed)"
    ) from e
  t = TFDS_NAMES[name]
  srcs = open_data_source(
    tfds,
    name,
    t,
    ["train", "test"],
    data_dir,
    f"Prepare it (array_record format) on a machine with internet:\n"
    f"{how_to_prepare(name, data_dir)}\n"
    "and pass its directory with --config.data_dir=...",
  )
  xtr, ytr = _to_arrays(srcs[0])
  xte, yte = _to_arrays(srcs[1])
  shown = data_dir if data_dir is not None else default_tfds_data_dir()
  return xtr, ytr, xte, yte, f"tfds:{t}@{shown}"
