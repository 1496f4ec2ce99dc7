"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

IDX layout (big-endian): two zero bytes, one type code byte, one byte with the
number of dimensions ``d``, then ``d`` uint32 sizes, then the data in C order.
Files may be gzip-compressed (detected from the gzip magic bytes, not from the
file name).
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from typing import Sequence

import numpy as np

from exvae.errors import DataNotFoundError

__all__ = [
  "IdxFormatError",
  "IDX_FILES",
  "read_idx",
  "find_idx_dir",
  "idx_candidate_dirs",
  "load_idx_dataset",
]

_IDX_DTYPES = {
  0x08: np.dtype(">u1"),
  0x09: np.dtype(">i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

# Canonical file names, in the order (train images, train labels, test images,
# test labels). Both '<name>' and '<name>.gz' are accepted.
IDX_FILES: tuple[str, str, str, str] = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
# Other spellings seen in the wild (e.g. the Kaggle MNIST copy).
_ALT_SPELLINGS = {
  "train-images-idx3-ubyte": ("train-images.idx3-ubyte",),
  "train-labels-idx1-ubyte": ("train-labels.idx1-ubyte",),
  "t10k-images-idx3-ubyte": ("t10k-images.idx3-ubyte",),
  "t10k-labels-idx1-ubyte": ("t10k-labels.idx1-ubyte",),
}

# First ten labels of the genuine training / test sets, used only to warn when
# the files found look like a different data set (e.g. MNIST files in a
# directory given for Fashion-MNIST, which use the very same file names).
_FINGERPRINTS = {
  "mnist": ([5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
  "fashion_mnist": ([9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
}

_SUBDIRS = {
  "mnist": ("mnist", "MNIST/raw", "MNIST", "mnist/raw"),
  "fashion_mnist": (
    "fashion-mnist",
    "fashion_mnist",
    "FashionMNIST/raw",
    "FashionMNIST",
    "fashion-mnist/raw",
  ),
}


class IdxFormatError(ValueError):
  """An IDX file is corrupt, truncated or not an IDX file."""


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    head = f.read(2)
  if head == b"\x1f\x8b":
    try:
      with gzip.open(path, "rb") as f:
        return f.read()
    except (EOFError, OSError, zlib.error) as e:
      raise IdxFormatError(
        f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e}); "
        "re-download it or delete it"
      ) from e
  with open(path, "rb") as f:
    return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (raw or gzip-compressed) into a numpy array.

  Args:
    path: path of the file.

  Returns:
    Array with the file's shape, in native byte order (uint8 for the
    MNIST-style image and label files).

  Raises:
    FileNotFoundError: the file does not exist.
    IdxFormatError: bad magic number, unknown type code, truncated data or
      trailing garbage.
  """
  path = os.fspath(path)
  buf = _read_bytes(path)
  if len(buf) < 4:
    raise IdxFormatError(f"{path}: file too short ({len(buf)} bytes) for an IDX header")
  if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
    raise IdxFormatError(
      f"{path}: not an IDX file: bad magic number 0x{buf[:4].hex()} "
      f"(expected 0x0000TTDD with type code TT in "
      f"{sorted(hex(k) for k in _IDX_DTYPES)}, e.g. 0x00000803 for images)"
    )
  dtype = _IDX_DTYPES[buf[2]]
  ndim = buf[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(buf) < header:
    raise IdxFormatError(f"{path}: truncated or invalid IDX header (ndim={ndim}, {len(buf)} bytes)")
  shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  actual = len(buf) - header
  if actual < expected:
    raise IdxFormatError(
      f"{path}: truncated IDX file: header says shape {shape} "
      f"({expected} data bytes) but only {actual} bytes follow the header"
    )
  if actual > expected:
    raise IdxFormatError(
      f"{path}: corrupt IDX file: header says shape {shape} ({expected} data "
      f"bytes) but {actual} bytes follow the header"
    )
  arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=header)
  return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find_file(directory: str, base: str) -> str | None:
  for stem in (base,) + _ALT_SPELLINGS.get(base, ()):
    for fname in (stem + ".gz", stem):
      p = os.path.join(directory, fname)
      if os.path.isfile(p):
        return p
  return None


def idx_candidate_dirs(name: str, data_dir: str) -> list[str]:
  """Directories searched for the IDX files of ``name`` under ``data_dir``.

  Args:
    name: 'mnist' or 'fashion_mnist'.
    data_dir: root directory given by the user.

  Returns:
    ``data_dir`` itself followed by conventional sub-directories
    (e.g. ``mnist``, ``MNIST/raw`` as written by torchvision).
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  return [data_dir] + [os.path.join(data_dir, s) for s in _SUBDIRS.get(name, ())]


def find_idx_dir(name: str, data_dir: str) -> tuple[str, list[str]] | None:
  """Finds a directory holding all four IDX files.

  Args:
    name: 'mnist' or 'fashion_mnist'.
    data_dir: root directory to search (see :func:`idx_candidate_dirs`).

  Returns:
    (directory, [train images, train labels, test images, test labels] paths),
    or None when no candidate directory holds all four files.
  """
  for d in idx_candidate_dirs(name, data_dir):
    if not os.path.isdir(d):
      continue
    paths = [_find_file(d, base) for base in IDX_FILES]
    if all(p is not None for p in paths):
      return d, paths  # type: ignore[return-value]
  return None


def _check_images_labels(images: np.ndarray, labels: np.ndarray, what: str) -> None:
  if images.ndim != 3 or images.dtype != np.uint8:
    raise IdxFormatError(
      f"{what}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
    )
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise IdxFormatError(f"{what}: {images.shape[0]} images but labels have shape {labels.shape}")


def load_idx_dataset(
  name: str, directory: str, paths: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads the official train and test sets from IDX files.

  Args:
    name: 'mnist' or 'fashion_mnist' (only used for messages and a
      sanity-check warning when the files do not look like that data set).
    directory: directory with the four files.
    paths: explicit file paths (as returned by :func:`find_idx_dir`);
      looked up in ``directory`` when None.

  Returns:
    (train_images, train_labels, test_images, test_labels): images uint8
    (N, H, W), labels int32 (N,), in the files' order.

  Raises:
    DataNotFoundError: a file is missing.
    IdxFormatError: a file is corrupt or the files are inconsistent.
  """
  if paths is None:
    found = [_find_file(directory, base) for base in IDX_FILES]
    missing = [b for b, p in zip(IDX_FILES, found) if p is None]
    if missing:
      raise DataNotFoundError(f"{name}: missing IDX file(s) {missing} (raw or .gz) in {directory}")
    paths = found  # type: ignore[assignment]
  xtr, ytr, xte, yte = (read_idx(p) for p in paths)
  _check_images_labels(xtr, ytr, f"{name} training files in {directory}")
  _check_images_labels(xte, yte, f"{name} test files in {directory}")
  if xtr.shape[1:] != xte.shape[1:]:
    raise IdxFormatError(
      f"{name}: train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in size"
    )
  fp = _FINGERPRINTS.get(name)
  if fp is not None and (list(ytr[:10]) != fp[0] or list(yte[:10]) != fp[1]):
    warnings.warn(
      f"IDX files in {directory} do not look like the genuine {name} files "
      f"(first training labels {list(ytr[:10])}, expected {fp[0]}); check that "
      "data_dir points at the intended data set.",
      stacklevel=3,
    )
  return xtr, ytr.astype(np.int32), xte, yte.astype(np.int32)
