"""Atomic file writes: a file is either its old content or its complete new content.

Every file exvae writes goes through here: the content goes to a temporary
file in the destination's directory (same filesystem), is flushed and
``fsync``-ed, and then replaces the destination with ``os.replace``.  A
failure (a full disk, a kill) leaves the old file as it was and removes the
temporary one.  JSON is strict: ``NaN`` and ``Infinity`` are refused
(:func:`dumps`), so every JSON file exvae writes can be read by any JSON parser.

:func:`commit` writes several files as one unit: all of them to temporary
files first, then renamed in the given order (put the file that describes
the others last).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from exvae import errors

TMP_MARK = ".tmp-"


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
  """Strict JSON text of ``obj`` (``allow_nan=False``).

  Raises:
    ValueError: ``obj`` holds a non-finite float (not JSON).
  """
  return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)


def finite_or_none(obj: Any) -> Any:
  """``obj`` with every non-finite float replaced by None (``null`` in JSON)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


def _tmp_path(path: str) -> str:
  d, base = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{base}{TMP_MARK}", dir=d)
  os.close(fd)
  return tmp


def _fsync_dir(d: str) -> None:
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems refuse fsync on a directory
  finally:
    os.close(fd)


def _write_tmp(path: str, write: Callable[[io.BufferedWriter], None]) -> str:
  """Writes a temporary file next to ``path`` with ``write(f)``; returns its path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_path(path)
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; keep the usual mode
  except BaseException:
    _remove(tmp)
    raise
  return tmp


def _remove(path: str) -> None:
  with contextlib.suppress(OSError):
    os.remove(path)


def _raise_typed(e: BaseException, path: str):
  typed = errors.as_write_error(e, path)
  if typed is e:
    raise e
  raise typed from e


def write_with(path: str, write: Callable[[io.BufferedWriter], None]) -> str:
  """Writes ``path`` atomically with ``write(f)`` (f: a binary file object).

  Returns:
    ``path``.

  Raises:
    errors.DiskFullError: no space left (the old file is intact).
    errors.ReadOnlyError: the directory cannot be written.
  """
  try:
    tmp = _write_tmp(path, write)
    try:
      os.replace(tmp, path)
    except BaseException:
      _remove(tmp)
      raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
  except OSError as e:
    _raise_typed(e, path)
  return path


def write_bytes(path: str, data: bytes) -> str:
  """Writes ``data`` to ``path`` atomically (see :func:`write_with`)."""
  return write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> str:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  return write_bytes(path, text.encode())


def write_json(path: str, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
  """Writes ``obj`` as strict JSON to ``path`` atomically.

  Raises:
    ValueError: ``obj`` holds a non-finite float (nothing is written).
  """
  return write_text(path, dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
  """Writes a NumPy ``.npz`` archive (no pickle) to ``path`` atomically."""
  return write_with(path, lambda f: np.savez(f, **arrays))


def append_line(path: str, line: str, fsync: bool = True) -> None:
  """Appends one line (a newline is added), flushed to the disk if ``fsync``.

  A kill can still tear the line; readers of such files drop a torn last line.

  Raises:
    errors.DiskFullError, errors.ReadOnlyError: as :func:`write_with`.
  """
  try:
    with open(path, "a") as f:
      f.write(line + "\n")
      f.flush()
      if fsync:
        os.fsync(f.fileno())
  except OSError as e:
    _raise_typed(e, path)


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def commit(files: Sequence[tuple[str, Callable[[dict[str, str]], Callable]]]) -> dict[str, str]:
  """Writes several files as one unit: all to temporary files, then renamed in order.

  Each entry is ``(path, make_writer)``; ``make_writer(digests)`` gets the
  SHA-256 digests of the files written before it (``{path: hex}``) and returns
  the ``write(f)`` function of its file, so the last file (e.g. a metrics
  JSON) can record the digests of the others and tie them together.  Nothing
  is renamed until every file is written; on any failure every temporary file
  is removed and the old files are left as they were.

  Returns:
    ``{path: sha256 hex}`` of every file written.

  Raises:
    errors.DiskFullError, errors.ReadOnlyError: as :func:`write_with`.
  """
  tmps: list[tuple[str, str]] = []
  digests: dict[str, str] = {}
  try:
    for path, make_writer in files:
      tmp = _write_tmp(path, make_writer(dict(digests)))
      tmps.append((tmp, path))
      digests[path] = sha256_file(tmp)
    for tmp, path in tmps:
      os.replace(tmp, path)
    for d in sorted({os.path.dirname(os.path.abspath(p)) for _, p in tmps}):
      _fsync_dir(d)
  except OSError as e:
    for tmp, _ in tmps:
      _remove(tmp)
    _raise_typed(e, files[-1][0] if files else "")
  except BaseException:
    for tmp, _ in tmps:
      _remove(tmp)
    raise
  return digests


# ----------------------------------------------------------------------------
# Digests a record carries of itself (checked before anything is reused)
# ----------------------------------------------------------------------------

SELF_DIGEST = "record_sha256"
NPZ_DIGEST = "_sha256"


def json_digest(obj: Any) -> str:
  """SHA-256 (hex) of ``obj`` as canonical JSON (sorted keys, no spaces): the same for
  the same values, however the file holding them is laid out."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_self_digest(record: dict) -> dict:
  """``record`` plus :data:`SELF_DIGEST`: the :func:`json_digest` of the rest of it."""
  rest = {k: v for k, v in record.items() if k != SELF_DIGEST}
  return dict(rest, **{SELF_DIGEST: json_digest(rest)})


def check_self_digest(record: dict, what: str, required: bool = False) -> None:
  """Raises ValueError if ``record``'s :data:`SELF_DIGEST` does not match its content.

  A record without one (written before records carried it) passes unless ``required``.
  """
  if SELF_DIGEST not in record:
    if required:
      raise ValueError(f"{what} carries no digest of its content")
    return
  rest = {k: v for k, v in record.items() if k != SELF_DIGEST}
  if json_digest(rest) != record[SELF_DIGEST]:
    raise ValueError(f"{what} differs from the digest written with it (edited or damaged)")


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 (hex) of named arrays: names, dtypes, shapes and bytes, in name order."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(np.asarray(arrays[name]))
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def write_npz_checked(path: str, arrays: dict[str, np.ndarray]) -> str:
  """:func:`write_npz` with :data:`NPZ_DIGEST`, the :func:`arrays_digest` of the arrays."""
  arrays = {k: np.asarray(v) for k, v in arrays.items() if k != NPZ_DIGEST}
  return write_npz(path, dict(arrays, **{NPZ_DIGEST: np.str_(arrays_digest(arrays))}))


# What reading a damaged .npz can raise: a cut or flipped zip container (BadZipFile, EOFError,
# and NotImplementedError when a flipped header names an unknown zip version), a damaged
# compressed member (zlib.error), a damaged array header (ValueError) or a missing key.
NPZ_READ_ERRORS = (
  OSError,
  ValueError,
  KeyError,
  EOFError,
  zipfile.BadZipFile,
  zlib.error,
  NotImplementedError,
)


def read_npz_checked(path: str) -> dict[str, np.ndarray]:
  """The arrays of a :func:`write_npz_checked` archive, after checking its digest.

  Raises:
    ValueError: no digest, or the arrays differ from it; one of :data:`NPZ_READ_ERRORS`:
      the file cannot be read.
  """
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: np.asarray(z[k]) for k in z.files}
  recorded = arrays.pop(NPZ_DIGEST, None)
  if recorded is None:
    raise ValueError("it carries no digest of its arrays")
  if str(recorded) != arrays_digest(arrays):
    raise ValueError("its arrays differ from the digest written with them")
  return arrays
