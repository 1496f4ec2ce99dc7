"""Generative data augmentation with an Exemplar VAE (the paper's classifier setup).

A permutation-invariant MLP ``D -> h -> h -> C`` (ReLU; layers initialised as
PyTorch's ``nn.Linear``) is trained with label smoothing 0.1, SGD with
momentum 0.9, a learning rate of 0.1 decayed linearly towards 1% of it epoch
by epoch (the authors' per-epoch ``LambdaLR``), batches of 100, and the loss

    0.4 * CE(f(x), y) + 0.6 * CE(f(x_aug), y),

where ``x_aug`` is decoded from ``z ~ N(mu(x), s2 I)`` (the decoder's mean
image, e.g. the Bernoulli mean, rounded to the 1/255 grey-level grid) and keeps x's label.  Without
augmentation the loss is ``CE(f(x), y)`` alone.

What the encoder sees is ``encode_input``: ``"grey"`` (the default, as the
authors' ``analysis.py --classify``, which loads the data with
``no_binarization=True`` and encodes the grey batch itself) or
``"bernoulli"`` (a fresh ``Bernoulli(x)`` per step, as during VAE training;
it adds the binarisation noise to the spread of the augmented images).

Inputs are grey-level images in [0, 1].  :func:`grey_splits` recovers the
grey validation/test images of data sets the loader returns binarised (MNIST,
Fashion-MNIST, digits); otherwise the binarised ones are used (and reported).

Every random choice is a function of (seed, step); the train step is a
module-level jitted function with the static :class:`AugmentSetup`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from exvae import atomic, resumable
from exvae.data import DataFormatError
from exvae.data import user as user_data
from exvae.likelihoods import bernoulli_mean
from exvae.models.base import Model

PyTree = Any

REAL_WEIGHT = 0.4        # loss weight of the real images (0.6 for the augmented ones)
LABEL_SMOOTHING = 0.1
ENCODE_INPUTS = ("grey", "bernoulli")   # what the encoder sees; "grey" is the reference's
ARMS = ("without", "with")              # the classifiers: without and with augmentation


def binarise_before_encoding(encode_input: str, binary_data: bool) -> bool:
  """Whether the augmentation encodes ``Bernoulli(x)`` rather than the grey ``x``.

  Args:
    encode_input: one of :data:`ENCODE_INPUTS`.
    binary_data: the model was trained on binarised data (grey data is never binarised).

  Returns:
    True for ``"bernoulli"`` on binary data.
  """
  if encode_input not in ENCODE_INPUTS:
    raise ValueError(f"encode_input must be one of {ENCODE_INPUTS}, got {encode_input!r}")
  return encode_input == "bernoulli" and bool(binary_data)


def torch_linear(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  """A Dense layer initialised as PyTorch's ``nn.Linear`` (the authors' classifier).

  Kernel and bias are both drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
  PyTorch's Kaiming-uniform with a = sqrt(5), variance 1/(3 fan_in), a third
  of Flax's default LeCun-normal variance (and Flax's bias starts at zero).
  """
  bound = 1.0 / np.sqrt(fan_in)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Dense(features, name=name, bias_init=bias_init,
                  kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))


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
class AugmentSetup:
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


def lr_schedule(epochs: int, steps_per_epoch: int, learning_rate: float = 0.1,
                final_fraction: float = 0.01) -> optax.Schedule:
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


def make_optimizer(epochs: int, steps_per_epoch: int, learning_rate: float = 0.1,
                   final_fraction: float = 0.01,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum (PyTorch's: v = m v + g, p -= lr v) and :func:`lr_schedule`."""
  return optax.sgd(lr_schedule(epochs, steps_per_epoch, learning_rate, final_fraction),
                   momentum=momentum)


def augment_images(vae: Model, vae_params: PyTree, x: jax.Array, log_var: jax.Array,
                   key: jax.Array, binary: bool,
                   mean_fn: Callable[[Any], jax.Array] = bernoulli_mean) -> jax.Array:
  """Decoded samples z ~ N(mu(x), s2 I), rounded to the 1/255 grid.

  Args:
    vae: the generative model.
    vae_params: its parameters.
    x: (B, H, W, C) grey levels in [0, 1].
    log_var: scalar log s2.
    key: PRNG key.
    binary: encode Bernoulli(x) instead of x.
    mean_fn: decoder output -> mean image (Bernoulli mean by default).

  Returns:
    (B, H, W, C) augmented images in [0, 1] (multiples of 1/255).
  """
  k_bin, k_eps = jax.random.split(key)
  xin = jax.random.bernoulli(k_bin, x).astype(jnp.float32) if binary else x
  mu = vae.encode_mean(vae_params, xin)
  z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(k_eps, mu.shape, mu.dtype)
  p = jnp.clip(mean_fn(vae.decode(vae_params, z)), 0.0, 1.0)
  return jax.lax.stop_gradient(jnp.round(p * 255.0) / 255.0)


def _ce(logits: jax.Array, y: jax.Array, num_classes: int) -> jax.Array:
  labels = optax.smooth_labels(jax.nn.one_hot(y, num_classes), LABEL_SMOOTHING)
  return optax.softmax_cross_entropy(logits, labels).mean()


def _train_step(state: ClassifierState, vae_params: PyTree, log_var: jax.Array,
                pool_x: jax.Array, pool_y: jax.Array, perm: jax.Array, key: jax.Array, *,
                setup: AugmentSetup) -> tuple[ClassifierState, dict[str, jax.Array]]:
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
  x_aug = augment_images(setup.vae, vae_params, x, log_var, k, setup.binary,
                                 setup.mean_fn) if setup.augment else x

  def loss_fn(params):
    ce_real = _ce(setup.classifier.apply({"params": params}, x), y, setup.num_classes)
    if not setup.augment:
      return ce_real, (ce_real, jnp.zeros(()))
    ce_aug = _ce(setup.classifier.apply({"params": params}, x_aug), y, setup.num_classes)
    return REAL_WEIGHT * ce_real + (1.0 - REAL_WEIGHT) * ce_aug, (ce_real, ce_aug)

  (loss, (ce_real, ce_aug)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (ClassifierState(step=state.step + 1, params=params, opt_state=opt_state),
          {"loss": loss, "ce_real": ce_real, "ce_aug": ce_aug})


train_step = jax.jit(_train_step, static_argnames=("setup",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("classifier",))
def predict(classifier: MLP, params: PyTree, x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B,) int32 predicted classes."""
  return jnp.argmax(classifier.apply({"params": params}, x), axis=-1).astype(jnp.int32)


def error_rate(classifier: MLP, params: PyTree, x: np.ndarray, y: np.ndarray,
               batch_size: int = 1000) -> float:
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


def train_classifier(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, *, hidden: int, epochs: int, augment: bool,
                     vae: Model | None = None, vae_params: PyTree = None,
                     log_var: float = 0.0, binary: bool = True, seed: int = 0,
                     batch_size: int = 100, learning_rate: float = 0.1,
                     num_classes: int | None = None, max_steps: int | None = None,
                     mean_fn: Callable[[Any], jax.Array] = bernoulli_mean,
                     progress: bool = False, log_every: int = 0,
                     checkpoint_path: str | None = None,
                     checkpoint_identity: dict[str, Any] | None = None,
                     checkpoint_every: int = 10) -> dict[str, Any]:
  """Trains the MLP with or without generative augmentation; reports the test error.

  Args:
    train_x: (N, H, W, C) grey levels in [0, 1].
    train_y: (N,) int labels.
    test_x: (M, H, W, C) evaluation images.
    test_y: (M,) labels.
    hidden: h.
    epochs: passes over the training set (the lr decays over all of them).
    augment: use the augmented loss (needs ``vae``, ``vae_params``, ``log_var``).
    vae, vae_params: the generative model and its parameters.
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

  Returns:
    ``{'test_error', 'losses' (per-step list), 'epoch_losses', 'steps', 'seconds', ...}``.
  """
  if augment and (vae is None or vae_params is None):
    raise ValueError("augmentation needs the generative model and its parameters")
  train_x = np.ascontiguousarray(train_x, np.float32)
  train_y = np.asarray(train_y, np.int32)
  n = train_x.shape[0]
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} training images")
  c = int(num_classes or int(max(train_y.max(), np.max(test_y))) + 1)
  spe = n // batch_size
  total = epochs * spe
  clf = MLP(hidden=int(hidden), num_classes=c)
  opt = make_optimizer(epochs, spe, learning_rate)
  setup = AugmentSetup(classifier=clf, optimizer=opt, vae=vae, augment=bool(augment),
                       binary=bool(binary), num_classes=c, batch_size=int(batch_size),
                       steps_per_epoch=spe, mean_fn=mean_fn)
  key = jax.random.PRNGKey(seed)
  k_init, k_run = jax.random.split(key)
  params = clf.init(k_init, jnp.zeros((1,) + train_x.shape[1:], jnp.float32))["params"]
  state = ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=opt.init(params))
  pool_x, pool_y = jnp.asarray(train_x), jnp.asarray(train_y)
  lv = jnp.float32(log_var)
  steps = total if max_steps is None else min(total, int(max_steps))
  losses: list[float] = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc=f"mlp h={hidden} aug={augment}", unit="step",
               dynamic_ncols=True)
  t0 = time.time()
  step = 0
  identity = None
  if checkpoint_path is not None:
    identity = atomic.dumps({"given": checkpoint_identity, "n": n, "hidden": int(hidden),
                             "epochs": int(epochs), "augment": bool(augment),
                             "binary": bool(binary), "seed": int(seed),
                             "batch_size": int(batch_size), "learning_rate": float(learning_rate),
                             "num_classes": c, "log_var": float(log_var),
                             "steps": int(steps)}, sort_keys=True)
    restored = _read_classifier_checkpoint(checkpoint_path, identity, state)
    if restored is not None:
      state, losses, seconds_before = restored
      step = int(state.step)
      t0 -= seconds_before
      print(f"mlp h={hidden} {'with' if augment else 'without'} augmentation, seed {seed}: "
            f"continuing after epoch {step // spe} from {checkpoint_path}", flush=True)
      if bar is not None:
        bar.update(step)
  pending = []
  while step < steps:
    epoch = step // spe
    perm = jnp.asarray(np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32))
    for _ in range(min(spe, steps - step)):
      state, m = train_step(state, vae_params, lv, pool_x, pool_y, perm, k_run, setup=setup)
      pending.append(m["loss"])
      step += 1
    losses.extend(float(v) for v in jax.device_get(pending))
    pending = []
    if bar is not None:
      bar.update(min(spe, steps - bar.n))
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elif log_every and ((epoch + 1) % log_every == 0 or step >= steps):
      print(f"mlp h={hidden} {'with' if augment else 'without'} augmentation, seed {seed}: "
            f"epoch {epoch + 1}/{epochs}, mean loss {np.mean(losses[epoch * spe:]):.4f}, "
            f"{time.time() - t0:.0f} s", flush=True)
    if (checkpoint_path is not None and step < steps and step % spe == 0
        and (step // spe) % max(1, int(checkpoint_every)) == 0):
      _write_classifier_checkpoint(checkpoint_path, identity, state, losses, time.time() - t0)
  if bar is not None:
    bar.close()
  seconds = time.time() - t0
  err = error_rate(clf, state.params, np.asarray(test_x, np.float32), np.asarray(test_y))
  ep = [float(np.mean(losses[e * spe:(e + 1) * spe])) for e in range(int(np.ceil(step / spe)))]
  return {"test_error": err, "losses": losses, "epoch_losses": ep, "steps": step,
          "epochs": epochs, "hidden": int(hidden), "augment": bool(augment),
          "seconds": seconds, "params": state.params, "classifier": clf}


# ----------------------------------------------------------------------------
# Grey-level data for the classifier
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
  grey images are re-read with the same split rule (checked: the training
  split must equal ``splits.train_x``).  Data sets where that is not possible
  fall back to the binarised val/test (``grey_eval=False``, with a warning).
  """
  missing = [k for k, y in (("y_train", splits.train_y), ("y_val", splits.val_y),
                             ("y_test", splits.test_y)) if y is None]
  if missing:
    raise DataFormatError(f"the classifier needs labels; data set {splits.name!r} has none for "
                          f"{', '.join(missing)} (an .npz or a plug-in gives them as y_train, "
                          "y_val and y_test; without x_val the validation labels come from "
                          "y_train)")
  fallback = GreyData(splits.train_x, splits.train_y, splits.val_x, splits.val_y,
                      splits.test_x, splits.test_y, grey_eval=not splits.binary)
  if not splits.binary:
    return fallback
  try:
    if user_data.is_user_dataset(config.dataset):   # the same rule, val/test kept grey
      from exvae import data as data_lib
      g = data_lib.load(config.dataset, val_size=config.val_size or None,
                        eval_binarize_seed=config.eval_binarize_seed,
                        max_train=config.max_train or None, max_test=config.max_test or None,
                        likelihood="logistic")   # any non-Bernoulli likelihood: no binarisation
      xtr, ytr, xva, yva, xte, yte = g.train_x, g.train_y, g.val_x, g.val_y, g.test_x, g.test_y
    elif splits.name == "digits":
      from exvae.data.digits import DIGITS_TEST, DIGITS_VAL, digits_permutation, load_digits_arrays
      x, y = load_digits_arrays()
      n_val = int(config.val_size or DIGITS_VAL)
      perm = digits_permutation(len(x))
      te, va, tr = perm[:DIGITS_TEST], perm[DIGITS_TEST:DIGITS_TEST + n_val], perm[DIGITS_TEST + n_val:]
      xtr, ytr, xva, yva, xte, yte = x[tr], y[tr], x[va], y[va], x[te], y[te]
    elif splits.name in ("mnist", "fashion_mnist"):
      from exvae import data as data_lib
      xall, yall, xte, yte, _ = data_lib._load_mnist_like(
          splits.name, config.data_dir or None, config.data_source)
      n_val = int(config.val_size or 10000)
      xtr, xva = xall[: len(xall) - n_val], xall[len(xall) - n_val:]
      ytr, yva = yall[: len(yall) - n_val], yall[len(yall) - n_val:]
    else:
      raise NotImplementedError(f"no grey-level reader for {splits.name!r}")
    as_f = lambda a: (a[..., None] if a.ndim == 3 else a).astype(np.float32) / (  # noqa: E731
        np.float32(255.0) if a.dtype == np.uint8 else np.float32(1.0))
    xtr, xva, xte = as_f(np.asarray(xtr)), as_f(np.asarray(xva)), as_f(np.asarray(xte))
    if config.max_train:
      xtr, ytr = xtr[: config.max_train], ytr[: config.max_train]
    if config.max_test:
      xva, yva = xva[: config.max_test], yva[: config.max_test]
      xte, yte = xte[: config.max_test], yte[: config.max_test]
    if xtr.shape != splits.train_x.shape or not np.allclose(xtr, splits.train_x, atol=1e-6):
      raise ValueError("re-read training split differs from the loaded one")
    as_y = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return GreyData(np.ascontiguousarray(xtr), as_y(ytr), np.ascontiguousarray(xva), as_y(yva),
                    np.ascontiguousarray(xte), as_y(yte), grey_eval=True)
  except Exception as e:  # noqa: BLE001  (any failure: use what the loader gave)
    warnings.warn(f"grey-level val/test images unavailable ({type(e).__name__}: {e}); "
                  "using the loader's binarised val/test images")
    return fallback


def augmented_set(vae: Model, vae_params: PyTree, x: np.ndarray, log_var: float, *,
                  binary: bool, seed: int = 0, batch_size: int = 500,
                  mean_fn: Callable[[Any], jax.Array] = bernoulli_mean) -> np.ndarray:
  """One augmented copy of each image, with noise fixed by ``seed`` (as :func:`augment_images`).

  Args:
    vae, vae_params: the generative model.
    x: (N, H, W, C) grey levels in [0, 1].
    log_var: log s2 of the augmentation noise.
    binary: encode ``Bernoulli(x)``.
    seed: the noise seed; batch ``lo`` uses ``fold_in(PRNGKey(seed), lo)``.
    batch_size: images per call.
    mean_fn: decoder output -> mean image.

  Returns:
    (N, H, W, C) float32 augmented images on the 1/255 grid.
  """
  key = jax.random.PRNGKey(seed)
  out = [np.asarray(augment_images(vae, vae_params, jnp.asarray(x[lo:lo + batch_size], jnp.float32),
                                   jnp.float32(log_var), jax.random.fold_in(key, lo), binary,
                                   mean_fn))
         for lo in range(0, x.shape[0], batch_size)]
  return np.concatenate(out) if out else np.zeros_like(x, np.float32)


def augmentation_spread(vae: Model, vae_params: PyTree, x: np.ndarray, log_var: float, *,
                        binary: bool, seed: int = 0, batch_size: int = 500,
                        mean_fn: Callable[[Any], jax.Array] = bernoulli_mean) -> dict[str, float]:
  """How far the augmented images lie from their sources, and why.

  Three mean absolute per-pixel distances (grey levels in [0, 1]):
  ``aug_to_x`` (augmented image to the real one), ``recon_to_x`` (the decoded
  encoder mean, no sampling noise, to the real one) and ``aug_to_recon``
  (what the z ~ N(mu, s2 I) noise adds on top of the reconstruction).

  Args:
    vae, vae_params: the generative model.
    x: (N, H, W, C) grey levels in [0, 1].
    log_var: log s2 of the augmentation noise.
    binary: encode ``Bernoulli(x)`` (as :func:`augment_images`).
    seed: the noise seed.
    batch_size: images per call.
    mean_fn: decoder output -> mean image.

  Returns:
    ``{'aug_to_x', 'recon_to_x', 'aug_to_recon'}``, means over all pixels of ``x``.
  """
  x = np.asarray(x, np.float32)
  copies = functools.partial(augmented_set, vae, vae_params, x, binary=binary, seed=seed,
                             batch_size=batch_size, mean_fn=mean_fn)
  aug = copies(float(log_var))
  # The same encoder input and keys with no latent noise (s2 -> 0): the reconstruction.
  rec = copies(-1e4)
  mean_abs = lambda a, b: float(np.sum(np.abs(a - b), dtype=np.float64) / max(x.size, 1))  # noqa: E731
  return {"aug_to_x": mean_abs(aug, x), "recon_to_x": mean_abs(rec, x),
          "aug_to_recon": mean_abs(aug, rec)}


def run_augmentation(trained, *, epochs: int, hidden: int, use_val: bool = True,
                     seed: int = 0, seeds: Sequence[int] | None = None,
                     encode_input: str = "grey", log_var: float | None = None,
                     max_steps: int | None = None, progress: bool = False,
                     probe: int = 10000,
                     arms: Sequence[str] = ARMS, log_every: int = 0,
                     done_dir: str | None = None) -> dict[str, Any]:
  """Trains the classifier without and with augmentation, for each seed; returns test errors.

  Args:
    trained: a :class:`exvae.bank.Trained` (its model generates the augmentations).
    epochs: classifier epochs.
    hidden: MLP width h.
    use_val: train on train + validation (the paper's setting), else train only.
    seed: classifier seed when ``seeds`` is not given.
    seeds: classifier seeds; each seed trains both arms with the same init and orders.
    encode_input: what the encoder sees, one of :data:`ENCODE_INPUTS`.
    log_var: augmentation noise log s2 (default: the prior's; mean posterior
      log-variance for priors without one).
    max_steps: cap on steps (tests).
    progress: show progress bars.
    probe: training images on which each classifier's error is measured, real
      and augmented.
    arms: which classifiers to train, ``"without"`` and/or ``"with"``
      augmentation (e.g. only ``"with"`` when sweeping ``log_var``).
    log_every: a progress line every this many classifier epochs (0: none).
    done_dir: where each finished classifier's result is written
      (``seed<S>_<arm>.json``, :func:`classifier_record`). A classifier whose
      record there has the same settings (model parameters, epochs, width,
      training set, s2, encoder input, step cap, probe, seed, arm) is not
      trained again: an interrupted run, started again with the same
      ``done_dir``, loses at most the last 10 epochs of the classifier it was
      training (``seed<S>_<arm>.partial.npz`` keeps its state every 10 epochs).

  Returns:
    JSON-able dict: ``runs`` (one entry per seed with both test errors),
    ``test_error_without`` / ``test_error_with`` (means over the seeds) with
    ``*_std`` (sample standard deviation, 0 for one seed), ``spread``
    (:func:`augmentation_spread` on up to 2000 training images) and the settings.
    Each run also has ``train_error_*`` and ``aug_error_*``: the trained
    classifier's error on up to ``probe`` of its real training images and on
    one fixed augmented copy of each (seed 0). ``aug_error_without`` is how
    often a classifier that never saw an augmented image disagrees with the
    label the augmentation keeps: the label noise the augmentation brings.
  """
  from exvae import bank as bank_lib
  seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds must name at least one classifier seed")
  if not arms or set(arms) - set(ARMS):
    raise ValueError(f"arms must be 'without' and/or 'with', got {list(arms)}")
  arms = tuple(a for a in ARMS if a in arms)
  binary = binarise_before_encoding(encode_input, trained.splits.binary)
  g = grey_splits(trained.config, trained.splits)
  x, y = g.train_x, g.train_y
  if use_val:
    x, y = np.concatenate([x, g.val_x]), np.concatenate([y, g.val_y])
  model, mp = trained.setup.model, trained.params["model"]
  source = "given"
  if log_var is None:
    mean_lv = None
    if "log_var" not in trained.params.get("prior", {}):
      _, mean_lv = bank_lib.encode_images(model, mp, g.train_x, np.arange(g.train_x.shape[0]),
                                          jax.random.PRNGKey(0), binary=trained.splits.binary,
                                          with_logvar=True)
    log_var, source = bank_lib.bank_log_var(trained, mean_lv)
  out: dict[str, Any] = {"epochs": int(epochs), "hidden": int(hidden), "use_val": bool(use_val),
                         "num_train": int(x.shape[0]), "num_test": int(g.test_x.shape[0]),
                         "grey_eval": bool(g.grey_eval), "log_var": float(log_var),
                         "log_var_source": source, "encode_input": encode_input,
                         "seeds": seeds, "arms": list(arms), "runs": []}
  out["spread"] = augmentation_spread(model, mp, g.train_x[:2000], float(log_var), binary=binary,
                                      mean_fn=trained.setup.mean_fn)
  probe_x, probe_y = x[:probe], y[:probe]
  probe_aug = augmented_set(model, mp, probe_x, float(log_var), binary=binary,
                            mean_fn=trained.setup.mean_fn)
  out["probe"] = int(probe_x.shape[0])
  common = {"model": bank_lib.params_fingerprint(mp), "epochs": int(epochs),
            "hidden": int(hidden), "num_train": int(x.shape[0]),
            "train_images": _digest(x, y), "log_var": float(log_var),
            "encode_input": encode_input,
            "max_steps": None if max_steps is None else int(max_steps),
            "probe": int(probe_x.shape[0])}
  out["reused"] = []
  for s in seeds:
    row: dict[str, Any] = {"seed": s}
    for tag in arms:
      settings = dict(common, seed=s, arm=tag)
      path = None if done_dir is None else os.path.join(done_dir, f"seed{s}_{tag}.json")
      result = None if path is None else _read_record(path, settings)
      if result is not None:
        out["reused"].append(f"seed{s}_{tag}")
        print(f"seed {s} {tag} augmentation: done before, read from {path}", flush=True)
      else:
        ckpt = None if done_dir is None else os.path.join(done_dir, f"seed{s}_{tag}.partial.npz")
        r = train_classifier(x, y, g.test_x, g.test_y, hidden=hidden, epochs=epochs,
                             augment=tag == "with", vae=model, vae_params=mp, log_var=log_var,
                             binary=binary, seed=s, max_steps=max_steps,
                             mean_fn=trained.setup.mean_fn, progress=progress,
                             log_every=log_every, checkpoint_path=ckpt,
                             checkpoint_identity=settings)
        result = {"test_error": r["test_error"],
                  "final_loss": r["losses"][-1] if r["losses"] else None,
                  "seconds": r["seconds"],
                  "train_error": error_rate(r["classifier"], r["params"], probe_x, probe_y),
                  "aug_error": error_rate(r["classifier"], r["params"], probe_aug, probe_y),
                  "steps": r["steps"]}
        if path is not None:
          os.makedirs(done_dir, exist_ok=True)
          atomic.write_json(path, classifier_record(settings, result))
          if os.path.exists(ckpt):
            os.remove(ckpt)
      for what in ("test_error", "final_loss", "seconds", "train_error", "aug_error"):
        row[f"{what}_{tag}"] = result[what]
      out["steps"] = result["steps"]
    out["runs"].append(row)
  for tag in arms:
    for what in ("test_error", "train_error", "aug_error"):
      errs = np.array([r[f"{what}_{tag}"] for r in out["runs"]])
      out[f"{what}_{tag}"] = float(errs.mean())
      out[f"{what}_{tag}_std"] = float(errs.std(ddof=1)) if errs.size > 1 else 0.0
  return out


# ----------------------------------------------------------------------------
# One record per finished classifier (resuming a long augmentation)
# ----------------------------------------------------------------------------

RECORD_VERSION = 2     # 2: the record carries a digest of itself (atomic.SELF_DIGEST)


def _digest(x: np.ndarray, y: np.ndarray) -> str:
  """A short hash of the classifier's training images and labels."""
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)):
    h.update(f"{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def classifier_record(settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
  """The JSON record of one finished classifier.

  Args:
    settings: everything the result depends on (the model parameters'
      fingerprint, epochs, width, training set, s2, encoder input, step cap,
      probe size, seed and arm).
    result: ``test_error``, ``final_loss``, ``seconds``, ``train_error``,
      ``aug_error`` and ``steps``.

  Returns:
    ``{"version", "settings", "result", "record_sha256"}``: the last is the digest of
    the rest, checked before the result is reused.
  """
  return atomic.with_self_digest({"version": RECORD_VERSION, "settings": settings,
                                  "result": result})


def _read_record(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
  """The result in ``path`` if it was made with ``settings``, else None (with a line why)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      rec = json.load(f)
    ok = (rec.get("version") == RECORD_VERSION and rec.get("settings") == settings
          and isinstance(rec.get("result"), dict))
    if ok:
      atomic.check_self_digest(rec, path, required=True)
  except (OSError, ValueError, AttributeError) as e:
    print(f"{path}: unreadable ({type(e).__name__}: {e}); training this classifier again",
          flush=True)
    return None
  if not ok:
    print(f"{path}: made with other settings; training this classifier again", flush=True)
    return None
  return rec["result"]


def _write_classifier_checkpoint(path: str, identity: str, state: ClassifierState,
                                 losses: list[float], seconds: float) -> None:
  """Saves a classifier's train state, its per-step losses and its time so far."""
  leaves = jax.tree_util.tree_leaves(jax.device_get(state))
  arrays = {f"leaf_{i}": np.asarray(a) for i, a in enumerate(leaves)}
  resumable.save(path, identity, {**arrays, "losses": np.asarray(losses, np.float64),
                                  "seconds": np.float64(seconds)})


def _read_classifier_checkpoint(path: str, identity: str, template: ClassifierState):
  """``(state, losses, seconds)`` from a checkpoint made with ``identity``, else None.

  A missing file gives None; an unreadable one, one made with other settings or
  one of other shapes gives None with a line that says so.
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  like = {f"leaf_{i}": np.asarray(t) for i, t in enumerate(leaves)}
  f = resumable.load(path, identity, {**like, "losses": None, "seconds": np.float64(0)},
                     what="classifier checkpoint", restart="training from the start")
  if f is None:
    return None
  state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(f[k]) for k in like])
  return state, [float(v) for v in f["losses"]], float(f["seconds"])
