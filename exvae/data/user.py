"""A researcher's own data set: ``--config.dataset=npz:PATH`` or ``--config.dataset=MODULE:FUNCTION``.

* ``npz:PATH``: a NumPy archive (``np.savez`` / ``np.savez_compressed``, read
  without pickle) holding ``x_train`` and ``x_test``, optionally ``x_val`` and
  the labels ``y_train`` / ``y_val`` / ``y_test``.
* ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``): a function of the
  user's own code, imported as plug-in priors and models are
  (:mod:`exvae.plugins`), called without arguments, returning a dict with the
  same keys.

Images are (N, H, W) or (N, H, W, C) arrays of uint8 grey levels 0-255, bool,
or floats in [0, 1]; labels are (N,) non-negative integers.  Every array is
checked before anything trains, and a bad one stops the run with one line
(:class:`~exvae.errors.DataFormatError`) naming the file and the key.
Without ``x_val`` the last ``val_size`` training images validate (default:
the last tenth).  The data set's identity is the absolute path (or the
plug-in spec) and :func:`arrays_sha256` of its arrays as stored; runs record
it and check it on resume and evaluation (:mod:`exvae.rundir`).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from exvae import plugins
from exvae.errors import DataFormatError, DataNotFoundError

__all__ = [
  "NPZ_PREFIX",
  "IMAGE_KEYS",
  "LABEL_KEYS",
  "DEFAULT_VAL_FRACTION",
  "is_npz",
  "is_user_dataset",
  "npz_path",
  "check_dataset",
  "read_npz",
  "call_plugin",
  "check_arrays",
  "arrays_sha256",
  "read_user_dataset",
]

NPZ_PREFIX = "npz:"
IMAGE_KEYS = ("x_train", "x_val", "x_test")
LABEL_KEYS = ("y_train", "y_val", "y_test")
REQUIRED_KEYS = ("x_train", "x_test")
# Without x_val and val_size, the last tenth of the training images validate.
DEFAULT_VAL_FRACTION = 0.1
_KEYS_TEXT = "x_train, x_test; optional x_val, y_train, y_val, y_test"


def is_npz(name: str) -> bool:
  """Whether a ``config.dataset`` value names an ``.npz`` file (``npz:PATH``)."""
  return str(name).startswith(NPZ_PREFIX)


def is_user_dataset(name: str) -> bool:
  """Whether ``config.dataset`` names a user's data set: ``npz:PATH`` or a plug-in spec."""
  return is_npz(name) or plugins.is_spec(name)


def npz_path(name: str) -> str:
  """The absolute path of ``npz:PATH`` (relative paths from the current directory)."""
  path = str(name)[len(NPZ_PREFIX) :]
  if not path:
    raise DataFormatError(
      "--config.dataset=npz:PATH needs the path of an .npz file, e.g. "
      "--config.dataset=npz:my_data.npz"
    )
  return os.path.abspath(os.path.expanduser(path))


def check_npz_exists(path: str) -> None:
  """A missing file or a directory, in one line (before any work starts)."""
  if os.path.isdir(path):
    raise DataFormatError(f"{path}: is a directory, not an .npz file (--config.dataset=npz:PATH)")
  if not os.path.exists(path):
    raise DataNotFoundError(
      f"{path}: no such file (--config.dataset=npz:{path}); write it with "
      "np.savez(path, x_train=..., x_test=...)"
    )


def check_dataset(name: str) -> None:
  """A user's data set named by ``config.dataset``, checked before any work starts.

  ``npz:PATH``: the file exists.  ``MODULE:FUNCTION``: it imports and is
  callable (it is called, and its arrays checked, when the data is loaded).
  Any other name (a built-in data set) is not looked at here.

  Raises:
    DataNotFoundError, DataFormatError, plugins.PluginError, ValueError: in one line.
  """
  if is_npz(name):
    check_npz_exists(npz_path(name))
  elif plugins.is_spec(name):
    fn = plugins.load(name, "data set")
    if not callable(fn):
      raise plugins.PluginError(
        f"data set plug-in {name!r} is a {type(fn).__name__}, not a "
        "function returning a dict of arrays (x_train, x_test, ...)."
      )


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file, read without pickle.

  Raises:
    DataNotFoundError: no such file.
    DataFormatError: not an ``.npz`` archive, a corrupt one, or a key that is
      not a numeric array (names the file and the key).
  """
  check_npz_exists(path)
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(6)
    what = (
      "a single-array .npy file; save the splits with np.savez(path, x_train=..., x_test=...)"
      if head == b"\x93NUMPY"
      else "expected a zip archive written by np.savez or np.savez_compressed"
    )
    raise DataFormatError(f"{path}: not a NumPy .npz file ({what})")
  out: dict[str, np.ndarray] = {}
  key = None
  try:
    with np.load(path, allow_pickle=False) as f:
      for key in f.files:
        value = f[key]
        if not isinstance(value, np.ndarray):
          raise DataFormatError(
            f"{path}: key {key!r} is not a NumPy array (a stray file in the zip archive?)"
          )
        out[key] = value
  except DataFormatError:
    raise
  except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
    why = " ".join(str(e).split())
    if isinstance(e, ValueError) and "allow_pickle" in why:  # an object array
      raise DataFormatError(
        f"{path}: key {key!r} holds Python objects, not numbers; store a numeric array"
      ) from e
    raise DataFormatError(
      f"{path}: corrupt .npz file at key {key!r} ({type(e).__name__}: {why})"
    ) from e
  return out


def call_plugin(spec: str) -> dict[str, np.ndarray]:
  """Imports ``MODULE:FUNCTION``, calls it, and returns its arrays (a dict of the npz keys).

  Raises:
    ValueError: the module or function cannot be found (:func:`exvae.plugins.load`).
    plugins.PluginError: it is not callable, or it raised.
    DataFormatError: it did not return a dict.
  """
  fn = plugins.load(spec, "data set")
  if not callable(fn):
    raise plugins.PluginError(
      f"data set plug-in {spec!r} is a {type(fn).__name__}, not a "
      f"function returning a dict ({_KEYS_TEXT})."
    )
  try:
    out = fn()
  except Exception as e:  # noqa: BLE001  (the plug-in's own error, in one line)
    raise plugins.PluginError(
      f"data set plug-in {spec!r} raised {type(e).__name__}: {' '.join(str(e).split())}"
    ) from e
  if not isinstance(out, Mapping):
    raise DataFormatError(
      f"data set plug-in {spec!r} returned a {type(out).__name__}, expected a dict ({_KEYS_TEXT})"
    )
  arrays = {}
  for k, v in out.items():
    try:
      arrays[str(k)] = v if isinstance(v, np.ndarray) else np.asarray(v)
    except ValueError as e:  # ragged lists
      raise DataFormatError(
        f"data set plug-in {spec!r}: key {k!r} is not an array ({' '.join(str(e).split())})"
      ) from e
  return arrays


def _check_images(x: np.ndarray, where: str, key: str) -> None:
  """One split's images: rank, size, dtype, values."""
  if x.ndim not in (3, 4):
    raise DataFormatError(
      f"{where}: key {key!r} has shape {x.shape}: expected images (N, H, W) or (N, H, W, C)"
    )
  if x.shape[0] == 0:
    raise DataFormatError(f"{where}: key {key!r} is empty (shape {x.shape})")
  if 0 in x.shape[1:]:
    raise DataFormatError(f"{where}: key {key!r} holds images of size 0 (shape {x.shape})")
  if x.dtype == np.uint8 or x.dtype == np.bool_:
    return
  if not np.issubdtype(x.dtype, np.floating):
    raise DataFormatError(
      f"{where}: key {key!r} has dtype {x.dtype}: store images as uint8 "
      "(0-255), bool, or floats in [0, 1]"
    )
  finite = np.isfinite(x)
  if not finite.all():
    first = int(np.argmax(~finite.reshape(x.shape[0], -1).any(axis=1)))
    raise DataFormatError(
      f"{where}: key {key!r} has {int((~finite).sum())} NaN or inf "
      f"value(s), the first in image {first}"
    )
  lo, hi = float(x.min()), float(x.max())
  if lo < 0 or hi > 1:
    hint = (
      " (0-255 grey levels stored as floats? divide by 255 or store them as uint8)"
      if hi > 1 and hi <= 255 and lo >= 0
      else ""
    )
    raise DataFormatError(
      f"{where}: key {key!r} has floats outside [0, 1] (min {lo:g}, max {hi:g}){hint}"
    )


def _check_labels(y: np.ndarray, n: int, where: str, key: str, images: str) -> None:
  """One split's labels: (n,) non-negative integers."""
  if y.ndim != 1:
    raise DataFormatError(f"{where}: key {key!r} has shape {y.shape}: expected labels (N,)")
  if not np.issubdtype(y.dtype, np.integer):
    raise DataFormatError(f"{where}: key {key!r} has dtype {y.dtype}: labels are integers 0..C-1")
  if y.shape[0] != n:
    raise DataFormatError(
      f"{where}: key {key!r} has {y.shape[0]} labels for the {n} images of {images!r}"
    )
  if n and int(y.min()) < 0:
    raise DataFormatError(
      f"{where}: key {key!r} has the negative label {int(y.min())}: labels are class indices 0..C-1"
    )


def check_arrays(arrays: Mapping[str, np.ndarray], where: str) -> None:
  """Checks the keys, images and labels of a user's data set.

  Args:
    arrays: the arrays by key (``x_train``, ``x_test``, ...).
    where: the file or plug-in, for messages.

  Raises:
    DataFormatError: one line naming ``where`` and the key.
  """
  for key in arrays:
    if key not in IMAGE_KEYS + LABEL_KEYS:
      raise DataFormatError(f"{where}: unknown key {key!r} (the keys are {_KEYS_TEXT})")
  for key in REQUIRED_KEYS:
    if key not in arrays:
      raise DataFormatError(f"{where}: missing key {key!r} (the keys are {_KEYS_TEXT})")
  for xk, yk in zip(IMAGE_KEYS, LABEL_KEYS):
    if yk in arrays and xk not in arrays:
      raise DataFormatError(f"{where}: key {yk!r} without {xk!r}: labels need their images")
  shape = None
  for key in IMAGE_KEYS:
    if key not in arrays:
      continue
    x = arrays[key]
    _check_images(x, where, key)
    hwc = tuple(x.shape[1:]) + ((1,) if x.ndim == 3 else ())
    if shape is None:
      shape = hwc
    elif hwc != shape:
      raise DataFormatError(
        f"{where}: key {key!r} holds images of shape (H, W, C)={hwc}, 'x_train' of shape {shape}"
      )
  for xk, yk in zip(IMAGE_KEYS, LABEL_KEYS):
    if yk in arrays:
      _check_labels(arrays[yk], arrays[xk].shape[0], where, yk, xk)


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 of a data set's arrays as stored: each key (sorted), dtype, shape and bytes.

  Independent of the file's compression or member order; any changed value,
  dtype, shape or key changes it.
  """
  h = hashlib.sha256()
  for key in sorted(arrays):
    a = np.ascontiguousarray(arrays[key])
    h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  return h.hexdigest()


def _split(arrays: Mapping[str, np.ndarray], where: str, val_size: int | None):
  """(train_x, train_y, val_x, val_y, test_x, test_y) as stored (labels may be None)."""
  xtr, ytr = arrays["x_train"], arrays.get("y_train")
  if "x_val" in arrays:
    if val_size:
      raise DataFormatError(
        f"{where}: has the key 'x_val', so val_size={val_size} does not "
        "apply (it carves validation images out of 'x_train' only without "
        "'x_val'): leave --config.val_size at 0"
      )
    return xtr, ytr, arrays["x_val"], arrays.get("y_val"), arrays["x_test"], arrays.get("y_test")
  n = len(xtr)
  n_val = int(val_size) if val_size else max(1, int(round(DEFAULT_VAL_FRACTION * n)))
  if n_val >= n:
    raise DataFormatError(
      f"{where}: val_size={n_val} leaves no training image (key 'x_train' "
      f"holds {n}; there is no 'x_val')"
    )
  cut = n - n_val
  return (
    xtr[:cut],
    None if ytr is None else ytr[:cut],
    xtr[cut:],
    None if ytr is None else ytr[cut:],
    arrays["x_test"],
    arrays.get("y_test"),
  )


def read_user_dataset(name: str, val_size: int | None = None) -> tuple[tuple, str, dict[str, Any]]:
  """Reads and checks ``npz:PATH`` or a plug-in, and splits it.

  Args:
    name: ``config.dataset``: ``npz:PATH`` or ``MODULE:FUNCTION``.
    val_size: without ``x_val``: the number of training images (the last
      ones) that validate; None or 0: :data:`DEFAULT_VAL_FRACTION` of them.

  Returns:
    ``(parts, source, identity)``: parts = (train_x, train_y, val_x, val_y,
    test_x, test_y) as stored (images uint8, bool or float; labels or None),
    a description of the source, and ``{"path" or "plugin", "sha256"}``.

  Raises:
    DataNotFoundError, DataFormatError, plugins.PluginError, ValueError: one line each.
  """
  if is_npz(name):
    path = npz_path(name)
    arrays, where, identity = read_npz(path), path, {"path": path}
  else:
    arrays, where, identity = call_plugin(name), f"data set plug-in {name!r}", {"plugin": name}
  check_arrays(arrays, where)
  identity["sha256"] = arrays_sha256(arrays)
  source = f"{'npz:' + identity['path'] if 'path' in identity else 'plugin:' + name}"
  return _split(arrays, where, val_size), source, identity
