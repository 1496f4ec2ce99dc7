"""CelebA through ``tfds.data_source('celeb_a')`` (no TensorFlow), as continuous 8-bit colour images.

Every 218x178 image is centre-cropped to ``crop`` x ``crop`` pixels (140 by
default, the face region) and resized to ``image_size`` x ``image_size`` (64)
with Pillow's Lanczos filter, then stored as grey levels k / 255 in [0, 1]
(exactly the grid of the discretised logistic likelihood).  Nothing is
binarised (``Splits.binary = False``).  The official tfds splits are used:
train (162770), validation (19867), test (19962).

This module never downloads: it reads a data set already prepared (in
array_record format) in a tfds ``data_dir`` and raises
:class:`~exvae.errors.DataNotFoundError` with instructions otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exvae.data.core import Splits, validate_images
from exvae.data.tfds_source import open_data_source, read_batches

__all__ = ["CELEBA_TFDS_NAME", "center_crop_resize", "load_celeba"]

CELEBA_TFDS_NAME = "celeb_a"


def center_crop_resize(image: np.ndarray, crop: int, size: int) -> np.ndarray:
  """Centre-crops an (H, W, 3) uint8 image to (crop, crop) and resizes it to (size, size).

  Args:
    image: (H, W, C) uint8 with H, W >= crop.
    crop: side of the centre crop.
    size: output side.

  Returns:
    (size, size, C) uint8.
  """
  from PIL import Image

  h, w = image.shape[:2]
  if h < crop or w < crop:
    raise ValueError(f"image of shape {image.shape} is smaller than the {crop}x{crop} crop")
  top, left = (h - crop) // 2, (w - crop) // 2
  patch = np.ascontiguousarray(image[top : top + crop, left : left + crop])
  if crop == size:
    return patch
  return np.asarray(Image.fromarray(patch).resize((size, size), Image.LANCZOS), np.uint8)


def _read(ds: Any, limit: int | None, crop: int, size: int) -> np.ndarray:
  """First ``limit`` images of a tfds data source, cropped and resized: (N, size, size, 3) uint8."""
  n = len(ds) if limit is None else min(len(ds), int(limit))
  out = np.empty((n, size, size, 3), np.uint8)
  for start, exs in read_batches(ds, n):
    for j, e in enumerate(exs):
      out[start + j] = center_crop_resize(np.asarray(e["image"]), crop, size)
  return out


def load_celeba(
  data_dir: str | None = None,
  *,
  image_size: int = 64,
  crop: int = 140,
  max_train: int | None = None,
  max_test: int | None = None,
) -> Splits:
  """Loads CelebA as continuous colour images (official train / validation / test splits).

  Args:
    data_dir: tfds data directory holding a prepared ``celeb_a`` (None:
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    image_size: output side (64).
    crop: side of the centre crop taken before resizing (140).
    max_train: keep only the first ``max_train`` training images.
    max_test: keep only the first ``max_test`` validation and test images.

  Returns:
    :class:`Splits` named 'celeba' with float32 (N, image_size, image_size, 3)
    images in [0, 1] on the 1/255 grid, ``binary=False``, no labels.

  Raises:
    ImportError: tensorflow-datasets is missing.
    DataNotFoundError: ``celeb_a`` is not prepared in ``data_dir``.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "CelebA needs tensorflow-datasets (pip install tensorflow-datasets; "
      "TensorFlow itself is not needed)"
    ) from e
  srcs = open_data_source(
    tfds,
    "celeba",
    CELEBA_TFDS_NAME,
    ["train", "validation", "test"],
    data_dir,
    "Prepare it on a machine with internet (the image files come from Google Drive; see the "
    "tfds catalogue page):\n"
    f"  tfds build {CELEBA_TFDS_NAME} --data_dir {data_dir or '~/tensorflow_datasets'} "
    "--file_format array_record\n"
    "then copy the directory here and pass it with --config.data_dir=...",
  )
  train = _read(srcs[0], max_train, crop, image_size)
  val = _read(srcs[1], max_test, crop, image_size)
  test = _read(srcs[2], max_test, crop, image_size)
  as_float = lambda a: np.ascontiguousarray(a.astype(np.float32) / np.float32(255.0))  # noqa: E731
  train_x, val_x, test_x = as_float(train), as_float(val), as_float(test)
  validate_images(train_x, name="celeba train_x")
  validate_images(val_x, image_shape=train_x.shape[1:], name="celeba val_x")
  validate_images(test_x, image_shape=train_x.shape[1:], name="celeba test_x")
  shown = data_dir if data_dir is not None else "default tfds data_dir"
  return Splits(
    name="celeba",
    train_x=train_x,
    train_y=None,
    val_x=val_x,
    val_y=None,
    test_x=test_x,
    test_y=None,
    binary=False,
    source=f"tfds:{CELEBA_TFDS_NAME}@{shown} (centre crop {crop}, {image_size}x{image_size})",
  )
