"""Host-side importance-sampled evaluation: the IWAE bound, the ELBO and its terms per example.

Used by validation during training (:func:`exvae.train_lib.validate`), by
``exvae-eval`` (:mod:`exvae.eval_lib`) and by :class:`exvae.api.Run`.  The
jitted pieces are module-level functions with a static ``setup``:

- :func:`eval_context`: the prior's evaluation context (the exemplar prior:
  ALL training exemplars, encoded once, no gradients);
- :func:`eval_batch`: per-example sums over one chunk of importance samples;
- :func:`picture_batch`: prior samples and reconstructions for a picture.

:func:`evaluate_split` drives them over a whole split in chunks of at most
``max_queries`` latent codes, so memory does not depend on S or on the number
of images, and can save its progress to a resumable file
(:mod:`exvae.resumable`) that a stopped evaluation goes on from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from exvae import atomic, distributed, errors, resumable
from exvae import progress as progress_lib
from exvae.objectives import Setup, log_importance_weights

PyTree = Any

SPLIT_SCORES = ("log_px_iwae", "elbo", "recon", "kl", "max_err")  # what evaluate_split returns


# ----------------------------------------------------------------------------
# Jitted pieces (module level; `setup` is static and hashed by identity)
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("setup",))
def eval_context(params: PyTree, pool: jax.Array, key: jax.Array, *, setup: Setup):
  """The prior's evaluation context (exemplar prior: ALL training exemplars, no gradients).

  Args:
    params: ``{"model": ..., "prior": ...}``.
    pool: (N, H, W, C) training images in [0, 1].
    key: PRNG key (binarises the exemplars where the run does).
    setup: static run description.

  Returns:
    The context :func:`eval_batch` and :func:`picture_batch` take, of the prior's
    own type (the exemplar prior's :class:`~exvae.priors.ExemplarContext` with
    ``full_bank=True``; None for a prior that needs none).
  """
  inputs = setup.context_inputs(pool, key)
  ctx, _ = setup.prior.context(
    params["prior"], {}, setup.model, params["model"], inputs, train=False
  )
  return jax.lax.stop_gradient(ctx)


@functools.partial(jax.jit, static_argnames=("setup", "num_samples"))
def eval_batch(
  params: PyTree, ctx: PyTree, x: jax.Array, key: jax.Array, *, setup: Setup, num_samples: int
) -> dict[str, jax.Array]:
  """Per-example sums over ``num_samples`` importance samples (to be merged across chunks).

  Args:
    params: model and prior parameters.
    ctx: the prior's evaluation context.
    x: (B, H, W, C) binarised images.
    key: PRNG key of this chunk.
    setup: static run description.
    num_samples: S for this chunk (static).

  Returns:
    dict of (B,) arrays: ``lse_w`` (logsumexp of log weights), ``sum_w``,
    ``sum_px``, ``sum_kl`` (sums over the chunk's samples), ``max_err`` (the
    largest certified error of a pruned prior evaluation; 0 when exact).
  """
  log_w, log_px, log_pz, log_qz, err = log_importance_weights(
    params, setup, ctx, x, key, num_samples, with_error=True
  )
  return {
    "lse_w": jax.nn.logsumexp(log_w, axis=1),
    "sum_w": log_w.sum(1),
    "sum_px": log_px.sum(1),
    "sum_kl": (log_qz - log_pz).sum(1),
    "max_err": err.max(1),
  }


@functools.partial(jax.jit, static_argnames=("setup", "num_samples"))
def picture_batch(
  params: PyTree, ctx: PyTree, x: jax.Array, key: jax.Array, *, setup: Setup, num_samples: int
) -> tuple[jax.Array, jax.Array]:
  """Prior samples and reconstructions of ``x``, as mean images.

  Args:
    params: model and prior parameters.
    ctx: the prior's evaluation context.
    x: (B, H, W, C) images to reconstruct (from their posterior means).
    key: PRNG key of the prior samples.
    setup: static run description.
    num_samples: how many prior samples (static).

  Returns:
    ``(samples (num_samples, H, W, C), reconstructions (B, H, W, C))``.
  """
  z = setup.prior.sample(params["prior"], key, num_samples, ctx)
  samples = setup.mean_fn(setup.model.decode(params["model"], z))
  mu, _ = setup.model.encode(params["model"], x)
  recons = setup.mean_fn(setup.model.decode(params["model"], mu))
  return samples, recons


# ----------------------------------------------------------------------------
# A whole split, in bounded chunks
# ----------------------------------------------------------------------------


def _score_batch(
  params: PyTree,
  setup: Setup,
  ctx: PyTree,
  xb: jax.Array,
  key: jax.Array,
  num_samples: int,
  chunk: int,
) -> dict[str, np.ndarray]:
  """The scores of one (padded) batch: ``num_samples`` samples in chunks of ``chunk``.

  Chunk ``c`` uses ``fold_in(key, c)``; the chunks' sums are merged on the host
  in float64.

  Returns:
    dict of (B,) arrays, the keys of :data:`SPLIT_SCORES`.
  """
  lse, sw, spx, skl, mx = None, 0.0, 0.0, 0.0, 0.0
  remaining = num_samples
  for c in range(math.ceil(num_samples / chunk)):
    s = min(chunk, remaining)
    remaining -= s
    r = jax.device_get(
      eval_batch(params, ctx, xb, jax.random.fold_in(key, c), setup=setup, num_samples=s)
    )
    lse = r["lse_w"].astype(np.float64) if lse is None else np.logaddexp(lse, r["lse_w"])
    sw, spx, skl = sw + r["sum_w"], spx + r["sum_px"], skl + r["sum_kl"]
    mx = np.maximum(mx, r["max_err"])
  return {
    "log_px_iwae": lse - math.log(num_samples),
    "elbo": np.asarray(sw) / num_samples,
    "recon": -np.asarray(spx) / num_samples,
    "kl": np.asarray(skl) / num_samples,
    "max_err": np.asarray(mx),
  }


def _padded(xs: np.ndarray, lo: int, hi: int, batch: int) -> jax.Array:
  """Images ``lo:hi`` of ``xs`` zero-padded to ``batch`` rows (one shape: no retrace)."""
  xb = np.zeros((batch,) + xs.shape[1:], np.float32)
  xb[: hi - lo] = xs[lo:hi]
  return jnp.asarray(xb)


class _Reporters:
  """The progress of :func:`evaluate_split`: a tqdm bar (a terminal), else a line a minute."""

  def __init__(self, progress: bool, total: int, desc: str, initial: int):
    self.items = []
    if progress_lib.enabled(progress):
      from tqdm.auto import tqdm

      self.items.append(
        tqdm(total=total, initial=initial, desc=desc, unit="ex", dynamic_ncols=True)
      )
    elif progress_lib.lines_enabled(progress):
      self.items.append(progress_lib.LineReporter(total, desc, initial=initial))

  def update(self, k: int) -> None:
    for p in self.items:
      p.update(k)

  def close(self) -> None:
    for p in self.items:
      p.close()


@dataclasses.dataclass(frozen=True)
class _Batching:
  """How :func:`evaluate_split` cuts its work into calls of the jitted scorer.

  Attributes:
    m: the number of examples, M.
    num_samples: importance samples per example, S.
    chunk: importance samples per call (``min(S, max_queries)``).
    batch: examples per call (``batch * chunk <= max_queries``, at least 1).
  """

  m: int
  num_samples: int
  chunk: int
  batch: int

  @classmethod
  def plan(cls, m: int, num_samples: int, max_queries: int) -> "_Batching":
    """The largest batches that keep ``batch * chunk`` within ``max_queries``."""
    chunk = min(num_samples, max_queries)
    return cls(m, num_samples, chunk, max(1, min(m, max_queries // chunk)))

  @property
  def n_batches(self) -> int:
    """Batches over the M examples (the last one padded)."""
    return math.ceil(self.m / self.batch)


def evaluate_split(
  params: PyTree,
  setup: Setup,
  ctx: PyTree,
  xs: np.ndarray,
  key: jax.Array,
  num_samples: int,
  max_queries: int = 5000,
  progress: bool = False,
  desc: str = "eval",
  partial_path: str | None = None,
  partial_identity: dict | None = None,
  save_every_s: float = 60.0,
  stop: Callable[[], bool] | None = None,
) -> dict[str, np.ndarray]:
  """IWAE bound and ELBO terms for every example of ``xs``.

  Each example gets ``num_samples`` importance samples drawn in chunks; one
  call scores ``batch * chunk <= max_queries`` latent codes, so memory is
  bounded whatever S and the test-set size.  The last partial batch is padded
  (results discarded) so the jitted function never retraces.

  Args:
    params: model and prior parameters.
    setup: static run description.
    ctx: prior evaluation context.
    xs: (M, H, W, C) images (binarised for binary data).
    key: PRNG key; sample chunk c of batch b uses fold_in(fold_in(key, b), c).
    num_samples: S.
    max_queries: bound on batch * chunk.
    progress: show a tqdm bar (a terminal), else a plain line a minute.
    desc: bar label.
    partial_path: if given, the scores of the finished batches are saved there
      (an ``.npz``, atomically) every ``save_every_s`` seconds, and a call that
      finds a file there made with the same ``partial_identity``, sizes and key
      starts after its last batch: a stopped evaluation loses at most
      ``save_every_s`` seconds of work and ends with the scores an
      uninterrupted one gives (batch ``b`` always uses the same key). The
      caller removes the file once the results are safe.
    partial_identity: JSON-able description of everything else the scores
      depend on (parameters, images, prior settings).
    save_every_s: seconds between two saves.
    stop: a callable asked after each batch (SIGTERM): when it returns True, the
      finished batches are saved to ``partial_path`` and errors.Interrupted is raised.

  Returns:
    dict of (M,) float64 arrays: ``log_px_iwae`` (the IWAE bound on log p(x)),
    ``elbo``, ``recon`` (-E log p(x|z)), ``kl`` (E[log q - log p]), ``max_err``
    (certified: the exact-prior IWAE estimate lies in
    ``[log_px_iwae, log_px_iwae + max_err]``; 0 unless pruning is on).
  """
  plan = _Batching.plan(xs.shape[0], num_samples, max_queries)
  m, batch, chunk, n_batches = plan.m, plan.batch, plan.chunk, plan.n_batches
  out = {k: np.zeros(m, np.float64) for k in SPLIT_SCORES}
  identity, start = _open_partial(partial_path, partial_identity, key, out, plan, desc)
  reporters = _Reporters(progress, m, desc, initial=min(start * batch, m))
  last_save = time.time()
  for b in range(start, n_batches):
    lo, hi = b * batch, min((b + 1) * batch, m)
    scores = _score_batch(
      params, setup, ctx, _padded(xs, lo, hi, batch), jax.random.fold_in(key, b), num_samples, chunk
    )
    for k in SPLIT_SCORES:
      out[k][lo:hi] = scores[k][: hi - lo]
    reporters.update(hi - lo)
    if b + 1 == n_batches:
      break
    if partial_path is not None and time.time() - last_save >= save_every_s:
      _write_partial(partial_path, identity, out, b + 1)
      last_save = time.time()
    if stop is not None and stop():
      reporters.close()
      _interrupted(partial_path, identity, out, b + 1, hi, m, desc)
  reporters.close()
  return out


def _open_partial(
  partial_path: str | None,
  partial_identity: dict | None,
  key: jax.Array,
  out: dict[str, np.ndarray],
  plan: _Batching,
  desc: str,
) -> tuple[str | None, int]:
  """The identity of :func:`evaluate_split`'s partial-scores file, and the batch to start at.

  The scores of a file found at ``partial_path`` with the same identity are read into
  ``out`` (see :func:`_read_partial`) and the resumption is announced.

  Args:
    partial_path: where the partial scores are kept (None: not kept).
    partial_identity: the caller's part of the identity (what else the scores depend on).
    key: the evaluation's PRNG key (part of the identity).
    out: the (M,) score arrays, filled in place from the file.
    plan: how the examples are cut into batches (part of the identity).
    desc: the evaluation's label, for the message.

  Returns:
    ``(identity, start)``: the identity as canonical JSON and the first batch still to
    score; ``(None, 0)`` without ``partial_path``.
  """
  if partial_path is None:
    return None, 0
  m, batch = plan.m, plan.batch
  identity = atomic.dumps(
    {
      "given": partial_identity,
      "m": int(m),
      "batch": int(batch),
      "chunk": int(plan.chunk),
      "num_samples": int(plan.num_samples),
      "key": np.asarray(jax.random.key_data(key)).tolist(),
    },
    sort_keys=True,
  )
  start = _read_partial(partial_path, identity, out, plan.n_batches)
  if start:
    print(
      f"{desc}: resuming after {min(start * batch, m)} of {m} examples "
      f"(scores saved in {partial_path})",
      flush=True,
    )
  return identity, start


def _interrupted(
  partial_path: str | None,
  identity: str | None,
  out: dict[str, np.ndarray],
  done: int,
  hi: int,
  m: int,
  desc: str,
) -> None:
  """Saves the first ``done`` batches (``hi`` examples) and raises errors.Interrupted."""
  kept = "no scores are kept (no partial_path)"
  if partial_path is not None:
    _write_partial(partial_path, identity, out, done)
    kept = f"the scores of the first {hi} are kept in {partial_path}"
  raise errors.Interrupted(
    f"SIGTERM after {hi} of {m} examples ({desc}): {kept}; run the "
    "same command to go on from there."
  )


def _write_partial(path: str, identity: str, out: dict[str, np.ndarray], done: int) -> None:
  """Saves the scores of the first ``done`` batches of :func:`evaluate_split` (primary only)."""
  if distributed.is_primary():
    resumable.save(path, identity, {**out, "done_batches": np.int64(done)})


def _read_partial(path: str, identity: str, out: dict[str, np.ndarray], n_batches: int) -> int:
  """Fills ``out`` from a saved partial evaluation; returns its finished batches (0: none).

  A missing file gives 0; an unreadable one, one made with another identity or
  one of other sizes gives 0 with a line that says so.
  """
  saved = resumable.load(
    path,
    identity,
    {**out, "done_batches": np.int64(0)},
    what="partial evaluation",
    other="parameters or settings",
    restart="starting from the first example",
  )
  if saved is None:
    return 0
  done = int(saved["done_batches"])
  if not 0 <= done <= n_batches:
    print(
      f"{path}: a partial evaluation with other sizes; starting from the first example", flush=True
    )
    return 0
  for k in out:
    out[k][:] = saved[k]
  return done
