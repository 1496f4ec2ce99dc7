"""Training: train state, the jitted train step, the epoch loop, checkpoints and resume.

One batch end to end: the epoch permutation (a pure function of the seed and
the epoch) lives on the device; :func:`train_step` slices the batch ids out of
it, gathers the images from the training pool, binarises them with a key
``fold_in(base_key, step)``, builds the prior's context (exemplars encoded with
gradients, RAT neighbours, pseudo-inputs), and applies one optax update.  Since
every random choice is a function of (seed, step), a run resumed from a
checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from exvae import (atomic, checkpoints, data, distributed, pictures, plugins, rng, rundir,
                   runinfo, writers)
from exvae import progress as progress_lib
from exvae.likelihoods import get_likelihood
from exvae.models import check_matmul_dtype, make_model
from exvae.objectives import Setup, check_objective, kl_beta, log_importance_weights
from exvae.optim import make_optimizer
from exvae.priors import checks as prior_checks
from exvae.priors import make_prior

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Raised when a training step produced a non-finite loss or gradient."""


class NonFiniteValidationError(NonFiniteLossError):
  """Raised when the validation loss is not finite (the last good checkpoint is kept)."""


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed as is).

  Attributes:
    step: global step (int32 scalar).
    params: ``{"model": ..., "prior": ...}``.
    opt_state: optax state.
    prior_state: the prior's non-learnable state (RAT cache).
    key: base PRNG key; step keys are ``fold_in(key, step)``.
    nonfinite: number of steps skipped because of a non-finite loss/gradient.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  prior_state: PyTree
  key: jax.Array
  nonfinite: jax.Array


# ----------------------------------------------------------------------------
# Building a run
# ----------------------------------------------------------------------------


def validate_config(config) -> None:
  """Raises ValueError on values that cannot work (before any data is loaded)."""
  if config.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}.")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}.")
  if config.latent_dim < 1:
    raise ValueError(f"latent_dim must be >= 1, got {config.latent_dim}.")
  if config.eval.num_importance_samples < 1:
    raise ValueError("eval.num_importance_samples must be >= 1.")
  if config.pool_sharding not in distributed.POOL_SHARDING:
    raise ValueError(f"pool_sharding must be one of {distributed.POOL_SHARDING}, "
                     f"got {config.pool_sharding!r}.")
  check_matmul_dtype(config)        # value, and whether the model implements it
  check_objective(config.objective, config.objective_samples, config.gradient_estimator)
  rundir.check_config(config)       # cadences, keep_checkpoints, a finite learning rate


def load_data(config) -> data.Splits:
  """Loads the configured data set (clear DataNotFoundError if missing)."""
  return data.load(
      config.dataset, data_dir=config.data_dir or None, source=config.data_source,
      val_size=config.val_size or None, eval_binarize_seed=config.eval_binarize_seed,
      eval_binarize=config.get("eval_binarize", "exvae"),
      max_train=config.max_train or None, max_test=config.max_test or None,
      likelihood=config.likelihood)


def make_setup(config, splits: data.Splits, pool_sharded: bool = False) -> Setup:
  """Builds the static run description from the config and the data.

  Args:
    config: the run's ConfigDict.
    splits: the loaded data.
    pool_sharded: the training pool will be split along N over the ``data``
      mesh (see :func:`make_pool`).
  """
  validate_config(config)
  n = splits.train_x.shape[0]
  if config.batch_size > n:
    raise ValueError(f"batch_size {config.batch_size} exceeds the training set size {n}.")
  rundir.check_config(config, num_train=n)   # num_exemplars, rat_k vs the training set
  model = make_model(config, splits.image_shape)
  if config.gradient_estimator == "dreg" and not _accepts_keyword(model.score, "path_weight"):
    raise ValueError(f"gradient_estimator='dreg' needs the model's score(..., path_weight=...) "
                     f"(docs/objectives.md); model {config.model!r} does not take it.")
  prior = make_prior(config.prior, config)
  if plugins.is_spec(config.prior):    # one traced call: shapes checked before any step
    prior_checks.check_prior_shapes(prior, model, n, config.prior)
  log_lik, mean_fn = get_likelihood(config.likelihood)
  return Setup(model=model, prior=prior, log_lik=log_lik, mean_fn=mean_fn,
               optimizer=make_optimizer(config), binary=bool(splits.binary),
               batch_size=int(config.batch_size), steps_per_epoch=n // int(config.batch_size),
               warmup_epochs=int(config.warmup_epochs), num_train=n,
               pool_sharded=bool(pool_sharded),
               binary_exemplars=bool(splits.binary) and bool(config.exemplar.binarize_exemplars),
               objective=str(config.objective), objective_samples=int(config.objective_samples),
               gradient_estimator=str(config.gradient_estimator))


def _accepts_keyword(fn, name: str) -> bool:
  """Whether ``fn`` can be called with the keyword argument ``name``."""
  import inspect
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def make_pool(config, splits: data.Splits, mesh) -> tuple[jax.Array, bool]:
  """Places the training pool on the mesh as ``config.pool_sharding`` says.

  Returns:
    ``(pool, sharded)``: the pool (replicated, or split along N with each
    host placing only the rows its devices hold) and whether it is split.
  """
  sharded = distributed.pool_is_sharded(config.pool_sharding, mesh)
  n = splits.train_x.shape[0]
  if not sharded:
    return distributed.place_pool(splits.train_x, n, mesh, False), False
  start, stop = distributed.pool_rows_of_this_host(n, mesh)
  return distributed.place_pool(splits.train_x[start:stop], n, mesh, True, start=start), True


def init_state(config, setup: Setup, num_train: int) -> TrainState:
  """Fresh train state from ``config.seed``."""
  key = jax.random.PRNGKey(config.seed)
  k_model, k_prior, k_run = jax.random.split(key, 3)
  params = {"model": setup.model.init(k_model),
            "prior": setup.prior.init(k_prior, setup.model, num_train)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=setup.optimizer.init(params),
                    prior_state=setup.prior.init_state(setup.model, num_train),
                    key=k_run, nonfinite=jnp.zeros((), jnp.int32))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training set in ``epoch``: a pure function of (seed, epoch)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int32)


# ----------------------------------------------------------------------------
# Jitted steps (module level; `setup` is static and hashed by identity)
# ----------------------------------------------------------------------------


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_batch(base_key: jax.Array, step: jax.Array, pool: jax.Array, perm: jax.Array, *,
                setup: Setup) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The batch of one training step, and the key left for the loss.

  The step key is ``fold_in(base_key, step)`` (so a resumed run draws the
  same batches and noise); binary data sets are binarised afresh at every
  step from that key (dynamic binarisation: an image seen in another epoch
  gets other bits), while validation and test images are binarised once
  with a fixed seed when the data is loaded.

  Args:
    base_key: the run's base PRNG key.
    step: global step (scalar int32).
    pool: (N, H, W, C) training images in [0, 1].
    perm: (N,) int32 this epoch's permutation of the training set.
    setup: static run description.

  Returns:
    ``(x (B, H, W, C), ids (B,) int32 rows of the pool, loss key)``.
  """
  key = jax.random.fold_in(base_key, step)
  k_bin, k_loss = jax.random.split(key)
  i = step % setup.steps_per_epoch
  ids = jax.lax.dynamic_slice(perm, (i * setup.batch_size,), (setup.batch_size,))
  # Data parallel over the mesh, if any (a split pool: each device sends the rows it owns).
  x = distributed.shard_batch(distributed.take_rows(pool, ids, setup.pool_sharded))
  if setup.binary:
    x = rng.bernoulli_rows(k_bin, x, ids)          # dynamic binarisation, fresh every step
  return x, ids, k_loss


def _train_step(state: TrainState, pool: jax.Array, perm: jax.Array, *, setup: Setup):
  """One optimisation step.

  Args:
    state: the train state (donated).
    pool: (N, H, W, C) training images in [0, 1] (the exemplar pool too).
    perm: (N,) int32 this epoch's permutation of the training set.
    setup: static run description.

  Returns:
    ``(new_state, metrics)``.  If the loss or a gradient is not finite, the
    parameters are left unchanged and ``state.nonfinite`` is incremented; the
    host loop raises :class:`NonFiniteLossError` at its next check.
  """
  step = state.step
  x, ids, k_loss = train_batch(state.key, step, pool, perm, setup=setup)
  beta = kl_beta(step, setup.steps_per_epoch, setup.warmup_epochs)
  grad_fn = jax.value_and_grad(setup.loss_fn(), has_aux=True)
  (loss, (metrics, new_prior_state)), grads = grad_fn(
      state.params, state.prior_state, setup, x, ids, k_loss, beta, pool)
  ok = jnp.isfinite(loss) & _tree_all_finite(grads)

  def update(params_and_opt):
    params, opt_state = params_and_opt
    updates, opt_state = setup.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # The update runs only when it is finite.  A cond, not a select between the old
  # and the new values: with the select XLA copied every donated parameter and
  # moment each step (44 copies); the cond updates them in place.  Measured on a
  # quiet 2-core CPU: the Gaussian step 1.16x faster, RAT 1.02x, exact 0.98x
  # (within its noise); parameters after a step agree to 3e-8.
  new_params, new_opt_state = jax.lax.cond(ok, update, lambda po: po,
                                           (state.params, state.opt_state))
  new_state = TrainState(
      # The step always advances (the host loop counts steps itself, without a
      # device sync); a skipped update is recorded in `nonfinite`.
      step=step + 1,
      params=new_params,
      opt_state=new_opt_state,
      # Not guarded: a select over the RAT cache (N x d) would defeat in-place
      # donation and cost a full copy per step (measured 25.7 -> 16.5 ms/step).
      # A non-finite step is never checkpointed, so its cache writes are moot.
      prior_state=new_prior_state,
      key=state.key,
      nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
  metrics = dict(metrics, **setup.prior.describe(state.params["prior"]))
  return new_state, metrics


# The jitted step: state donated (updated in place), setup static (identity hash).
train_step = jax.jit(_train_step, static_argnames=("setup",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("state",))
def refresh_step(state: TrainState, pool: jax.Array, *, setup: Setup) -> TrainState:
  """Epoch-start hook of the prior (RAT: re-encode the whole cache, no gradients)."""
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 0x5EED)
  inputs = setup.context_inputs(pool, key)
  prior_state = setup.prior.refresh(state.params["prior"], state.prior_state, setup.model,
                                    state.params["model"], inputs)
  return state.replace(prior_state=prior_state)


@functools.partial(jax.jit, static_argnames=("setup",))
def eval_context(params: PyTree, pool: jax.Array, key: jax.Array, *, setup: Setup):
  """The prior's evaluation context (exemplar prior: ALL training exemplars, no gradients)."""
  inputs = setup.context_inputs(pool, key)
  ctx, _ = setup.prior.context(params["prior"], {}, setup.model, params["model"], inputs,
                               train=False)
  return jax.lax.stop_gradient(ctx)


@functools.partial(jax.jit, static_argnames=("setup", "num_samples"))
def eval_batch(params: PyTree, ctx: PyTree, x: jax.Array, key: jax.Array, *, setup: Setup,
               num_samples: int) -> dict[str, jax.Array]:
  """Per-example sums over ``num_samples`` importance samples (to be merged across chunks).

  Args:
    params: model and prior parameters.
    ctx: the prior's evaluation context.
    x: (B, H, W, C) binarised images.
    key: PRNG key of this chunk.
    num_samples: S for this chunk (static).

  Returns:
    dict of (B,) arrays: ``lse_w`` (logsumexp of log weights), ``sum_w``,
    ``sum_px``, ``sum_kl`` (sums over the chunk's samples), ``max_err`` (the
    largest certified error of a pruned prior evaluation; 0 when exact).
  """
  log_w, log_px, log_pz, log_qz, err = log_importance_weights(
      params, setup, ctx, x, key, num_samples, with_error=True)
  return {"lse_w": jax.nn.logsumexp(log_w, axis=1), "sum_w": log_w.sum(1),
          "sum_px": log_px.sum(1), "sum_kl": (log_qz - log_pz).sum(1),
          "max_err": err.max(1)}


@functools.partial(jax.jit, static_argnames=("setup", "num_samples"))
def picture_batch(params, ctx, x, key, *, setup: Setup, num_samples: int):
  """Prior samples (num_samples images) and reconstructions of ``x`` (mean images)."""
  z = setup.prior.sample(params["prior"], key, num_samples, ctx)
  samples = setup.mean_fn(setup.model.decode(params["model"], z))
  mu, _ = setup.model.encode(params["model"], x)
  recons = setup.mean_fn(setup.model.decode(params["model"], mu))
  return samples, recons


# ----------------------------------------------------------------------------
# Host-side evaluation helper (used for validation and by eval_lib)
# ----------------------------------------------------------------------------


def evaluate_split(params, setup: Setup, ctx, xs: np.ndarray, key: jax.Array,
                   num_samples: int, max_queries: int = 5000,
                   progress: bool = False, desc: str = "eval",
                   partial_path: str | None = None, partial_identity: dict | None = None,
                   save_every_s: float = 60.0, stop=None) -> dict[str, np.ndarray]:
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
      finished batches are saved to ``partial_path`` and rundir.Interrupted is raised.

  Returns:
    dict of (M,) float64 arrays: ``log_px_iwae`` (the IWAE bound on log p(x)),
    ``elbo``, ``recon`` (-E log p(x|z)), ``kl`` (E[log q - log p]), ``max_err``
    (certified: the exact-prior IWAE estimate lies in
    ``[log_px_iwae, log_px_iwae + max_err]``; 0 unless pruning is on).
  """
  m = xs.shape[0]
  chunk = min(num_samples, max_queries)
  batch = max(1, min(m, max_queries // chunk))
  n_chunks = math.ceil(num_samples / chunk)
  out = {k: np.zeros(m, np.float64) for k in ("log_px_iwae", "elbo", "recon", "kl", "max_err")}
  n_batches = math.ceil(m / batch)
  identity = None
  start = 0
  if partial_path is not None:
    identity = atomic.dumps({"given": partial_identity, "m": int(m), "batch": int(batch),
                             "chunk": int(chunk), "num_samples": int(num_samples),
                             "key": np.asarray(jax.random.key_data(key)).tolist()},
                            sort_keys=True)
    start = _read_partial(partial_path, identity, out, n_batches)
    if start:
      print(f"{desc}: resuming after {min(start * batch, m)} of {m} examples "
            f"(scores saved in {partial_path})", flush=True)
  last_save = time.time()
  bar, lines = None, None
  if progress_lib.enabled(progress):
    from tqdm.auto import tqdm
    bar = tqdm(total=m, initial=min(start * batch, m), desc=desc, unit="ex",
               dynamic_ncols=True)
  elif progress_lib.lines_enabled(progress):
    lines = progress_lib.LineReporter(m, desc, initial=min(start * batch, m))
  for b in range(start, n_batches):
    lo, hi = b * batch, min((b + 1) * batch, m)
    xb = np.zeros((batch,) + xs.shape[1:], np.float32)
    xb[: hi - lo] = xs[lo:hi]
    xb = jnp.asarray(xb)
    lse, sw, spx, skl, mx = None, 0.0, 0.0, 0.0, 0.0
    remaining = num_samples
    for c in range(n_chunks):
      s = min(chunk, remaining)
      remaining -= s
      r = eval_batch(params, ctx, xb, jax.random.fold_in(jax.random.fold_in(key, b), c),
                     setup=setup, num_samples=s)
      r = jax.device_get(r)
      lse = r["lse_w"].astype(np.float64) if lse is None else np.logaddexp(lse, r["lse_w"])
      sw, spx, skl = sw + r["sum_w"], spx + r["sum_px"], skl + r["sum_kl"]
      mx = np.maximum(mx, r["max_err"])
    k = hi - lo
    out["log_px_iwae"][lo:hi] = (lse - math.log(num_samples))[:k]
    out["elbo"][lo:hi] = (np.asarray(sw) / num_samples)[:k]
    out["recon"][lo:hi] = (-np.asarray(spx) / num_samples)[:k]
    out["kl"][lo:hi] = (np.asarray(skl) / num_samples)[:k]
    out["max_err"][lo:hi] = np.asarray(mx)[:k]
    for p in (bar, lines):
      if p is not None:
        p.update(k)
    if partial_path is not None and b + 1 < n_batches and time.time() - last_save >= save_every_s:
      _write_partial(partial_path, identity, out, b + 1)
      last_save = time.time()
    if stop is not None and b + 1 < n_batches and stop():
      kept = "no scores are kept (no partial_path)"
      if partial_path is not None:
        _write_partial(partial_path, identity, out, b + 1)
        kept = f"the scores of the first {hi} are kept in {partial_path}"
      for p in (bar, lines):
        if p is not None:
          p.close()
      raise rundir.Interrupted(f"SIGTERM after {hi} of {m} examples ({desc}): {kept}; run the "
                               "same command to go on from there.")
  for p in (bar, lines):
    if p is not None:
      p.close()
  return out


def _write_partial(path: str, identity: str, out: dict[str, np.ndarray], done: int) -> None:
  """Saves the scores of the first ``done`` batches of :func:`evaluate_split` (primary only)."""
  if not distributed.is_primary():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write_npz_checked(path, {**out, "done_batches": np.int64(done),
                                  "identity": np.str_(identity)})


def _read_partial(path: str, identity: str, out: dict[str, np.ndarray], n_batches: int) -> int:
  """Fills ``out`` from a saved partial evaluation; returns its finished batches (0: none).

  A missing file, an unreadable one or one made with another identity gives 0
  (the last two with a line that says so).
  """
  if not os.path.exists(path):
    return 0
  try:
    f = atomic.read_npz_checked(path)       # its arrays match the digest written with them
    same = str(f["identity"]) == identity
    done = int(f["done_batches"])
    saved = {k: np.asarray(f[k], np.float64) for k in out} if same else None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    print(f"{path}: unreadable partial evaluation ({type(e).__name__}: {e}); starting from "
          "the first example", flush=True)
    return 0
  if saved is None:
    print(f"{path}: a partial evaluation of other parameters or settings; starting from "
          "the first example", flush=True)
    return 0
  if not 0 <= done <= n_batches or any(v.shape != out[k].shape for k, v in saved.items()):
    print(f"{path}: a partial evaluation with other sizes; starting from the first example",
          flush=True)
    return 0
  for k, v in saved.items():
    out[k][:] = v
  return done


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def _append_jsonl(path: str, record: dict) -> None:
  """Appends a record to ``metrics.jsonl`` (strict JSON: non-finite values become null)."""
  if not distributed.is_primary():
    return
  atomic.append_line(path, atomic.dumps(atomic.finite_or_none(record)), fsync=False)
  writers.write(path, record)        # TensorBoard, if open for this workdir


def _to_float(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def validate(state: TrainState, setup: Setup, pool, splits: data.Splits, config, workdir: str,
             epoch: int) -> dict[str, float]:
  """Validation loss (full exemplar bank, beta = 1) and a picture.

  The loss is the negative of the training objective's bound: the ELBO with
  one sample per example, or under ``objective='iwae'`` the IWAE bound with
  the same k samples as training.
  """
  ctx = eval_context(state.params, pool, jax.random.PRNGKey(config.eval.bank_seed), setup=setup)
  res = evaluate_split(state.params, setup, ctx, splits.val_x, jax.random.PRNGKey(7),
                       num_samples=setup.objective_samples, max_queries=config.eval.max_queries)
  bound = res["log_px_iwae"] if setup.objective == "iwae" else res["elbo"]
  metrics = {"val_loss": float(-bound.mean()), "val_recon": float(res["recon"].mean()),
             "val_kl": float(res["kl"].mean())}
  n_pic = int(config.num_picture_samples)
  if n_pic > 0:
    xv = jnp.asarray(splits.val_x[: min(n_pic // 2, splits.val_x.shape[0])])
    samples, recons = picture_batch(state.params, ctx, xv, jax.random.PRNGKey(epoch),
                                    setup=setup, num_samples=n_pic)
    path = os.path.join(workdir, "pictures", f"epoch_{epoch + 1:05d}.png")
    if distributed.is_primary():
      pictures.save_samples_and_reconstructions(path, np.asarray(samples), np.asarray(xv),
                                                np.asarray(recons))
    metrics["picture"] = path
  return metrics


def early_stopping_update(meta: dict, val_loss: float, epoch: int, warmup_epochs: int) -> bool:
  """Records one validated epoch in ``meta`` (in place), as the reference counts.

  An improvement (or the first epoch) sets ``best_val``/``best_epoch`` and
  resets ``bad_epochs``; otherwise the epoch counts as bad from the last
  warm-up epoch on (1-based ``epoch + 1 >= warmup_epochs``; earlier ones are
  not counted), exactly the reference's ``e += 1; if epoch < warmup: e = 0``.

  Args:
    meta: the run's bookkeeping (``best_val``, ``best_epoch``, ``bad_epochs``).
    val_loss: this epoch's validation loss.
    epoch: 0-based epoch that was validated.
    warmup_epochs: KL warm-up length.

  Returns:
    Whether the epoch improved on the best validation loss.
  """
  if meta["best_val"] is None or val_loss < meta["best_val"]:
    meta.update(best_val=val_loss, best_epoch=epoch, bad_epochs=0)
    return True
  if epoch + 1 >= warmup_epochs:
    meta["bad_epochs"] += 1
  return False


def should_stop_early(meta: dict, patience: int) -> bool:
  """The reference stops once MORE than ``patience`` validated epochs were bad."""
  return meta["bad_epochs"] > patience


def _summary_meta(meta: dict) -> dict:
  """The checkpoint's bookkeeping as the summary reports it: ``best_epoch`` 1-based
  (0: no validated epoch), as printed and as every other record counts epochs."""
  return dict(meta, best_epoch=int(meta.get("best_epoch", -1)) + 1)


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains on all devices of a data mesh (``config.num_devices``; see :func:`_train`).

  The workdir is held by :class:`exvae.rundir.Writer` meanwhile: an exclusive
  lock (a second writer fails at once), the config check on resume
  (``allow_config_change``: accept changes to the model, data or optimisation)
  and the history check of a fresh start (``overwrite``: move an earlier run's
  files into ``<workdir>/previous/<time>/`` instead of refusing).
  """
  validate_config(config)
  with rundir.Writer(workdir, config, primary=distributed.is_primary(),
                     allow_config_change=allow_config_change, overwrite=overwrite):
    with distributed.data_mesh(int(config.num_devices)) as mesh:
      if mesh is not None and int(config.batch_size) % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{mesh.size} data-parallel devices.")
      return _train(config, workdir, mesh, allow_config_change)


def _train(config, workdir: str, mesh, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains with validation-based early stopping; resumes from ``workdir`` if possible.

  Args:
    config: a ConfigDict (see ``configs/``).
    workdir: output directory: checkpoints/, metrics.jsonl, pictures/, config.json.

  Returns:
    A summary dict: final step, epochs, best validation loss and epoch, wall time.

  Raises:
    NonFiniteLossError: a step produced a non-finite loss, or the validation
      loss is not finite (:class:`NonFiniteValidationError`); the last good
      checkpoint is left intact (a state after non-finite steps is never saved).
    rundir.DiskFullError: a save failed for lack of space; training stops there.
    rundir.Interrupted: SIGTERM; a checkpoint of the current step was saved.
  """
  os.makedirs(workdir, exist_ok=True)
  splits = load_data(config)
  data.validate_images(splits.train_x, name="training images")
  validate_config(config)
  pool, pool_sharded = make_pool(config, splits, mesh)
  setup = make_setup(config, splits, pool_sharded)
  n = splits.train_x.shape[0]
  spe = setup.steps_per_epoch
  primary = distributed.is_primary()   # config.json: written by rundir.Writer
  rundir.check_data_identity(workdir, splits.identity, resuming=rundir.has_checkpoint(workdir),
                             allow_change=allow_config_change, write=primary)

  state = distributed.replicate(init_state(config, setup, n), mesh)
  manager = checkpoints.Manager(os.path.join(workdir, "checkpoints"),
                                max_to_keep=int(config.keep_checkpoints))
  meta = {"epochs_validated": 0, "best_val": None, "best_epoch": -1, "bad_epochs": 0,
          "early_stopped": False}
  best_params = jax.tree.map(jnp.copy, state.params)   # never aliased with donated buffers
  try:
    restored = manager.restore_latest(state, best_params)
  except checkpoints.CheckpointNotFoundError:
    manager.close()
    raise
  if restored is not None:
    state, best_params, meta = restored
    # Restored as host-layout arrays: place them on this run's mesh (which may
    # have a different device count than the run that wrote the checkpoint).
    state, best_params = distributed.replicate((state, best_params), mesh)
    logging.info("Resumed from step %d.", int(state.step))
    print(f"Resumed from checkpoint at step {int(state.step)} in {workdir}.", flush=True)
  metrics_path = os.path.join(workdir, rundir.METRICS_FILE)
  if primary:    # steps after the restored one are trained (and logged) again
    rundir.trim_metrics(metrics_path, int(state.step))
    rundir.check_metrics_cover(metrics_path, int(state.step), int(config.log_every_steps), spe)
  summary = {"workdir": workdir, "dataset": splits.name, "data_source": splits.source,
             "prior": config.prior, "num_train": n, "steps_per_epoch": spe}
  if splits.identity is not None:    # a user's data set: its path (or plug-in) and SHA-256
    summary["data_identity"] = splits.identity
  if meta.get("early_stopped"):
    print("Training already early-stopped in this workdir; nothing to do.", flush=True)
    return dict(summary, step=int(state.step), finished=True, **_summary_meta(meta))

  if primary:   # which machine trains from here (a run may move between machines)
    atomic.append_line(os.path.join(workdir, rundir.MACHINES_FILE), atomic.dumps(
        {"step": int(state.step), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         **runinfo.machine()}))
  tb = bool(config.tensorboard) and primary
  writers.open_run(workdir, enabled=tb,
                   replay=rundir.read_metrics(metrics_path)[0] if tb else None)
  max_steps = int(config.num_epochs) * spe
  if config.max_steps:
    max_steps = min(max_steps, int(config.max_steps))
  last_saved = int(state.step)
  saved_any = restored is not None
  t_start = time.time()
  stop = []                     # SIGTERM: finish the step, save, stop
  prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
  save_failed = False
  diverged = False              # non-finite validation: keep the last good checkpoint

  def nonfinite_error(what, m=None):
    good = (f"The last good checkpoint (step {last_saved}) is intact in {manager.directory}"
            if saved_any else
            f"No checkpoint was written (nothing in {manager.directory} is from this run)")
    bad = [f"{k}={m[k]}" for k in ("recon", "kl") if m and k in m and not math.isfinite(m[k])]
    todo = ("Try a lower learning_rate." if not plugins.is_spec(config.prior) else
            f"The prior is the plug-in {config.prior!r}: check that its log_prob stays finite "
            f"(it enters the KL term{': ' + ', '.join(bad) if bad else ''}), or try a lower "
            "learning_rate.")
    return NonFiniteLossError(f"Non-finite loss or gradient {what}; the update was skipped and "
                              f"training stopped. {good}. {todo}")

  def save(force_meta=None):
    nonlocal last_saved, saved_any, save_failed
    if int(state.nonfinite) > 0:      # never save a state after skipped steps
      raise nonfinite_error(f"by step {int(state.step)}")
    try:
      manager.save(int(state.step), state, best_params, force_meta or meta)
    except BaseException:
      save_failed = True
      raise
    last_saved, saved_any = int(state.step), True

  def maybe_validate():
    """Runs validation for every completed epoch not validated yet (also after a resume)."""
    nonlocal best_params, meta, diverged
    step = int(state.step)
    while meta["epochs_validated"] < step // spe:
      epoch = meta["epochs_validated"]           # 0-based epoch that just finished
      if (epoch + 1) % int(config.val_every_epochs) == 0 or step >= max_steps:
        vm = validate(state, setup, pool, splits, config, workdir, epoch)
        bad = [k for k in ("val_loss", "val_recon", "val_kl") if not math.isfinite(vm[k])]
        if bad:
          diverged = True
          good = (f"the last good checkpoint (step {last_saved}) is intact in "
                  f"{manager.directory}" if saved_any else
                  f"no checkpoint was written (nothing in {manager.directory} is from this run)")
          raise NonFiniteValidationError(
              f"Non-finite validation loss at epoch {epoch + 1} (step {step}: "
              f"{', '.join(f'{k}={vm[k]}' for k in bad)}); training stopped and {good}. "
              "The model or prior diverges at evaluation: try a lower learning_rate.")
        improved = early_stopping_update(meta, vm["val_loss"], epoch, int(config.warmup_epochs))
        if improved:
          best_params = jax.tree.map(jnp.copy, state.params)
        record = dict(vm, epoch=epoch + 1, step=step, best_val=meta["best_val"],
                      bad_epochs=meta["bad_epochs"], time=time.time() - t_start)
        _append_jsonl(metrics_path, record)
        print(f"epoch {epoch + 1}: val_loss={vm['val_loss']:.3f} (best {meta['best_val']:.3f} "
              f"at epoch {meta['best_epoch'] + 1})", flush=True)
      meta["epochs_validated"] = epoch + 1

  from tqdm.auto import tqdm
  bar = tqdm(total=max_steps, initial=int(state.step), desc="train", unit="step",
             dynamic_ncols=True, disable=not progress_lib.enabled(config.progress and primary))
  try:
    maybe_validate()
    perm_epoch, perm = -1, None
    host_step = int(state.step)    # tracked on the host: no device sync per step
    while host_step < max_steps:
      if should_stop_early(meta, int(config.early_stopping_patience)):
        print(f"Early stopping: no improvement for {meta['bad_epochs']} epochs.", flush=True)
        meta["early_stopped"] = True
        break
      step = host_step
      epoch = step // spe
      if epoch != perm_epoch:
        perm = distributed.replicate(jnp.asarray(epoch_permutation(config.seed, epoch, n)), mesh)
        perm_epoch = epoch
      if step % spe == 0:
        state = refresh_step(state, pool, setup=setup)
      state, metrics = train_step(state, pool, perm, setup=setup)
      host_step = new_step = step + 1
      if new_step % int(config.log_every_steps) == 0 or new_step % spe == 0:
        m = _to_float(metrics)
        if int(state.nonfinite) > 0:
          raise nonfinite_error(f"by step {int(state.step)} (loss={m['loss']})", m)
        _append_jsonl(metrics_path, dict(m, step=new_step, epoch=new_step / spe,
                                         time=time.time() - t_start))
        bar.set_postfix(progress_lib.train_postfix(m, new_step, spe, meta["best_val"]))
      bar.update(1)
      if new_step % spe == 0:
        maybe_validate()
        save()
      elif new_step % int(config.checkpoint_every_steps) == 0:
        save()
      if stop:
        break
    if not stop:
      maybe_validate()
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, prev_handler)
    # Save on every exit path, but never a state that went non-finite, and
    # not again after a failed save (a full disk).
    failing = sys.exc_info()[1]
    if failing is not None and not isinstance(failing, Exception):
      checkpoints.silence_background_threads(crash_dumps=True)   # Ctrl-C: the one line only
    if (not save_failed and not diverged and int(state.nonfinite) == 0
        and int(state.step) != last_saved):
      try:
        save()
      except BaseException:
        if failing is None:
          raise
        checkpoints.silence_background_threads()    # the first error is the one to report
    if failing is not None:
      checkpoints.silence_background_threads()
    manager.wait_until_finished()
  if stop:
    raise rundir.Interrupted(
        f"SIGTERM at step {int(state.step)}: checkpoint saved in {manager.directory}; run the "
        "same command to resume.")
  wall = time.time() - t_start
  summary.update(step=int(state.step), epochs=int(state.step) / spe, wall_time_s=wall,
                 finished=meta["early_stopped"] or int(state.step) >= max_steps,
                 **_summary_meta(meta))
  _append_jsonl(metrics_path, {"summary": summary})
  writers.close(workdir)
  return summary
