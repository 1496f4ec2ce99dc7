"""Reader for the 28x28 Omniglot ``chardata.mat`` (IWAE / VampPrior version).

The file (https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat)
holds ``data`` (784, 24345) training and ``testdata`` (784, 8070) test images,
one image per column, each column a 28x28 image in Fortran (column-major)
order, grey levels in [0, 1]. ``target`` (50, N) one-hot alphabet labels are
used as labels when present.
"""

from __future__ import annotations

import os

import numpy as np

from exvae.errors import DataNotFoundError

__all__ = ["OMNIGLOT_FILE", "OMNIGLOT_URL", "find_omniglot", "read_chardata"]

OMNIGLOT_FILE = "chardata.mat"
OMNIGLOT_URL = "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat"
_SUBDIRS = ("", "omniglot", "OMNIGLOT", "Omniglot")


def find_omniglot(data_dir: str | None) -> str:
  """Locates ``chardata.mat``.

  Args:
    data_dir: the file itself, or a directory holding it (directly or in an
      ``omniglot``/``OMNIGLOT`` sub-directory).

  Returns:
    Path of the file.

  Raises:
    DataNotFoundError: not found; the message says where to get it.
  """
  tried: list[str] = []
  if data_dir is not None:
    d = os.path.expanduser(os.fspath(data_dir))
    if os.path.isfile(d):
      return d
    for sub in _SUBDIRS:
      p = os.path.join(d, sub, OMNIGLOT_FILE) if sub else os.path.join(d, OMNIGLOT_FILE)
      tried.append(p)
      if os.path.isfile(p):
        return p
  where = ", ".join(tried) if tried else "(no data_dir given)"
  raise DataNotFoundError(
    f"omniglot: {OMNIGLOT_FILE} not found; looked for {where}.\n"
    f"Download the 28x28 Omniglot file used by the IWAE/VampPrior papers:\n"
    f"  wget {OMNIGLOT_URL}\n"
    f"put it in a directory and pass that directory as data_dir "
    f"(--config.data_dir=/path/to/dir)."
  )


def _images(cols: np.ndarray, key: str, path: str) -> np.ndarray:
  cols = np.asarray(cols)
  if cols.ndim != 2 or cols.shape[0] != 784:
    raise ValueError(
      f"{path}: '{key}' must be a (784, N) array of 28x28 images, got shape {cols.shape}"
    )
  # Column n is image n flattened in Fortran order: (784, N) -> (28, 28, N) with
  # order='F' gives img[r, c, n] = cols[r + 28 c, n].
  imgs = cols.reshape(28, 28, -1, order="F").transpose(2, 0, 1)
  return np.ascontiguousarray(imgs[..., None], dtype=np.float32)


def _labels(mat: dict, key: str, n: int) -> np.ndarray | None:
  t = mat.get(key)
  if t is None:
    return None
  t = np.asarray(t)
  if t.ndim == 2 and t.shape[1] == n:
    return np.argmax(t, axis=0).astype(np.int32)
  return None


def read_chardata(path: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
  """Reads ``chardata.mat``.

  Args:
    path: path of the .mat file.

  Returns:
    (train_images, train_labels, test_images, test_labels): images float32
    (N, 28, 28, 1) in [0, 1] in the file's order; labels int32 alphabet ids
    (from ``target`` / ``testtarget``) or None when absent.

  Raises:
    ValueError: the file lacks ``data``/``testdata`` or they are misshaped.
  """
  import scipy.io

  mat = scipy.io.loadmat(path)
  for key in ("data", "testdata"):
    if key not in mat:
      raise ValueError(
        f"{path}: missing key '{key}' (keys: {sorted(k for k in mat if not k.startswith('__'))}); "
        f"is this the IWAE Omniglot {OMNIGLOT_FILE}?"
      )
  xtr = _images(mat["data"], "data", path)
  xte = _images(mat["testdata"], "testdata", path)
  return xtr, _labels(mat, "target", len(xtr)), xte, _labels(mat, "testtarget", len(xte))
