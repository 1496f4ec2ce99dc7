"""Training: train state, the jitted train step, the epoch loop, checkpoints and resume.

One batch end to end: the epoch permutation (a pure function of the seed and
the epoch) lives on the device; :func:`train_step` slices the batch ids out of
it, gathers the images from the training pool, binarises them with a key
``fold_in(base_key, step)``, builds the prior's context (exemplars encoded with
gradients, RAT neighbours, pseudo-inputs), and applies one optax update.  Since
every random choice is a function of (seed, step), a run resumed from a
checkpoint reproduces the uninterrupted run exactly.

The loop (:func:`_train`) only steps, logs, validates and saves;
:class:`Bookkeeping` keeps what a run holds beside its train state (best
parameters, the last saved step, the checkpoint's metadata) and decides what
may be saved. Validation scores through :mod:`exvae.evaluation`; the config
is checked once, by :mod:`exvae.config_checks`.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from exvae import (
  atomic,
  checkpoints,
  config_checks,
  data,
  distributed,
  errors,
  evaluation,
  pictures,
  plugins,
  rng,
  rundir,
  runinfo,
  writers,
)
from exvae import progress as progress_lib
from exvae.likelihoods import get_likelihood
from exvae.models import make_model
from exvae.objectives import Setup, kl_beta
from exvae.optim import make_optimizer
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


def load_data(config) -> data.Splits:
  """Loads the configured data set (clear DataNotFoundError if missing)."""
  return data.load(
    config.dataset,
    data_dir=config.data_dir or None,
    source=config.data_source,
    val_size=config.val_size or None,
    eval_binarize_seed=config.eval_binarize_seed,
    eval_binarize=config.get("eval_binarize", "exvae"),
    max_train=config.max_train or None,
    max_test=config.max_test or None,
    likelihood=config.likelihood,
  )


def make_setup(config, splits: data.Splits, pool_sharded: bool = False) -> Setup:
  """Builds the static run description from the config and the data.

  Args:
    config: the run's ConfigDict.
    splits: the loaded data.
    pool_sharded: the training pool will be split along N over the ``data``
      mesh (see :func:`make_pool`).

  Runs the config checks that need the data, the model and the prior
  (:mod:`exvae.config_checks`); those that need none run before the data is loaded.
  """
  n = splits.train_x.shape[0]
  config_checks.check_sizes(config, n)  # batch_size, num_exemplars, rat_k vs the data
  model = make_model(config, splits.image_shape)
  prior = make_prior(config.prior, config)
  config_checks.check_model_and_prior(config, n, model, prior)
  log_lik, mean_fn = get_likelihood(config.likelihood)
  return Setup(
    model=model,
    prior=prior,
    log_lik=log_lik,
    mean_fn=mean_fn,
    optimizer=make_optimizer(config),
    binary=bool(splits.binary),
    batch_size=int(config.batch_size),
    steps_per_epoch=n // int(config.batch_size),
    warmup_epochs=int(config.warmup_epochs),
    num_train=n,
    pool_sharded=bool(pool_sharded),
    binary_exemplars=bool(splits.binary) and bool(config.exemplar.binarize_exemplars),
    objective=str(config.objective),
    objective_samples=int(config.objective_samples),
    gradient_estimator=str(config.gradient_estimator),
  )


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
  params = {
    "model": setup.model.init(k_model),
    "prior": setup.prior.init(k_prior, setup.model, num_train),
  }
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=setup.optimizer.init(params),
    prior_state=setup.prior.init_state(setup.model, num_train),
    key=k_run,
    nonfinite=jnp.zeros((), jnp.int32),
  )


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training set in ``epoch``: a pure function of (seed, epoch)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int32)


# ----------------------------------------------------------------------------
# Jitted steps (module level; `setup` is static and hashed by identity)
# ----------------------------------------------------------------------------


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_batch(
  base_key: jax.Array, step: jax.Array, pool: jax.Array, perm: jax.Array, *, setup: Setup
) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    x = rng.bernoulli_rows(k_bin, x, ids)  # dynamic binarisation, fresh every step
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
    state.params, state.prior_state, setup, x, ids, k_loss, beta, pool
  )
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
  new_params, new_opt_state = jax.lax.cond(
    ok, update, lambda po: po, (state.params, state.opt_state)
  )
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
    nonfinite=state.nonfinite + (~ok).astype(jnp.int32),
  )
  metrics = dict(metrics, **setup.prior.describe(state.params["prior"]))
  return new_state, metrics


# The jitted step: state donated (updated in place), setup static (identity hash).
train_step = jax.jit(_train_step, static_argnames=("setup",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("state",))
def refresh_step(state: TrainState, pool: jax.Array, *, setup: Setup) -> TrainState:
  """Epoch-start hook of the prior (RAT: re-encode the whole cache, no gradients)."""
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 0x5EED)
  inputs = setup.context_inputs(pool, key)
  prior_state = setup.prior.refresh(
    state.params["prior"], state.prior_state, setup.model, state.params["model"], inputs
  )
  return state.replace(prior_state=prior_state)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def _append_jsonl(path: str, record: dict) -> None:
  """Appends a record to ``metrics.jsonl`` (strict JSON: non-finite values become null)."""
  if not distributed.is_primary():
    return
  atomic.append_line(path, atomic.dumps(atomic.finite_or_none(record)), fsync=False)
  writers.write(path, record)  # TensorBoard, if open for this workdir


def _to_float(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def validate(
  state: TrainState, setup: Setup, pool, splits: data.Splits, config, workdir: str, epoch: int
) -> dict[str, float]:
  """Validation loss (full exemplar bank, beta = 1) and a picture.

  The loss is the negative of the training objective's bound: the ELBO with
  one sample per example, or under ``objective='iwae'`` the IWAE bound with
  the same k samples as training.
  """
  ctx = evaluation.eval_context(
    state.params, pool, jax.random.PRNGKey(config.eval.bank_seed), setup=setup
  )
  res = evaluation.evaluate_split(
    state.params,
    setup,
    ctx,
    splits.val_x,
    jax.random.PRNGKey(7),
    num_samples=setup.objective_samples,
    max_queries=config.eval.max_queries,
  )
  bound = res["log_px_iwae"] if setup.objective == "iwae" else res["elbo"]
  metrics = {
    "val_loss": float(-bound.mean()),
    "val_recon": float(res["recon"].mean()),
    "val_kl": float(res["kl"].mean()),
  }
  n_pic = int(config.num_picture_samples)
  if n_pic > 0:
    xv = jnp.asarray(splits.val_x[: min(n_pic // 2, splits.val_x.shape[0])])
    samples, recons = evaluation.picture_batch(
      state.params, ctx, xv, jax.random.PRNGKey(epoch), setup=setup, num_samples=n_pic
    )
    path = os.path.join(workdir, "pictures", f"epoch_{epoch + 1:05d}.png")
    if distributed.is_primary():
      pictures.save_samples_and_reconstructions(
        path, np.asarray(samples), np.asarray(xv), np.asarray(recons)
      )
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


def train_and_evaluate(
  config, workdir: str, *, allow_config_change: bool = False, overwrite: bool = False
) -> dict[str, Any]:
  """Trains on all devices of a data mesh (``config.num_devices``; see :func:`_train`).

  The workdir is held by :class:`exvae.rundir.Writer` meanwhile: an exclusive
  lock (a second writer fails at once), the config check on resume
  (``allow_config_change``: accept changes to the model, data or optimisation)
  and the history check of a fresh start (``overwrite``: move an earlier run's
  files into ``<workdir>/previous/<time>/`` instead of refusing).
  """
  config_checks.check_training_config(config)  # the one check of the config's values
  with rundir.Writer(
    workdir,
    config,
    primary=distributed.is_primary(),
    allow_config_change=allow_config_change,
    overwrite=overwrite,
  ):
    with distributed.data_mesh(int(config.num_devices)) as mesh:
      if mesh is not None and int(config.batch_size) % mesh.size:
        raise ValueError(
          f"batch_size {config.batch_size} is not divisible by the "
          f"{mesh.size} data-parallel devices."
        )
      return _train(config, workdir, mesh, allow_config_change)


class Bookkeeping:
  """What a training run keeps beside its train state: best parameters, last save, metadata.

  The loop hands it the current state at each logged step, epoch end and
  checkpoint (:meth:`log_step`, :meth:`validate`, :meth:`save`) and once on the
  way out (:meth:`finish`). It never saves a state that went non-finite, nor
  again after a failed save or a non-finite validation, so the last good
  checkpoint stays the newest one.

  Attributes:
    meta: the checkpoint's bookkeeping: ``epochs_validated``, ``best_val``,
      ``best_epoch`` (0-based, -1: none), ``bad_epochs``, ``early_stopped``.
    best_params: the best-on-validation parameters (never aliased with the
      donated train state).
    last_saved: the step of the newest checkpoint (the restored one at first).
    max_steps: the step training ends at (:func:`total_steps`).
    t_start: when this session of the run started (``time.time()``).
  """

  def __init__(
    self,
    config,
    workdir: str,
    setup: Setup,
    pool: jax.Array,
    splits: data.Splits,
    manager: checkpoints.Manager,
    state: TrainState,
    best_params: PyTree,
    meta: dict,
    restored: bool,
  ):
    self.config, self.workdir, self.setup = config, workdir, setup
    self.pool, self.splits, self.manager = pool, splits, manager
    self.best_params, self.meta = best_params, meta
    self.last_saved = int(state.step)
    self.saved_any = restored  # a checkpoint of this run exists
    self.save_failed = False  # a full disk: do not try again on the way out
    self.diverged = False  # non-finite validation: keep the last good checkpoint
    self.max_steps = total_steps(config, setup.steps_per_epoch)
    self.metrics_path = os.path.join(workdir, rundir.METRICS_FILE)
    self.t_start = time.time()

  @classmethod
  def restore(
    cls, config, workdir: str, setup: Setup, pool: jax.Array, splits: data.Splits, mesh
  ) -> tuple["Bookkeeping", TrainState]:
    """A fresh state and bookkeeping, or the newest good checkpoint's, placed on ``mesh``.

    Returns:
      ``(bookkeeping, state)``.

    Raises:
      checkpoints.CheckpointNotFoundError: checkpoints exist but none is readable.
    """
    state = distributed.replicate(init_state(config, setup, setup.num_train), mesh)
    manager = checkpoints.Manager(
      os.path.join(workdir, "checkpoints"), max_to_keep=int(config.keep_checkpoints)
    )
    meta = {
      "epochs_validated": 0,
      "best_val": None,
      "best_epoch": -1,
      "bad_epochs": 0,
      "early_stopped": False,
    }
    best_params = jax.tree.map(jnp.copy, state.params)  # never aliased with donated buffers
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
    book = cls(
      config,
      workdir,
      setup,
      pool,
      splits,
      manager,
      state,
      best_params,
      meta,
      restored=restored is not None,
    )
    return book, state

  def last_good(self) -> str:
    """Where the last good checkpoint is, as the errors say it (in lower case)."""
    if self.saved_any:
      return (
        f"the last good checkpoint (step {self.last_saved}) is intact in {self.manager.directory}"
      )
    return f"no checkpoint was written (nothing in {self.manager.directory} is from this run)"

  def nonfinite_error(self, what: str, m: dict | None = None) -> NonFiniteLossError:
    """The error of a non-finite loss or gradient ``what`` (``m``: the step's metrics)."""
    good = self.last_good()
    bad = [f"{k}={m[k]}" for k in ("recon", "kl") if m and k in m and not math.isfinite(m[k])]
    prior = self.config.prior
    todo = (
      "Try a lower learning_rate."
      if not plugins.is_spec(prior)
      else f"The prior is the plug-in {prior!r}: check that its log_prob stays finite "
      f"(it enters the KL term{': ' + ', '.join(bad) if bad else ''}), or try a lower "
      "learning_rate."
    )
    return NonFiniteLossError(
      f"Non-finite loss or gradient {what}; the update was skipped and "
      f"training stopped. {good[0].upper()}{good[1:]}. {todo}"
    )

  def save(self, state: TrainState) -> None:
    """Checkpoints ``state`` with the best parameters and the bookkeeping.

    Raises:
      NonFiniteLossError: ``state`` has skipped non-finite steps (it is not saved).
    """
    if int(state.nonfinite) > 0:  # never save a state after skipped steps
      raise self.nonfinite_error(f"by step {int(state.step)}")
    try:
      self.manager.save(int(state.step), state, self.best_params, self.meta)
    except BaseException:
      self.save_failed = True
      raise
    self.last_saved, self.saved_any = int(state.step), True

  def validate(self, state: TrainState) -> None:
    """Validates every completed epoch not validated yet (also after a resume).

    Logs a record per validated epoch, keeps the best parameters and counts the
    epochs without improvement (:func:`early_stopping_update`).

    Raises:
      NonFiniteValidationError: the validation loss is not finite.
    """
    config, meta, spe = self.config, self.meta, self.setup.steps_per_epoch
    step = int(state.step)
    while meta["epochs_validated"] < step // spe:
      epoch = meta["epochs_validated"]  # 0-based epoch that just finished
      if (epoch + 1) % int(config.val_every_epochs) == 0 or step >= self.max_steps:
        vm = validate(state, self.setup, self.pool, self.splits, config, self.workdir, epoch)
        bad = [k for k in ("val_loss", "val_recon", "val_kl") if not math.isfinite(vm[k])]
        if bad:
          self.diverged = True
          raise NonFiniteValidationError(
            f"Non-finite validation loss at epoch {epoch + 1} (step {step}: "
            f"{', '.join(f'{k}={vm[k]}' for k in bad)}); training stopped and "
            f"{self.last_good()}. The model or prior diverges at evaluation: try a lower "
            "learning_rate."
          )
        if early_stopping_update(meta, vm["val_loss"], epoch, int(config.warmup_epochs)):
          self.best_params = jax.tree.map(jnp.copy, state.params)
        _append_jsonl(
          self.metrics_path,
          dict(
            vm,
            epoch=epoch + 1,
            step=step,
            best_val=meta["best_val"],
            bad_epochs=meta["bad_epochs"],
            time=time.time() - self.t_start,
          ),
        )
        print(
          f"epoch {epoch + 1}: val_loss={vm['val_loss']:.3f} (best {meta['best_val']:.3f} "
          f"at epoch {meta['best_epoch'] + 1})",
          flush=True,
        )
      meta["epochs_validated"] = epoch + 1

  def log_step(self, state: TrainState, metrics: dict, step: int) -> dict[str, float]:
    """Logs the metrics of ``step`` (the host floats are returned).

    Raises:
      NonFiniteLossError: a step up to this one was skipped as non-finite.
    """
    m = _to_float(metrics)
    if int(state.nonfinite) > 0:
      raise self.nonfinite_error(f"by step {int(state.step)} (loss={m['loss']})", m)
    _append_jsonl(
      self.metrics_path,
      dict(m, step=step, epoch=step / self.setup.steps_per_epoch, time=time.time() - self.t_start),
    )
    return m

  def finish(self, state: TrainState, failing: BaseException | None) -> None:
    """Saves ``state`` on the way out (any exit), unless it would not be a good checkpoint.

    Not a state that went non-finite, nor after a failed save (a full disk) or a
    non-finite validation. When the run is failing already (``failing``), an
    error of this save is not raised over the first one.
    """
    if failing is not None and not isinstance(failing, Exception):
      checkpoints.silence_background_threads(crash_dumps=True)  # Ctrl-C: the one line only
    if (
      not self.save_failed
      and not self.diverged
      and int(state.nonfinite) == 0
      and int(state.step) != self.last_saved
    ):
      try:
        self.save(state)
      except BaseException:
        if failing is None:
          raise
        checkpoints.silence_background_threads()  # the first error is the one to report
    if failing is not None:
      checkpoints.silence_background_threads()
    self.manager.wait_until_finished()


def total_steps(config, steps_per_epoch: int) -> int:
  """The step training ends at: ``num_epochs`` epochs, or ``max_steps`` if fewer."""
  total = int(config.num_epochs) * steps_per_epoch
  return min(total, int(config.max_steps)) if config.max_steps else total


def _prepare(config, workdir: str, mesh, allow_config_change: bool):
  """Loads the data, builds the run and restores its state (see :meth:`Bookkeeping.restore`).

  Returns:
    ``(splits, pool, setup, bookkeeping, state)``.
  """
  os.makedirs(workdir, exist_ok=True)
  splits = load_data(config)
  data.validate_images(splits.train_x, name="training images")
  pool, pool_sharded = make_pool(config, splits, mesh)
  setup = make_setup(config, splits, pool_sharded)
  rundir.check_data_identity(
    workdir,
    splits.identity,
    resuming=rundir.has_checkpoint(workdir),
    allow_change=allow_config_change,
    write=distributed.is_primary(),
  )
  book, state = Bookkeeping.restore(config, workdir, setup, pool, splits, mesh)
  return splits, pool, setup, book, state


def _open_session(config, workdir: str, book: Bookkeeping, state: TrainState) -> None:
  """Trims the metrics to the restored step, records the machine, opens TensorBoard.

  A run that stopped early already only gets its metrics trimmed.
  """
  primary = distributed.is_primary()
  if primary:  # steps after the restored one are trained (and logged) again
    rundir.trim_metrics(book.metrics_path, int(state.step))
    rundir.check_metrics_cover(
      book.metrics_path, int(state.step), int(config.log_every_steps), book.setup.steps_per_epoch
    )
  if book.meta.get("early_stopped"):
    return
  if primary:  # which machine trains from here (a run may move between machines)
    atomic.append_line(
      os.path.join(workdir, rundir.MACHINES_FILE),
      atomic.dumps(
        {
          "step": int(state.step),
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          **runinfo.machine(),
        }
      ),
    )
  tb = bool(config.tensorboard) and primary
  writers.open_run(
    workdir, enabled=tb, replay=rundir.read_metrics(book.metrics_path)[0] if tb else None
  )
  book.t_start = time.time()


def _summary_head(config, workdir: str, splits: data.Splits, setup: Setup) -> dict[str, Any]:
  """The run summary's fixed part: workdir, data set (with a user data set's identity), prior
  and the epoch's size."""
  summary = {
    "workdir": workdir,
    "dataset": splits.name,
    "data_source": splits.source,
    "prior": config.prior,
    "num_train": setup.num_train,
    "steps_per_epoch": setup.steps_per_epoch,
  }
  if splits.identity is not None:  # a user's data set: its path (or plug-in) and SHA-256
    summary["data_identity"] = splits.identity
  return summary


def _progress_bar(config, book: Bookkeeping, state: TrainState):
  """The training loop's tqdm bar over all steps, starting at the restored one (shown only
  on the primary host, and as :func:`exvae.progress.enabled` allows)."""
  from tqdm.auto import tqdm

  return tqdm(
    total=book.max_steps,
    initial=int(state.step),
    desc="train",
    unit="step",
    dynamic_ncols=True,
    disable=not progress_lib.enabled(config.progress and distributed.is_primary()),
  )


def _close_run(summary: dict[str, Any], book: Bookkeeping, state: TrainState) -> dict[str, Any]:
  """Completes ``summary`` with the final step, epochs, wall time and early-stopping
  bookkeeping, logs it as the run's last record and closes the run's TensorBoard writers.

  Returns:
    The completed summary (also updated in place).
  """
  step, meta = int(state.step), book.meta
  summary.update(
    step=step,
    epochs=step / book.setup.steps_per_epoch,
    wall_time_s=time.time() - book.t_start,
    finished=meta["early_stopped"] or step >= book.max_steps,
    **_summary_meta(meta),
  )
  _append_jsonl(book.metrics_path, {"summary": summary})
  writers.close(book.workdir)
  return summary


def _train(config, workdir: str, mesh, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains with validation-based early stopping; resumes from ``workdir`` if possible.

  Args:
    config: a ConfigDict (see ``configs/``).
    workdir: output directory: checkpoints/, metrics.jsonl, pictures/, config.json.
    mesh: the data mesh (None: one device).
    allow_config_change: accept a changed data set on resume.

  Returns:
    A summary dict: final step, epochs, best validation loss and epoch, wall time.

  Raises:
    NonFiniteLossError: a step produced a non-finite loss, or the validation
      loss is not finite (:class:`NonFiniteValidationError`); the last good
      checkpoint is left intact (a state after non-finite steps is never saved).
    errors.DiskFullError: a save failed for lack of space; training stops there.
    errors.Interrupted: SIGTERM; a checkpoint of the current step was saved.
  """
  splits, pool, setup, book, state = _prepare(config, workdir, mesh, allow_config_change)
  n, spe, meta = setup.num_train, setup.steps_per_epoch, book.meta
  summary = _summary_head(config, workdir, splits, setup)
  _open_session(config, workdir, book, state)
  if meta.get("early_stopped"):
    print("Training already early-stopped in this workdir; nothing to do.", flush=True)
    return dict(summary, step=int(state.step), finished=True, **_summary_meta(meta))
  stop = []  # SIGTERM: finish the step, save, stop
  prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
  bar = _progress_bar(config, book, state)
  try:
    book.validate(state)
    perm_epoch, perm = -1, None
    step = int(state.step)  # tracked on the host: no device sync per step
    while step < book.max_steps:
      if should_stop_early(meta, int(config.early_stopping_patience)):
        print(f"Early stopping: no improvement for {meta['bad_epochs']} epochs.", flush=True)
        meta["early_stopped"] = True
        break
      if step // spe != perm_epoch:
        perm_epoch = step // spe
        perm = distributed.replicate(
          jnp.asarray(epoch_permutation(config.seed, perm_epoch, n)), mesh
        )
      if step % spe == 0:
        state = refresh_step(state, pool, setup=setup)
      state, metrics = train_step(state, pool, perm, setup=setup)
      step += 1
      if step % int(config.log_every_steps) == 0 or step % spe == 0:
        m = book.log_step(state, metrics, step)
        bar.set_postfix(progress_lib.train_postfix(m, step, spe, meta["best_val"]))
      bar.update(1)
      if step % spe == 0:
        book.validate(state)
      if step % spe == 0 or step % int(config.checkpoint_every_steps) == 0:
        book.save(state)
      if stop:
        break
    if not stop:
      book.validate(state)
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, prev_handler)
    book.finish(state, sys.exc_info()[1])
  if stop:
    raise errors.Interrupted(
      f"SIGTERM at step {int(state.step)}: checkpoint saved in {book.manager.directory}; "
      "run the same command to resume."
    )
  return _close_run(summary, book, state)
