"""Resumable work files: arrays saved as a long computation goes, reused only by the same work.

A stopped evaluation (``eval_partial.npz``) or classifier training
(``seed<S>_<arm>.partial.npz``) goes on from the arrays it saved last.  The
file is an ``.npz`` written atomically with a digest of its arrays
(:func:`exvae.atomic.write_npz_checked`) and an ``identity`` string that
describes everything the arrays depend on (parameters, images, settings).
:func:`load` gives the arrays back only when the file reads, matches its
digest, carries the same identity and holds the expected arrays; otherwise
the work starts again from its beginning, with one line that says why.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from exvae import atomic

IDENTITY_KEY = "identity"  # the name of the identity string in the archive


def save(path: str, identity: str, arrays: Mapping[str, Any]) -> None:
  """Saves ``arrays`` with ``identity`` to ``path`` atomically (its folder is created).

  Args:
    path: the ``.npz`` file.
    identity: what the arrays depend on (compared as a string by :func:`load`).
    arrays: name -> array (not named :data:`IDENTITY_KEY`).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write_npz_checked(path, {**arrays, IDENTITY_KEY: np.str_(identity)})


def load(
  path: str,
  identity: str,
  like: Mapping[str, Any],
  *,
  what: str,
  restart: str,
  other: str = "settings",
) -> dict[str, np.ndarray] | None:
  """The arrays :func:`save` wrote to ``path`` with ``identity``, else None.

  A missing file gives None silently; an unreadable or torn one, one saved with
  another identity, or one without the arrays of ``like`` gives None with a line
  that says so (the caller then starts its work from the beginning).

  Args:
    path: the ``.npz`` file.
    identity: the identity the arrays must have been saved with.
    like: name -> an array of the expected shape and dtype, or None where any
      shape will do; every name must be in the file.
    what: what the file is, for the line (``"partial evaluation"``).
    restart: what the caller does instead, for the line (``"training from the start"``).
    other: what differs when the identity does (``"parameters or settings"``).

  Returns:
    name -> array (without the identity), or None.
  """
  if not os.path.exists(path):
    return None
  try:
    arrays = atomic.read_npz_checked(path)  # its arrays match the digest written with them
    same = str(arrays.pop(IDENTITY_KEY)) == identity
  except atomic.NPZ_READ_ERRORS as e:
    print(f"{path}: unreadable {what} ({type(e).__name__}: {e}); {restart}", flush=True)
    return None
  if not same:
    print(f"{path}: a {what} of other {other}; {restart}", flush=True)
    return None
  if any(
    k not in arrays
    or (
      v is not None and (arrays[k].shape != np.shape(v) or arrays[k].dtype != np.asarray(v).dtype)
    )
    for k, v in like.items()
  ):
    print(f"{path}: a {what} of other shapes; {restart}", flush=True)
    return None
  return arrays
