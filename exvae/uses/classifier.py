"""The paper's classifier for the downstream uses: an MLP, its training and its grey-level data.

A permutation-invariant MLP ``D -> h -> h -> C`` (ReLU; layers initialised as
PyTorch's ``nn.Linear``) is trained with label smoothing 0.1, SGD with
momentum 0.9, a learning rate of 0.1 decayed linearly towards 1% of it epoch
by epoch (the authors' per-epoch ``LambdaLR``), batches of 100, and the loss

    0.4 * CE(f(x), y) + 0.6 * CE(f(x_aug), y),

where ``x_aug`` is a generative model's augmented copy of ``x``
(:func:`exvae.uses.generation.augment_images`) and keeps x's label.  Without
augmentation the loss is ``CE(f(x), y)`` alone.  :mod:`exvae.uses.augment`
trains it both ways and compares.

Inputs are grey-level images in [0, 1]: :func:`grey_splits` gives the labelled
grey splits of a run's data set (the kNN classifier of :mod:`exvae.uses.knn`
reads them too).

Every random choice is a function of (seed, step); the train step is a
module-level jitted function with the static :class:`ClassifierSetup`.  A long
training saves its state every few epochs (:func:`train_classifier`'s
``checkpoint_path``) and continues from it when started again.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from exvae import atomic, data, resumable, stopping
from exvae.data import user as user_data
from exvae.errors import DataFormatError, DataNotFoundError
from exvae.likelihoods import bernoulli_mean
from exvae.models.base import Model
from exvae.uses.generation import augment_images

PyTree = Any

REAL_WEIGHT = 0.4  # loss weight of the real images (0.6 for the augmented ones)
LABEL_SMOOTHING = 0.1


def torch_linear(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  """A Dense layer initialised as PyTorch's ``nn.Linear`` (the authors' classifier).

  Kernel and bias are both drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
  PyTorch's Kaiming-uniform with a = sqrt(5), variance 1/(3 fan_in), a third
  of Flax's default LeCun-normal variance (and Flax's bias starts at zero).
  """
  bound = 1.0 / np.sqrt(fan_in)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Dense(
    features,
    name=name,
    bias_init=bias_init,
    kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
  )


class MLP(nn.Module):
  """Permutation-invariant classifier: flatten -> Dense(h) -> ReLU -> Dense(h) -> ReLU -> Dense(C).

  Every layer starts as PyTorch's ``nn.Linear`` does (:func:`torch_linear`),
  as the authors' ``nn.Sequential`` classifier.

  Attributes:
    hidden: h.
    num_classes: C.
  """

  hidden: int = 1024
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) or (B, D) -> logits (B, num_classes)."""
    h = x.reshape(x.shape[0], -1)
    h = nn.relu(torch_linear(self.hidden, h.shape[-1], "Dense_0")(h))
    h = nn.relu(torch_linear(self.hidden, self.hidden, "Dense_1")(h))
    return torch_linear(self.num_classes, self.hidden, "Dense_2")(h)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassifierSetup:
  """Static description of a classifier run (hashed by identity: a static jit arg).

  Attributes:
    classifier: the MLP.
    optimizer: SGD with momentum and the linear decay.
    vae: the generative model (None: no augmentation).
    augment: use the 0.4/0.6 augmented loss.
    binary: binarise x before encoding it.
    num_classes: C.
    batch_size: B.
    steps_per_epoch: training steps per epoch (drop-last).
    mean_fn: decoder output -> mean image (the Bernoulli mean by default).
  """

  classifier: MLP
  optimizer: optax.GradientTransformation
  vae: Model | None
  augment: bool
  binary: bool
  num_classes: int
  batch_size: int
  steps_per_epoch: int
  mean_fn: Callable[[Any], jax.Array] = bernoulli_mean


@struct.dataclass
class ClassifierState:
  """Train state of the classifier (a pytree).

  Attributes:
    step: global step (int32).
    params: classifier parameters.
    opt_state: optax state.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree


def lr_schedule(
  epochs: int, steps_per_epoch: int, learning_rate: float = 0.1, final_fraction: float = 0.01
) -> optax.Schedule:
  """The authors' per-epoch linear decay: epoch e (from 0) runs at lr (1 - (1 - f) e / E).

  Their ``LambdaLR(lambda epoch: 1 - 0.99 * epoch / epochs)`` steps once per
  epoch, so the rate is constant within an epoch and reaches ``f`` of its
  start only after the last one (the last epoch runs at lr (f + (1 - f) / E)).

  Args:
    epochs: E.
    steps_per_epoch: optimiser steps per epoch.
    learning_rate: lr.
    final_fraction: f.

  Returns:
    step -> learning rate.
  """
  e_total = max(int(epochs), 1)
  spe = max(int(steps_per_epoch), 1)

  def schedule(step):
    epoch = jnp.minimum(step // spe, e_total - 1)
    return learning_rate * (1.0 - (1.0 - final_fraction) * epoch / e_total)

  return schedule


def make_optimizer(
  epochs: int,
  steps_per_epoch: int,
  learning_rate: float = 0.1,
  final_fraction: float = 0.01,
  momentum: float = 0.9,
) -> optax.GradientTransformation:
  """SGD with momentum (PyTorch's: v = m v + g, p -= lr v) and :func:`lr_schedule`."""
  return optax.sgd(
    lr_schedule(epochs, steps_per_epoch, learning_rate, final_fraction), momentum=momentum
  )


def _ce(logits: jax.Array, y: jax.Array, num_classes: int) -> jax.Array:
  labels = optax.smooth_labels(jax.nn.one_hot(y, num_classes), LABEL_SMOOTHING)
  return optax.softmax_cross_entropy(logits, labels).mean()


def _train_step(
  state: ClassifierState,
  vae_params: PyTree,
  log_var: jax.Array,
  pool_x: jax.Array,
  pool_y: jax.Array,
  perm: jax.Array,
  key: jax.Array,
  *,
  setup: ClassifierSetup,
) -> tuple[ClassifierState, dict[str, jax.Array]]:
  """One SGD step on batch ``step % steps_per_epoch`` of the epoch's permutation.

  Args:
    state: classifier state (donated).
    vae_params: generative model parameters (unused without augmentation).
    log_var: scalar log s2.
    pool_x: (N, H, W, C) training images.
    pool_y: (N,) int labels.
    perm: (N,) int32 this epoch's order.
    key: base key; the step's key is ``fold_in(key, step)``.
    setup: static description.

  Returns:
    ``(new_state, {'loss', 'ce_real', 'ce_aug'})``.
  """
  i = state.step % setup.steps_per_epoch
  ids = jax.lax.dynamic_slice(perm, (i * setup.batch_size,), (setup.batch_size,))
  x, y = pool_x[ids], pool_y[ids]
  k = jax.random.fold_in(key, state.step)
  x_aug = (
    augment_images(setup.vae, vae_params, x, log_var, k, setup.binary, setup.mean_fn)
    if setup.augment
    else x
  )

  def loss_fn(params):
    ce_real = _ce(setup.classifier.apply({"params": params}, x), y, setup.num_classes)
    if not setup.augment:
      return ce_real, (ce_real, jnp.zeros(()))
    ce_aug = _ce(setup.classifier.apply({"params": params}, x_aug), y, setup.num_classes)
    return REAL_WEIGHT * ce_real + (1.0 - REAL_WEIGHT) * ce_aug, (ce_real, ce_aug)

  (loss, (ce_real, ce_aug)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (
    ClassifierState(step=state.step + 1, params=params, opt_state=opt_state),
    {"loss": loss, "ce_real": ce_real, "ce_aug": ce_aug},
  )


train_step = jax.jit(_train_step, static_argnames=("setup",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("classifier",))
def predict(classifier: MLP, params: PyTree, x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B,) int32 predicted classes."""
  return jnp.argmax(classifier.apply({"params": params}, x), axis=-1).astype(jnp.int32)


def error_rate(
  classifier: MLP, params: PyTree, x: np.ndarray, y: np.ndarray, batch_size: int = 1000
) -> float:
  """Fraction of ``x`` misclassified (fixed-size padded batches)."""
  n = x.shape[0]
  bs = max(1, min(batch_size, n))
  wrong = 0
  for lo in range(0, n, bs):
    hi = min(lo + bs, n)
    xb = np.zeros((bs,) + x.shape[1:], np.float32)
    xb[: hi - lo] = x[lo:hi]
    p = np.asarray(predict(classifier, params, jnp.asarray(xb)))[: hi - lo]
    wrong += int(np.sum(p != y[lo:hi]))
  return wrong / max(n, 1)


class _Pool(NamedTuple):
  """What every train step reads besides the state: the data and the augmentation's inputs."""

  x: jax.Array  # (N, H, W, C) training images
  y: jax.Array  # (N,) labels
  vae_params: PyTree  # the generative model's parameters (None without augmentation)
  log_var: jax.Array  # scalar log s2 of the augmentation noise
  key: jax.Array  # base key of the steps' randomness


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSettings:
  """How :func:`train_classifier` trains the MLP (its keyword arguments).

  Attributes:
    hidden: h.
    epochs: passes over the training set (the lr decays over all of them).
    augment: use the augmented loss (needs ``vae``, ``vae_params``, ``log_var``).
    vae: the generative model.
    vae_params: its parameters.
    log_var: log s2 of the augmentation noise.
    binary: encode Bernoulli(x) (binary data sets).
    seed: seeds the classifier init, the epoch orders and the augmentation.
    batch_size: B (drop-last).
    learning_rate: initial lr.
    num_classes: C (default: max label + 1).
    max_steps: stop after this many steps (tests; the schedule still spans all epochs).
    mean_fn: decoder output -> mean image (the run's ``setup.mean_fn``).
    progress: show a tqdm bar.
    log_every: without a bar, print one line every this many epochs (0: silent),
      so that a long run in a log file shows how far it is.
    checkpoint_path: if given, the train state is saved there (an ``.npz``,
      atomically) every ``checkpoint_every`` epochs, and a call that finds a
      file there made with the same settings continues from it. Every random
      choice is a function of (seed, step), so the continued run ends where an
      uninterrupted one ends. The caller removes the file when done.
    checkpoint_identity: JSON-able description of what else the run depends on
      (the generative model, the training images); checked on restore.
    checkpoint_every: epochs between two saves.
  """

  hidden: int
  epochs: int
  augment: bool
  vae: Model | None = None
  vae_params: PyTree = None
  log_var: float = 0.0
  binary: bool = True
  seed: int = 0
  batch_size: int = 100
  learning_rate: float = 0.1
  num_classes: int | None = None
  max_steps: int | None = None
  mean_fn: Callable[[Any], jax.Array] = bernoulli_mean
  progress: bool = False
  log_every: int = 0
  checkpoint_path: str | None = None
  checkpoint_identity: dict[str, Any] | None = None
  checkpoint_every: int = 10


def train_classifier(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  settings: TrainSettings | None = None,
  **kwargs: Any,
) -> dict[str, Any]:
  """Trains the MLP with or without generative augmentation; reports the test error.

  Args:
    train_x, train_y: (N, H, W, C) grey levels in [0, 1] and their (N,) int labels.
    test_x, test_y: (M, H, W, C) evaluation images and their (M,) labels.
    settings: how to train (:class:`TrainSettings`).
    **kwargs: instead of ``settings``, its fields as keywords (``hidden``, ``epochs``
      and ``augment`` are required).

  Returns:
    ``{'test_error', 'losses' (per-step list), 'epoch_losses', 'steps', 'seconds', ...}``.

  Raises:
    TypeError: both ``settings`` and keywords, or a keyword that is not a field.
    ValueError: augmentation without the generative model, or a batch larger than
      the training set.
  """
  if settings is not None and kwargs:
    raise TypeError("train_classifier takes settings or their fields as keywords, not both")
  f = TrainSettings(**kwargs) if settings is None else settings
  if f.augment and (f.vae is None or f.vae_params is None):
    raise ValueError("augmentation needs the generative model and its parameters")
  train_x = np.ascontiguousarray(train_x, np.float32)
  train_y = np.asarray(train_y, np.int32)
  setup = _classifier_setup(train_x.shape[0], train_y, test_y, f)
  state, pool = _start(setup, train_x, train_y, f.vae_params, f.log_var, f.seed)
  plan = _Plan.of(f, train_x.shape[0], setup.steps_per_epoch)
  ckpt = _Checkpoints.of(f, setup, plan)
  state, losses, step, seconds = _run_epochs(
    state,
    pool,
    setup,
    plan,
    ckpt,
    _Progress(
      plan, f"mlp h={f.hidden} aug={f.augment}", f.progress, f.log_every, setup.steps_per_epoch
    ),
  )
  err = error_rate(
    setup.classifier, state.params, np.asarray(test_x, np.float32), np.asarray(test_y)
  )
  spe = setup.steps_per_epoch
  ep = [float(np.mean(losses[e * spe : (e + 1) * spe])) for e in range(int(np.ceil(step / spe)))]
  return {
    "test_error": err,
    "losses": losses,
    "epoch_losses": ep,
    "steps": step,
    "epochs": f.epochs,
    "hidden": int(f.hidden),
    "augment": bool(f.augment),
    "seconds": seconds,
    "params": state.params,
    "classifier": setup.classifier,
  }


def _classifier_setup(
  n: int, train_y: np.ndarray, test_y: np.ndarray, f: TrainSettings
) -> ClassifierSetup:
  """The static description of a classifier trained on ``n`` images (drop-last batches).

  Args:
    n: the number of training images.
    train_y, test_y: their labels and the test labels (C = the largest label + 1).
    f: the training settings (``num_classes``: C, if given).

  Returns:
    The :class:`ClassifierSetup`.

  Raises:
    ValueError: ``batch_size`` exceeds ``n``.
  """
  if f.batch_size > n:
    raise ValueError(f"batch_size {f.batch_size} exceeds the {n} training images")
  c = int(f.num_classes or int(max(train_y.max(), np.max(test_y))) + 1)
  spe = n // f.batch_size
  return ClassifierSetup(
    classifier=MLP(hidden=int(f.hidden), num_classes=c),
    optimizer=make_optimizer(f.epochs, spe, f.learning_rate),
    vae=f.vae,
    augment=bool(f.augment),
    binary=bool(f.binary),
    num_classes=c,
    batch_size=int(f.batch_size),
    steps_per_epoch=spe,
    mean_fn=f.mean_fn,
  )


def _start(
  setup: ClassifierSetup,
  train_x: np.ndarray,
  train_y: np.ndarray,
  vae_params: PyTree,
  log_var: float,
  seed: int,
) -> tuple[ClassifierState, _Pool]:
  """The initial state and what every step reads, both seeded by ``seed``."""
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  state = _initial_state(setup, k_init, train_x.shape[1:])
  pool = _Pool(
    x=jnp.asarray(train_x),
    y=jnp.asarray(train_y),
    vae_params=vae_params,
    log_var=jnp.float32(log_var),
    key=k_run,
  )
  return state, pool


class _Plan(NamedTuple):
  """How far a classifier trains and what its messages call it."""

  seed: int  # seeds the epoch orders (and names the run)
  epochs: int  # epochs the schedule spans
  n: int  # training images
  augment: bool  # trained with the augmented loss
  steps: int  # steps to train in all (max_steps may stop it before the epochs end)
  label: str  # "mlp h=... with augmentation, seed ...", for log lines

  @classmethod
  def of(cls, f: TrainSettings, n: int, steps_per_epoch: int) -> _Plan:
    """The plan of training with the settings ``f`` on ``n`` images."""
    total = f.epochs * steps_per_epoch
    return cls(
      seed=f.seed,
      epochs=f.epochs,
      n=n,
      augment=bool(f.augment),
      steps=total if f.max_steps is None else min(total, int(f.max_steps)),
      label=f"mlp h={f.hidden} {'with' if f.augment else 'without'} augmentation, seed {f.seed}",
    )


class _Checkpoints(NamedTuple):
  """Where a classifier's train state is saved, and every how many epochs."""

  path: str
  every: int  # epochs between two saves
  identity: str  # the settings, as JSON: a state saved with others is not restored

  @classmethod
  def of(cls, f: TrainSettings, setup: ClassifierSetup, plan: _Plan) -> _Checkpoints | None:
    """The checkpoints of the training ``f``, ``setup`` and ``plan`` describe.

    Args:
      f: the settings: where (``checkpoint_path``), every how many epochs, what else
        the run depends on (``checkpoint_identity``), the initial lr and the
        augmentation noise's log s2.
      setup, plan: the classifier and its training.

    Returns:
      The checkpoints, or None without a ``checkpoint_path``.
    """
    if f.checkpoint_path is None:
      return None
    identity = atomic.dumps(
      {
        "given": f.checkpoint_identity,
        "n": plan.n,
        "hidden": int(setup.classifier.hidden),
        "epochs": int(plan.epochs),
        "augment": setup.augment,
        "binary": setup.binary,
        "seed": int(plan.seed),
        "batch_size": setup.batch_size,
        "learning_rate": float(f.learning_rate),
        "num_classes": setup.num_classes,
        "log_var": float(f.log_var),
        "steps": int(plan.steps),
      },
      sort_keys=True,
    )
    return cls(f.checkpoint_path, int(f.checkpoint_every), identity)

  def save(self, state: ClassifierState, losses: list[float], seconds: float) -> None:
    """Saves the state, its per-step losses and the time trained so far."""
    _write_classifier_checkpoint(self.path, self.identity, state, losses, seconds)

  def due(self, step: int, steps: int, steps_per_epoch: int) -> bool:
    """Whether to save after ``step``: at the end of every ``every``-th epoch but the last."""
    return (
      step < steps
      and step % steps_per_epoch == 0
      and (step // steps_per_epoch) % max(1, self.every) == 0
    )


class _Progress:
  """A classifier training's clock and its report: a tqdm bar, or a line every few epochs.

  Args:
    plan: the training's plan (its steps and label).
    desc: the bar's description.
    progress: show a tqdm bar.
    log_every: without a bar, print a line every this many epochs (0: silent).
    steps_per_epoch: steps per epoch.
  """

  def __init__(self, plan: _Plan, desc: str, progress: bool, log_every: int, steps_per_epoch: int):
    self.plan, self.log_every, self.spe = plan, log_every, steps_per_epoch
    self.bar = None
    if progress:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=plan.steps, desc=desc, unit="step", dynamic_ncols=True)
    self.t0 = time.time()

  def seconds(self) -> float:
    """Seconds trained (a continued training counts its earlier sessions too)."""
    return time.time() - self.t0

  def resumed(self, step: int, seconds_before: float) -> None:
    """A saved state was restored at ``step``, after ``seconds_before`` of training."""
    self.t0 -= seconds_before
    if self.bar is not None:
      self.bar.update(step)

  def epoch_done(self, epoch: int, step: int, losses: list[float]) -> None:
    """Epoch ``epoch`` (from 0) ended at ``step``; ``losses`` are every step's so far."""
    if self.bar is not None:
      self.bar.update(min(self.spe, self.plan.steps - self.bar.n))
      self.bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elif self.log_every and ((epoch + 1) % self.log_every == 0 or step >= self.plan.steps):
      print(
        f"{self.plan.label}: epoch {epoch + 1}/{self.plan.epochs}, mean loss "
        f"{np.mean(losses[epoch * self.spe :]):.4f}, {self.seconds():.0f} s",
        flush=True,
      )

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _run_epochs(
  state: ClassifierState,
  pool: _Pool,
  setup: ClassifierSetup,
  plan: _Plan,
  ckpt: _Checkpoints | None,
  progress: _Progress,
) -> tuple[ClassifierState, list[float], int, float]:
  """Trains from a saved state in ``ckpt`` (if one matches) or from ``state`` to ``plan.steps``.

  Returns:
    ``(state, losses (every step's), steps done, seconds)``.

  Raises:
    exvae.errors.Interrupted: a stop was requested (SIGTERM); the state is saved first.
  """
  spe = setup.steps_per_epoch
  state, losses, step = _resume(state, plan, spe, ckpt, progress)
  while step < plan.steps:
    if stopping.requested():  # SIGTERM (exvae-uses): save at this epoch's start, stop
      _stop(state, losses, step, plan, spe, ckpt, progress)
    epoch = step // spe
    todo = min(spe, plan.steps - step)
    state, epoch_losses = _train_steps(
      state, pool, _epoch_order(plan.seed, epoch, plan.n), todo, setup
    )
    losses.extend(epoch_losses)
    step += todo
    progress.epoch_done(epoch, step, losses)
    if ckpt is not None and ckpt.due(step, plan.steps, spe):
      ckpt.save(state, losses, progress.seconds())
  progress.close()
  return state, losses, step, progress.seconds()


def _resume(
  state: ClassifierState,
  plan: _Plan,
  steps_per_epoch: int,
  ckpt: _Checkpoints | None,
  progress: _Progress,
) -> tuple[ClassifierState, list[float], int]:
  """``(state, losses, step)`` to start from: a matching saved state's, else ``(state, [], 0)``."""
  restored = None if ckpt is None else _read_classifier_checkpoint(ckpt.path, ckpt.identity, state)
  if restored is None:
    return state, [], 0
  state, losses, seconds_before = restored
  step = int(state.step)
  print(
    f"{plan.label}: continuing after epoch {step // steps_per_epoch} from {ckpt.path}", flush=True
  )
  progress.resumed(step, seconds_before)
  return state, losses, step


def _stop(
  state: ClassifierState,
  losses: list[float],
  step: int,
  plan: _Plan,
  steps_per_epoch: int,
  ckpt: _Checkpoints | None,
  progress: _Progress,
):
  """Saves the state at an epoch's start (if there is a path and anything trained) and stops.

  Raises:
    exvae.errors.Interrupted: always, saying where the state is.
  """
  where = "nothing trained yet" if step == 0 else "nothing saved (no checkpoint path)"
  if ckpt is not None and step > 0:
    ckpt.save(state, losses, progress.seconds())
    where = f"its state is saved in {ckpt.path}"
  raise stopping.stopped(
    f"after epoch {step // steps_per_epoch} of {plan.epochs} of the "
    f"classifier {'with' if plan.augment else 'without'} augmentation, "
    f"seed {plan.seed}: {where}; run the same command again to continue."
  )


def _initial_state(
  setup: ClassifierSetup, key: jax.Array, image_shape: tuple[int, ...]
) -> ClassifierState:
  """The classifier's initial parameters (from ``key``) and optimiser state, at step 0."""
  params = setup.classifier.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
  return ClassifierState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.optimizer.init(params)
  )


def _epoch_order(seed: int, epoch: int, n: int) -> jax.Array:
  """(n,) int32 the epoch's order of the training images: a function of (seed, epoch) alone,
  so a continued training visits them as an uninterrupted one."""
  return jnp.asarray(np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32))


def _train_steps(
  state: ClassifierState, pool: _Pool, perm: jax.Array, num_steps: int, setup: ClassifierSetup
) -> tuple[ClassifierState, list[float]]:
  """``num_steps`` train steps in the order ``perm``; their losses, fetched once at the end
  (one device-to-host transfer per epoch, not per step)."""
  pending = []
  for _ in range(num_steps):
    state, m = train_step(
      state, pool.vae_params, pool.log_var, pool.x, pool.y, perm, pool.key, setup=setup
    )
    pending.append(m["loss"])
  return state, [float(v) for v in jax.device_get(pending)]


# ----------------------------------------------------------------------------
# Grey-level data for the classifiers
# ----------------------------------------------------------------------------


class GreyData(NamedTuple):
  """Labelled grey-level splits for the classifier.

  Attributes:
    train_x, val_x, test_x: (N, H, W, C) float32 in [0, 1].
    train_y, val_y, test_y: (N,) int32.
    grey_eval: True if val/test are grey levels, False if the loader's fixed
      binarisations had to be used.
  """

  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  grey_eval: bool


def grey_splits(config, splits) -> GreyData:
  """The splits with grey-level (not binarised) validation and test images.

  ``exvae.data.load`` binarises val/test once for binary data sets; the
  classifier is trained and evaluated on grey levels as in the paper, so the
  grey images are re-read with the same split rule (:func:`exvae.data.load_grey`;
  checked: the training split must equal ``splits.train_x``).  A data set
  without a grey-level reader, grey data no longer found, or a training split
  that differs fall back to the binarised val/test (``grey_eval=False``, with a
  warning).

  Raises:
    DataFormatError: the data set has no labels for a split.
  """
  missing = [
    k
    for k, y in (("y_train", splits.train_y), ("y_val", splits.val_y), ("y_test", splits.test_y))
    if y is None
  ]
  if missing:
    raise DataFormatError(
      f"the classifier needs labels; data set {splits.name!r} has none for "
      f"{', '.join(missing)} (an .npz or a plug-in gives them as y_train, "
      "y_val and y_test; without x_val the validation labels come from "
      "y_train)"
    )
  fallback = GreyData(
    splits.train_x,
    splits.train_y,
    splits.val_x,
    splits.val_y,
    splits.test_x,
    splits.test_y,
    grey_eval=not splits.binary,
  )
  if not splits.binary:
    return fallback

  def binarised(why: str) -> GreyData:
    warnings.warn(
      f"grey-level val/test images unavailable ({why}); "
      "using the loader's binarised val/test images",
      stacklevel=3,
    )
    return fallback

  user = user_data.is_user_dataset(config.dataset)
  if not (user or config.dataset in data.GREY_DATASETS):
    return binarised(f"no grey-level reader for {splits.name!r}")
  try:
    g = data.load_grey(
      config.dataset,
      data_dir=config.data_dir or None,
      source="auto" if user else config.data_source,  # a user's: only 'auto'
      val_size=config.val_size or None,
      max_train=config.max_train or None,
      max_test=config.max_test or None,
    )
  except DataNotFoundError as e:
    return binarised(f"{type(e).__name__}: {e}")
  if g.train_x.shape != splits.train_x.shape or not np.allclose(
    g.train_x, splits.train_x, atol=1e-6
  ):
    return binarised("re-read training split differs from the loaded one")
  return GreyData(g.train_x, g.train_y, g.val_x, g.val_y, g.test_x, g.test_y, grey_eval=True)


# ----------------------------------------------------------------------------
# The state of a classifier in training, saved every few epochs
# ----------------------------------------------------------------------------


def _write_classifier_checkpoint(
  path: str, identity: str, state: ClassifierState, losses: list[float], seconds: float
) -> None:
  """Saves a classifier's train state, its per-step losses and its time so far."""
  leaves = jax.tree_util.tree_leaves(jax.device_get(state))
  arrays = {f"leaf_{i}": np.asarray(a) for i, a in enumerate(leaves)}
  resumable.save(
    path,
    identity,
    {**arrays, "losses": np.asarray(losses, np.float64), "seconds": np.float64(seconds)},
  )


def _read_classifier_checkpoint(path: str, identity: str, template: ClassifierState):
  """``(state, losses, seconds)`` from a checkpoint made with ``identity``, else None.

  A missing file gives None; an unreadable one, one made with other settings or
  one of other shapes gives None with a line that says so.
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  like = {f"leaf_{i}": np.asarray(t) for i, t in enumerate(leaves)}
  f = resumable.load(
    path,
    identity,
    {**like, "losses": None, "seconds": np.float64(0)},
    what="classifier checkpoint",
    restart="training from the start",
  )
  if f is None:
    return None
  state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(f[k]) for k in like])
  return state, [float(v) for v in f["losses"]], float(f["seconds"])
