"""Per-example test scores (``per_example.npz``): what ``eval.py`` keeps besides the means.

``eval.py`` writes ``<workdir>/per_example.npz`` next to ``eval_metrics.json``.
It is a plain NumPy archive (read with ``np.load(path)``, no pickle) and is
self-describing, so it can be copied as is into ``results/<config>/`` and
compared there (``exvae compare``). Arrays, one entry per test image, in the
order of the test split:

* ``log_px`` float32 (M,): the importance-sampled estimate of log p(x) (nats;
  the test NLL is ``-log_px.mean()``);
* ``elbo`` float32 (M,): the ELBO estimate (a lower bound, nats);
* ``recon`` float32 (M,): -E_q log p(x|z);
* ``kl`` float32 (M,): E_q [log q(z|x) - log p(z)].

Identity of the scored images (0-d arrays; ``compare`` refuses two files
whose identities differ):

* ``dataset`` (str), ``split`` (str, ``'test'``), ``eval_binarize_seed``
  (int), ``count`` (int, = M), ``images_sha256`` (str: SHA-256 of the shape
  and float32 bytes of exactly the images that were scored, after the fixed
  binarisation).

Provenance (0-d arrays, informative only): ``num_importance_samples``,
``eval_seed``, ``eval_binarize`` (whose draw), ``prior``, ``model``, ``checkpoint_step``, ``params``
(``'best'`` or ``'last'``), ``format_version``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import numpy as np

from exvae import atomic

FILENAME = "per_example.npz"
FORMAT_VERSION = 1
SCORES = ("log_px", "elbo", "recon", "kl")
IDENTITY = ("dataset", "split", "eval_binarize_seed", "count", "images_sha256")


def images_digest(images: np.ndarray) -> str:
  """SHA-256 (hex) of the shape and float32 bytes of ``images``.

  Args:
    images: (M, H, W, C) the images that were scored.

  Returns:
    A hex digest; equal digests mean the same images in the same order.
  """
  x = np.ascontiguousarray(np.asarray(images, np.float32))
  h = hashlib.sha256()
  h.update(repr(tuple(int(s) for s in x.shape)).encode())
  h.update(x.tobytes())
  return h.hexdigest()


def arrays(
  scores: Mapping[str, np.ndarray],
  identity: Mapping[str, Any],
  provenance: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
  """The arrays of a per-example archive (see :func:`save` for the arguments).

  Raises:
    ValueError: a missing identity key or score, or scores of unequal length.
  """
  missing = [k for k in IDENTITY if k not in identity]
  if missing:
    raise ValueError(f"per-example identity lacks {missing}.")
  out = {}
  for k in SCORES:
    if k in scores:
      out[k] = np.asarray(scores[k], np.float32).reshape(-1)
  if "log_px" not in out or "elbo" not in out:
    raise ValueError("per-example scores need 'log_px' and 'elbo'.")
  m = int(identity["count"])
  if any(a.shape != (m,) for a in out.values()):
    raise ValueError(
      f"per-example scores must all have shape ({m},), got "
      f"{ {k: a.shape for k, a in out.items()} }."
    )
  meta = dict(provenance or {}, **identity, format_version=FORMAT_VERSION)
  for k, v in meta.items():
    out[k] = np.asarray(v if v is not None else "")
  return out


def save(
  path: str,
  scores: Mapping[str, np.ndarray],
  identity: Mapping[str, Any],
  provenance: Mapping[str, Any] | None = None,
) -> str:
  """Writes a per-example archive atomically.

  Args:
    path: the ``.npz`` file, or a directory (then ``<dir>/per_example.npz``).
    scores: (M,) arrays named as in :data:`SCORES` (``log_px`` and ``elbo``
      required); stored as float32.
    identity: every key of :data:`IDENTITY`.
    provenance: optional informative scalars.

  Returns:
    The path written.

  Raises:
    ValueError: a missing identity key or score, or scores of unequal length.
  """
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  return atomic.write_npz(path, arrays(scores, identity, provenance))


def resolve(path: str) -> str:
  """The ``per_example.npz`` of a workdir, a ``results/`` entry, or the file itself.

  Raises:
    FileNotFoundError: no per-example file there (names what to run).
  """
  if os.path.isdir(path):
    f = os.path.join(path, FILENAME)
    if not os.path.isfile(f):
      raise FileNotFoundError(
        f"{path} holds no {FILENAME}: evaluate it first (exvae-eval --config=... "
        f"--workdir={path}), or copy the file of an evaluated run there."
      )
    return f
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such per-example file or directory: {path}")
  return path


def load(path: str) -> dict[str, Any]:
  """Reads a per-example archive (a file or a directory holding one).

  Returns:
    dict: the float32 score arrays, identity and provenance as Python
    scalars/strings, and ``path``.
  """
  f = resolve(path)
  out: dict[str, Any] = {"path": f}
  with np.load(f, allow_pickle=False) as z:
    for k in z.files:
      a = z[k]
      out[k] = a.item() if a.ndim == 0 else a
  missing = [k for k in IDENTITY + ("log_px", "elbo") if k not in out]
  if missing:
    raise ValueError(f"{f} is not a per-example file: it lacks {missing}.")
  return out


def identity(record: Mapping[str, Any]) -> dict[str, Any]:
  """The identity fields of a loaded record (what must match to compare)."""
  return {k: record[k] for k in IDENTITY}
