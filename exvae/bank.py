"""The exemplar bank: a trained model's exemplars as latent codes, without images.

An :class:`ExemplarBank` holds the encoder means ``mu(x_n)`` of a set of
exemplars, their ids and (optional) labels, and the shared prior log-variance
``log s2``.  It is everything the exemplar prior needs at test time,

    log p(z) = logsumexp_n log N(z; mu_n, s2 I) - log N',

and also what nearest-neighbour retrieval, exemplar-conditioned generation
and generative data augmentation need.  Because the prior is non-parametric,
the model grows without retraining: :meth:`ExemplarBank.add` encodes new
images with the frozen encoder and appends their codes (no parameter changes).

Binarisation convention (binary data): row ``n`` is binarised with draws that
depend only on ``(key, id_n)`` (:func:`exvae.rng.bernoulli_rows`), where ``id_n``
is the exemplar's id.
With the default ids ``arange(N)`` this is exactly the convention of
:func:`exvae.priors.exemplar.encode_pool` (``bernoulli_rows(key, x, row_index)``), so a
bank built from the training split with ``PRNGKey(config.eval.bank_seed)``
holds the same codes as the evaluation prior.  Codes depend only on (key, id,
image), so adding exemplars in several calls gives the same bank as building
it from their union at once.

On disk a bank is one ``.npz`` (latent codes only, written atomically):
``codes`` (N, d) float32, ``ids`` (N,) int64, optional ``labels`` (N,) int32,
``log_var`` (), ``key_data`` (the binarisation key) and ``metadata`` (JSON).
A bank built from a run records its source: the run's workdir and a
fingerprint of the model parameters that encoded it (``model_fingerprint``);
:func:`check_bank_source` refuses to mix it with another model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from exvae import atomic, errors, kernels, rng
from exvae.models.base import Model

PyTree = Any

BANK_FORMAT_VERSION = 1


class BankFileError(errors.RunDirError, ValueError):
  """A bank file that cannot be read (corrupt, truncated, not a bank)."""


class BankMismatchError(errors.RunDirError, ValueError):
  """A bank built from another model than the one it is used with."""


def params_fingerprint(params: PyTree) -> str:
  """A short hash of a parameter pytree (tree paths, dtypes, shapes and values)."""
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(params))
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def check_bank_source(
  bank: "ExemplarBank",
  model_params: PyTree,
  path: str = "the bank",
  *,
  allow_mismatch: bool = False,
) -> bool:
  """Checks that ``bank`` was encoded by ``model_params``.

  Args:
    bank: a loaded bank.
    model_params: the model parameters it is about to be used with.
    path: the bank's file (for messages).
    allow_mismatch: only warn when it was built from another model.

  Returns:
    True if the bank records this model, False if it records no source
    (written by an older version; a warning) or another one (allowed).

  Raises:
    BankMismatchError: the bank records another model and ``allow_mismatch``
      is False.
  """
  recorded = bank.metadata.get("model_fingerprint")
  if recorded is None:
    warnings.warn(
      f"{path} records no source model (written by an older version): "
      "cannot check that this model encoded it.",
      stacklevel=2,
    )
    return False
  mine = params_fingerprint(model_params)
  if recorded == mine:
    return True
  msg = (
    f"{path} was built from another model (workdir {bank.metadata.get('workdir', '?')}, "
    f"model {recorded}; this run's model is {mine}): its codes come from another "
    "encoder."
  )
  if not allow_mismatch:
    raise BankMismatchError(
      msg + " Rebuild it with `uses.py bank` for this workdir, or pass "
      "--allow_bank_mismatch to use it anyway."
    )
  warnings.warn(msg + " Used anyway (allow_bank_mismatch).", stacklevel=2)
  return False


# ----------------------------------------------------------------------------
# Jitted pure functions (module level; the Model is static, hashed by identity)
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "binary", "with_logvar"))
def encode_chunk(
  model: Model,
  model_params: PyTree,
  x: jax.Array,
  ids: jax.Array,
  key: jax.Array,
  *,
  binary: bool,
  with_logvar: bool = False,
):
  """Encoder means of a chunk of images, each binarised with its own key (a bank's codes).

  A forward pass only; the exemplar prior's codes with gradients are
  :func:`exvae.priors.exemplar.encode_rows`.

  Args:
    model: the model (static).
    model_params: the model's parameters.
    x: (B, H, W, C) grey levels in [0, 1].
    ids: (B,) integer exemplar ids; row b's draws depend on ``(key, ids[b])``.
    key: binarisation key.
    binary: binarise (Bernoulli of the grey level) before encoding.
    with_logvar: also return the posterior log-variances.

  Returns:
    mu (B, d) float32, or ``(mu, logvar)`` (B, d) each if ``with_logvar``.
  """
  x = jnp.asarray(x, jnp.float32)
  if binary:
    x = rng.bernoulli_rows(key, x, ids)
  if with_logvar:
    mu, logvar = model.encode(model_params, x)
    return mu.astype(jnp.float32), logvar.astype(jnp.float32)
  return model.encode_mean(model_params, x).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("n",))
def sample_codes(codes: jax.Array, log_var: jax.Array, key: jax.Array, n: int):
  """Draws from the exemplar prior: a random exemplar, then z ~ N(mu_i, s2 I).

  Args:
    codes: (N, d) exemplar codes.
    log_var: scalar log s2.
    key: PRNG key.
    n: number of samples (static).

  Returns:
    ``(z (n, d), idx (n,) int32)``: the samples and the bank rows they came from.
  """
  k_idx, k_eps = jax.random.split(key)
  idx = jax.random.randint(k_idx, (n,), 0, codes.shape[0], dtype=jnp.int32)
  eps = jax.random.normal(k_eps, (n, codes.shape[1]), codes.dtype)
  return codes[idx] + jnp.exp(0.5 * log_var) * eps, idx


@jax.jit
def parzen_log_prob(
  z: jax.Array,
  codes: jax.Array,
  log_var: jax.Array,
  bank_ids: jax.Array | None = None,
  query_ids: jax.Array | None = None,
) -> jax.Array:
  """log (1/N') sum_n N(z; mu_n, s2 I) with N' the count of components in the sum.

  Args:
    z: (B, d) queries.
    codes: (N, d) exemplar codes.
    log_var: scalar log s2.
    bank_ids, query_ids: optional (N,), (B,) int ids for leave-one-out.

  Returns:
    (B,) log-densities (-inf where no component is valid).
  """
  lse, count = kernels.log_kernel_sum(z, codes, log_var, bank_ids=bank_ids, query_ids=query_ids)
  return lse - jnp.log(jnp.maximum(count, 1.0))


def _pad_chunk(n: int, batch_size: int) -> int:
  """Chunk length: batch_size, or the next power of two >= n for small inputs."""
  return int(min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def encode_images(
  model: Model,
  model_params: PyTree,
  images: np.ndarray,
  ids: np.ndarray,
  key: jax.Array,
  *,
  binary: bool,
  batch_size: int = 2048,
  with_logvar: bool = False,
  progress: bool = False,
  desc: str = "encode",
):
  """Encodes ``images`` in fixed-size chunks (padded, so no retracing per size).

  Args:
    model: the model.
    model_params: its parameters.
    images: (N, H, W, C) grey levels in [0, 1].
    ids: (N,) integer ids (row n binarised from ``(key, id_n)``).
    key: binarisation key.
    binary: binarise before encoding.
    batch_size: rows per jitted call.
    with_logvar: also return the mean posterior log-variance (a float).
    progress: show a tqdm bar.
    desc: bar label.

  Returns:
    codes (N, d) float32, or ``(codes, mean_logvar)`` if ``with_logvar``.
  """
  n = images.shape[0]
  d = model.latent_dim
  out = np.zeros((n, d), np.float32)
  lv_sum = 0.0
  if n == 0:
    return (out, 0.0) if with_logvar else out
  chunk = _pad_chunk(n, int(batch_size))
  starts = range(0, n, chunk)
  if progress:
    from tqdm.auto import tqdm

    starts = tqdm(starts, desc=desc, unit="chunk", dynamic_ncols=True)
  for lo in starts:
    hi = min(lo + chunk, n)
    xb = np.zeros((chunk,) + images.shape[1:], np.float32)
    xb[: hi - lo] = images[lo:hi]
    ib = np.zeros((chunk,), np.int64)
    ib[: hi - lo] = ids[lo:hi]
    r = encode_chunk(
      model,
      model_params,
      jnp.asarray(xb),
      jnp.asarray(ib, jnp.uint32),
      key,
      binary=bool(binary),
      with_logvar=with_logvar,
    )
    if with_logvar:
      mu, lv = jax.device_get(r)
      lv_sum += float(np.asarray(lv[: hi - lo], np.float64).sum())
    else:
      mu = jax.device_get(r)
    out[lo:hi] = mu[: hi - lo]
  if with_logvar:
    return out, lv_sum / (n * d)
  return out


def _check_images(model: Model, images: np.ndarray, name: str = "images") -> np.ndarray:
  """Validates (N, H, W, C) images in [0, 1] of the model's shape; returns float32."""
  from exvae import data

  images = np.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
    raise ValueError(
      f"{name}: expected an array of shape (N, {', '.join(map(str, model.image_shape))})"
      f" matching the model's image shape {tuple(model.image_shape)}, got {images.shape}"
    )
  data.validate_images(images, image_shape=model.image_shape, name=name)
  return np.ascontiguousarray(images, np.float32)


# ----------------------------------------------------------------------------
# The bank
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ExemplarBank:
  """Latent codes of a set of exemplars (what the exemplar prior mixes over).

  Attributes:
    codes: (N, d) float32 encoder means mu(x_n).
    ids: (N,) int64 exemplar ids (unique; the row index of the training pool
      by default; also the binarisation fold-in index).
    labels: (N,) int32 labels, or None.
    log_var: log s2, the shared prior log-variance (a float).
    metadata: JSON-able dict: ``dataset``, ``source``, ``image_shape``,
      ``binary`` and whatever else the builder recorded.
    key_data: (2,) uint32 raw data of the binarisation key (used by :meth:`add`).
  """

  codes: np.ndarray
  ids: np.ndarray
  labels: np.ndarray | None
  log_var: float
  metadata: dict = dataclasses.field(default_factory=dict)
  key_data: np.ndarray = dataclasses.field(
    default_factory=lambda: np.asarray(jax.random.key_data(jax.random.PRNGKey(0)), np.uint32)
  )

  def __post_init__(self):
    codes = np.ascontiguousarray(self.codes, np.float32)
    ids = np.ascontiguousarray(self.ids, np.int64).reshape(-1)
    if codes.ndim != 2:
      raise ValueError(f"codes must be (N, d), got shape {codes.shape}")
    if ids.shape[0] != codes.shape[0]:
      raise ValueError(f"ids has {ids.shape[0]} rows but codes has {codes.shape[0]}")
    labels = self.labels
    if labels is not None:
      labels = np.ascontiguousarray(labels, np.int32).reshape(-1)
      if labels.shape[0] != codes.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but codes has {codes.shape[0]}")
    object.__setattr__(self, "codes", codes)
    object.__setattr__(self, "ids", ids)
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "log_var", float(self.log_var))
    object.__setattr__(self, "metadata", dict(self.metadata))
    object.__setattr__(self, "key_data", np.asarray(self.key_data, np.uint32))

  # -- construction ---------------------------------------------------------
  @classmethod
  def build(
    cls,
    model: Model,
    model_params: PyTree,
    images: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    log_var: float,
    binary: bool,
    key: jax.Array,
    batch_size: int = 2048,
    metadata: dict | None = None,
    progress: bool = False,
  ) -> "ExemplarBank":
    """Encodes ``images`` (no gradients, frozen parameters) into a new bank.

    Args:
      model: the trained model.
      model_params: its parameters (``params["model"]``).
      images: (N, H, W, C) grey levels in [0, 1], of the model's image shape.
      ids: (N,) unique int ids; default ``arange(N)``.
      labels: (N,) int labels or None.
      log_var: shared prior log-variance log s2.
      binary: binarise row n from ``(key, ids[n])`` before encoding.
      key: binarisation key (kept in the bank for :meth:`add`).
      batch_size: images per jitted encoder call.
      metadata: extra JSON-able metadata (``image_shape`` and ``binary`` are
        always recorded).
      progress: show a progress bar.

    Returns:
      The bank with N codes.

    Raises:
      ValueError: images of the wrong shape or outside [0, 1], bad ids/labels.
    """
    images = _check_images(model, images)
    n = images.shape[0]
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64).reshape(-1)
    if ids.shape[0] != n:
      raise ValueError(f"ids has {ids.shape[0]} entries for {n} images")
    if np.unique(ids).shape[0] != n:
      raise ValueError("exemplar ids must be unique")
    if n and (ids.min() < 0 or ids.max() >= 2**32):
      raise ValueError("exemplar ids must lie in [0, 2**32)")
    codes = encode_images(
      model,
      model_params,
      images,
      ids,
      key,
      binary=binary,
      batch_size=batch_size,
      progress=progress,
      desc="bank",
    )
    meta = dict(metadata or {})
    meta.update(image_shape=[int(s) for s in model.image_shape], binary=bool(binary))
    return cls(
      codes=codes,
      ids=ids,
      labels=labels,
      log_var=float(log_var),
      metadata=meta,
      key_data=np.asarray(jax.random.key_data(key), np.uint32),
    )

  @property
  def key(self) -> jax.Array:
    """The binarisation key the bank was built with."""
    return jnp.asarray(self.key_data, jnp.uint32)  # a raw (legacy) threefry key

  def add(
    self,
    model: Model,
    model_params: PyTree,
    images: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 2048,
    progress: bool = False,
  ) -> "ExemplarBank":
    """Returns a larger bank: this one plus the codes of ``images`` (no training).

    The new images are encoded with the same frozen ``model_params`` and the
    same binarisation key, so ``bank.add(x2)`` equals ``build(x1 + x2)``.

    Args:
      model, model_params: the model the bank was built with.
      images: (M, H, W, C) new exemplars.
      ids: (M,) new unique ids; default ``max(ids) + 1 + arange(M)``.
      labels: (M,) labels; required if (and only if) this bank has labels.
      batch_size: images per encoder call.
      progress: show a progress bar.

    Returns:
      A new bank with N + M codes; ``self`` is unchanged.
    """
    m = np.asarray(images).shape[0]
    if ids is None:
      start = int(self.ids.max()) + 1 if self.size else 0
      ids = np.arange(start, start + m, dtype=np.int64)
    ids = np.asarray(ids, np.int64).reshape(-1)
    if np.intersect1d(ids, self.ids).size:
      raise ValueError("new exemplar ids collide with ids already in the bank")
    if (self.labels is None) != (labels is None) and self.size:
      raise ValueError("labels must be given for the new exemplars iff the bank has labels")
    new = ExemplarBank.build(
      model,
      model_params,
      images,
      ids=ids,
      labels=labels,
      log_var=self.log_var,
      binary=bool(self.metadata.get("binary", True)),
      key=self.key,
      batch_size=batch_size,
      progress=progress,
    )
    labels_all = None
    if labels is not None:
      labels_all = np.concatenate(
        [self.labels if self.labels is not None else np.zeros((0,), np.int32), new.labels]
      )
    meta = dict(self.metadata)
    meta["num_added"] = int(meta.get("num_added", 0)) + int(m)
    return dataclasses.replace(
      self,
      codes=np.concatenate([self.codes, new.codes]),
      ids=np.concatenate([self.ids, new.ids]),
      labels=labels_all,
      metadata=meta,
    )

  # -- sizes ----------------------------------------------------------------
  @property
  def size(self) -> int:
    """N, the number of exemplars."""
    return int(self.codes.shape[0])

  @property
  def latent_dim(self) -> int:
    """d."""
    return int(self.codes.shape[1])

  @property
  def raw_images_nbytes(self) -> int:
    """Bytes of the exemplars as raw uint8 images: N * H * W * C."""
    shape = self.metadata.get("image_shape")
    if shape is None:
      raise ValueError("bank metadata has no image_shape")
    return self.size * int(np.prod(shape))

  def nbytes_on_disk(self, path: str | None = None) -> int:
    """Size of the saved bank: of the file at ``path``, else of its serialisation."""
    if path is not None:
      return int(os.path.getsize(path))
    buf = io.BytesIO()
    self._write(buf)
    return len(buf.getvalue())

  def size_report(self, path: str | None = None) -> dict[str, float]:
    """``{'num_exemplars', 'bank_bytes', 'raw_images_bytes', 'ratio'}`` (bank / raw)."""
    b = self.nbytes_on_disk(path)
    raw = self.raw_images_nbytes
    return {
      "num_exemplars": self.size,
      "latent_dim": self.latent_dim,
      "bank_bytes": b,
      "raw_images_bytes": raw,
      "ratio": b / max(raw, 1),
    }

  # -- persistence ------------------------------------------------------------
  def _write(self, f) -> None:
    arrays = {
      "codes": self.codes,
      "ids": self.ids,
      "log_var": np.asarray(self.log_var, np.float32),
      "key_data": self.key_data,
      "format_version": np.asarray(BANK_FORMAT_VERSION, np.int32),
      "metadata": np.asarray(json.dumps(self.metadata, sort_keys=True)),
    }
    if self.labels is not None:
      arrays["labels"] = self.labels
    np.savez(f, **arrays)

  def save(self, path: str) -> int:
    """Writes the bank to ``path`` (.npz) atomically (temp file + os.replace).

    Args:
      path: destination file (``.npz`` is NOT appended).

    Returns:
      The number of bytes on disk.
    """
    atomic.write_with(path, self._write)
    return self.nbytes_on_disk(path)

  @classmethod
  def load(cls, path: str) -> "ExemplarBank":
    """Reads a bank written by :meth:`save`.

    Raises:
      FileNotFoundError: no such file.
      BankFileError (a ValueError): the file is corrupt or truncated, not a
        bank (missing arrays), of an unknown format version, or holds
        non-finite codes; the message names the file and what is wrong.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"No bank file {path}: build one with `uses.py bank` (it writes <out>/bank.npz)."
      )
    rebuild = "rebuild it with `uses.py bank`"
    try:
      with np.load(path, allow_pickle=False) as z:
        missing = {"codes", "ids", "log_var", "metadata"} - set(z.files)
        if missing:
          raise BankFileError(
            f"{path} is not an exemplar bank (missing arrays {sorted(missing)}); {rebuild}."
          )
        version = int(z["format_version"]) if "format_version" in z.files else BANK_FORMAT_VERSION
        if version != BANK_FORMAT_VERSION:
          raise BankFileError(
            f"{path}: bank format {version}, this code reads {BANK_FORMAT_VERSION}; {rebuild}."
          )
        kw = {}
        if "key_data" in z.files:
          kw["key_data"] = z["key_data"]
        bank = cls(
          codes=z["codes"],
          ids=z["ids"],
          labels=z["labels"] if "labels" in z.files else None,
          log_var=float(z["log_var"]),
          metadata=json.loads(str(z["metadata"])),
          **kw,
        )
    except BankFileError:
      raise
    except atomic.NPZ_READ_ERRORS as e:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
      # (numpy's own message for a non-zip file suggests allow_pickle: misleading here)
      what = (
        f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        if is_zip
        else "it does not start like a .npz (zip) file"
        if size
        else "the file is empty"
      )
      raise BankFileError(
        f"{path} ({size:,} bytes) is corrupt or truncated, not a readable "
        f"bank .npz ({what}); {rebuild}."
      ) from e
    if not (np.all(np.isfinite(bank.codes)) and math.isfinite(bank.log_var)):
      raise BankFileError(f"{path} holds non-finite codes or log_var; {rebuild}.")
    return bank

  # -- density, sampling, retrieval ---------------------------------------------
  def log_prob(self, z: np.ndarray | jax.Array) -> np.ndarray:
    """Exemplar-prior log-density: logsumexp_n log N(z; mu_n, s2 I) - log N.

    Args:
      z: (B, d) latent codes.

    Returns:
      (B,) float32 log p(z) (streamed over the bank; count-based normaliser).
    """
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f"z must be (B, {self.latent_dim}), got {tuple(z.shape)}")
    return np.asarray(parzen_log_prob(z, jnp.asarray(self.codes), jnp.float32(self.log_var)))

  def sample(self, key: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws n codes: a uniformly random exemplar i, then z ~ N(mu_i, s2 I).

    Returns:
      ``(z (n, d) float32, rows (n,) int32)``: samples and their source rows.
    """
    if self.size == 0:
      raise ValueError("cannot sample from an empty bank")
    z, idx = sample_codes(jnp.asarray(self.codes), jnp.float32(self.log_var), key, int(n))
    return np.asarray(z), np.asarray(idx)

  def nearest(self, z: np.ndarray | jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest exemplars (squared L2) of each query, via the streamed top-k.

    Args:
      z: (B, d) queries.
      k: number of neighbours.

    Returns:
      ``(sq_dists (B, k) float32 ascending, rows (B, k) int32)``; ``-1`` rows
      (and +inf distances) where the bank has fewer than k exemplars.
      ``bank.ids[rows]`` / ``bank.labels[rows]`` give ids / labels.
    """
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f"z must be (B, {self.latent_dim}), got {tuple(z.shape)}")
    d, idx = kernels.topk_neighbors(z, jnp.asarray(self.codes), int(k))
    return np.asarray(d), np.asarray(idx)

  @classmethod
  def from_checkpoint(cls, config, workdir: str, **kwargs) -> "ExemplarBank":
    """Alias of :func:`from_checkpoint`."""
    return from_checkpoint(config, workdir, **kwargs)


# ----------------------------------------------------------------------------
# Restoring a trained run
# ----------------------------------------------------------------------------


class Trained(NamedTuple):
  """A restored run: what the downstream uses need.

  Attributes:
    config: the run's ConfigDict.
    splits: the data (train grey levels; val/test binarised once).
    setup: the static run description (model, prior, likelihood).
    params: ``{"model": ..., "prior": ...}`` best-on-validation parameters.
    meta: what training recorded, the same keys for a run directory and a published
      model: ``best_epoch`` (1-based as printed; 0: no epoch validated) and
      ``best_val`` (its validation loss or None); a run directory adds the
      checkpoint's bookkeeping (``epochs_validated``, ``bad_epochs``, ``early_stopped``).
  """

  config: Any
  splits: Any
  setup: Any
  params: PyTree
  meta: dict


class Restored(NamedTuple):
  """The parameters of a trained run as :func:`restore_params` reads them.

  Attributes:
    best: the best-on-validation parameters.
    last: the last parameters (the checkpoint's train state), or None (a published
      model, or not asked for).
    step: the checkpoint's step (-1: a published model that does not record it;
      None: the train state was not read).
    meta: as :attr:`Trained.meta`: ``best_epoch`` 1-based (0: none validated),
      ``best_val``, and for a run directory the checkpoint's other bookkeeping.
  """

  best: PyTree
  last: PyTree | None
  step: int | None
  meta: dict


def check_trained(workdir: str) -> bool:
  """Whether ``workdir`` is a published model; raises unless it holds a trained run.

  Raises:
    CheckpointNotFoundError: neither a published model nor a checkpoint (a published
      model missing files says which).
  """
  from exvae import checkpoints, published, rundir

  is_published = published.is_published(workdir)  # parameters only, no checkpoints
  if not is_published and not rundir.has_checkpoint(workdir):
    published.check_complete(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not is_published and (
    not os.path.isdir(ckpt_dir) or not any(name.isdigit() for name in os.listdir(ckpt_dir))
  ):
    raise checkpoints.CheckpointNotFoundError(
      f"No checkpoint found in {ckpt_dir}. Train first: "
      f"exvae-train --config=<config> --workdir={workdir}"
    )
  return is_published


def restore_params(
  config, workdir: str, setup, *, is_published: bool, need_last: bool = False
) -> Restored:
  """Reads the parameters of the trained run in ``workdir`` (never changing it).

  The one reader of a trained run's parameters: a published model
  (:mod:`exvae.published`) or the newest good checkpoint, opened read-only.

  Args:
    config: the run's ConfigDict.
    workdir: the training workdir, or a published model (see :func:`check_trained`).
    setup: the run's static description (the shapes of the parameters).
    is_published: what :func:`check_trained` returned.
    need_last: read the checkpoint's train state too (its step and last parameters).

  Returns:
    A :class:`Restored`.

  Raises:
    CheckpointNotFoundError: no readable checkpoint.
    CheckpointMismatchError: the checkpoints hold another model.
  """
  from exvae import checkpoints, published, train_lib

  template = train_lib.init_state(config, setup, setup.num_train)
  if is_published:
    best, record = published.load(workdir, template.params)
    meta = {
      "best_epoch": int(record.get("best_epoch") or 0),
      "best_val": record.get("best_val_loss"),
    }
    return Restored(
      best=best, last=None, meta=meta, step=int(record.get("source_checkpoint_step", -1))
    )
  ckpt_dir = os.path.join(workdir, "checkpoints")
  manager = checkpoints.Manager(ckpt_dir, read_only=True)  # never changes the workdir
  out = manager.restore_latest(
    template if need_last else None, template.params, need_state=need_last
  )
  if out is None:
    raise checkpoints.CheckpointNotFoundError(f"No checkpoint step in {ckpt_dir}.")
  state, best, stored = out
  # The checkpoint counts epochs from 0 (-1: none validated); printed and published
  # epochs count from 1, as meta does (0: none validated).
  meta = dict(
    stored, best_epoch=int(stored.get("best_epoch", -1)) + 1, best_val=stored.get("best_val")
  )
  return Restored(
    best=best,
    last=state.params if need_last else None,
    meta=meta,
    step=int(state.step) if need_last else None,
  )


def restore_trained(config, workdir: str) -> Trained:
  """Restores the best-on-validation parameters of the run in ``workdir``.

  Args:
    config: the run's ConfigDict (as given to train.py).
    workdir: the training workdir, or a published model (:mod:`exvae.published`).

  Returns:
    A :class:`Trained`.

  Raises:
    CheckpointNotFoundError: ``workdir`` holds no (readable) checkpoint.
  """
  from exvae import config_checks, rundir, train_lib

  is_published = check_trained(workdir)
  rundir.check_reader_config(workdir, config)
  splits = train_lib.load_data(config)
  rundir.check_reader_data(workdir, splits.identity)  # a user's data set: the same arrays
  config_checks.check_values(config)
  setup = train_lib.make_setup(config, splits)
  restored = restore_params(config, workdir, setup, is_published=is_published)
  return Trained(
    config=config, splits=splits, setup=setup, params=restored.best, meta=restored.meta
  )


def bank_log_var(trained: Trained, mean_posterior_logvar: float | None = None) -> tuple[float, str]:
  """The s2 of exemplar-conditioned sampling: the prior's learned log-variance.

  Models without one (Gaussian prior, VampPrior) use the mean posterior
  log-variance of the bank's images (``mean_posterior_logvar``).

  Returns:
    ``(log_var, source)`` with source ``'prior'`` or ``'mean_posterior'``.
  """
  prior_params = trained.params.get("prior", {}) if isinstance(trained.params, dict) else {}
  if isinstance(prior_params, dict) and "log_var" in prior_params:
    return float(np.asarray(prior_params["log_var"])), "prior"
  if mean_posterior_logvar is None:
    raise ValueError("this model's prior has no log_var: pass mean_posterior_logvar")
  return float(mean_posterior_logvar), "mean_posterior"


def from_checkpoint(
  config,
  workdir: str,
  *,
  trained: Trained | None = None,
  batch_size: int = 2048,
  progress: bool = False,
) -> ExemplarBank:
  """Builds the bank of a trained run from its training split (+ labels).

  Images are encoded exactly like the evaluation prior's exemplars (grey
  levels, or binarised with ``PRNGKey(config.eval.bank_seed)`` when
  ``exemplar.binarize_exemplars``), so the codes equal the ones eval.py mixes over.

  Args:
    config: the run's ConfigDict.
    workdir: the training workdir.
    trained: an already restored run (skips restoring again).
    batch_size: images per encoder call.
    progress: show a progress bar.

  Returns:
    The bank (ids = training indices, labels = training labels or None).

  Raises:
    CheckpointNotFoundError: no checkpoint in ``workdir``.
  """
  t = trained if trained is not None else restore_trained(config, workdir)
  model = t.setup.model
  key = jax.random.PRNGKey(int(config.eval.bank_seed))
  x = t.splits.train_x
  binary = t.setup.binary_exemplars
  ids = np.arange(x.shape[0], dtype=np.int64)
  mean_lv = None
  prior_params = t.params.get("prior", {})
  if not (isinstance(prior_params, dict) and "log_var" in prior_params):
    _, mean_lv = encode_images(
      model, t.params["model"], x, ids, key, binary=binary, batch_size=batch_size, with_logvar=True
    )
  log_var, lv_source = bank_log_var(t, mean_lv)
  meta = {
    "dataset": t.splits.name,
    "source": "train",
    "data_source": t.splits.source,
    "prior": str(config.prior),
    "log_var_source": lv_source,
    "bank_seed": int(config.eval.bank_seed),
    "workdir": os.path.abspath(workdir),
    "best_epoch": int(t.meta.get("best_epoch", 0)),
    "model_fingerprint": params_fingerprint(t.params["model"]),
  }
  if t.splits.identity is not None:  # a user's data set: its path (or plug-in) and SHA-256
    meta["data_identity"] = t.splits.identity
  return ExemplarBank.build(
    model,
    t.params["model"],
    x,
    ids=ids,
    labels=t.splits.train_y,
    log_var=log_var,
    binary=binary,
    key=key,
    batch_size=batch_size,
    metadata=meta,
    progress=progress,
  )
