"""Generative data augmentation with an Exemplar VAE (the paper's classifier setup).

The paper's MLP classifier (:mod:`exvae.uses.classifier`) is trained twice on
the same images, seeds and orders: without augmentation, and with the loss

    0.4 * CE(f(x), y) + 0.6 * CE(f(x_aug), y),

where ``x_aug`` is decoded from ``z ~ N(mu(x), s2 I)`` (the decoder's mean
image, e.g. the Bernoulli mean, rounded to the 1/255 grey-level grid;
:func:`exvae.uses.generation.augment_images`) and keeps x's label.
:func:`run_augmentation` reports both test errors, how far the augmented images
lie from their sources (:func:`augmentation_spread`), and keeps one record per
finished classifier so that a stopped run started again trains only the rest.

What the encoder sees is ``encode_input``: ``"grey"`` (the default, as the
authors' ``analysis.py --classify``, which loads the data with
``no_binarization=True`` and encodes the grey batch itself) or
``"bernoulli"`` (a fresh ``Bernoulli(x)`` per step, as during VAE training;
it adds the binarisation noise to the spread of the augmented images).

Inputs are grey-level images in [0, 1]
(:func:`exvae.uses.classifier.grey_splits`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exvae import stopping
from exvae import bank as bank_lib
from exvae.likelihoods import bernoulli_mean
from exvae.models.base import Model
from exvae.uses import augment_runs, classifier
from exvae.uses.augment_runs import RECORD_VERSION, classifier_record  # noqa: F401 (their old home)
from exvae.uses.generation import augment_images

PyTree = Any

ENCODE_INPUTS = ("grey", "bernoulli")  # what the encoder sees; "grey" is the reference's
ARMS = ("without", "with")  # the classifiers: without and with augmentation


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


def augmented_set(
  vae: Model,
  vae_params: PyTree,
  x: np.ndarray,
  log_var: float,
  *,
  binary: bool,
  seed: int = 0,
  batch_size: int = 500,
  mean_fn: Callable[[Any], jax.Array] = bernoulli_mean,
) -> np.ndarray:
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
  out = [
    np.asarray(
      augment_images(
        vae,
        vae_params,
        jnp.asarray(x[lo : lo + batch_size], jnp.float32),
        jnp.float32(log_var),
        jax.random.fold_in(key, lo),
        binary,
        mean_fn,
      )
    )
    for lo in range(0, x.shape[0], batch_size)
  ]
  return np.concatenate(out) if out else np.zeros_like(x, np.float32)


def augmentation_spread(
  vae: Model,
  vae_params: PyTree,
  x: np.ndarray,
  log_var: float,
  *,
  binary: bool,
  seed: int = 0,
  batch_size: int = 500,
  mean_fn: Callable[[Any], jax.Array] = bernoulli_mean,
) -> dict[str, float]:
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
  copies = functools.partial(
    augmented_set,
    vae,
    vae_params,
    x,
    binary=binary,
    seed=seed,
    batch_size=batch_size,
    mean_fn=mean_fn,
  )
  aug = copies(float(log_var))
  # The same encoder input and keys with no latent noise (s2 -> 0): the reconstruction.
  rec = copies(-1e4)
  mean_abs = lambda a, b: float(np.sum(np.abs(a - b), dtype=np.float64) / max(x.size, 1))  # noqa: E731
  return {
    "aug_to_x": mean_abs(aug, x),
    "recon_to_x": mean_abs(rec, x),
    "aug_to_recon": mean_abs(aug, rec),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class AugmentSettings:
  """The settings of an augmentation experiment (:func:`run_augmentation`'s keywords).

  Attributes:
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
    done_dir: where each finished classifier's record is written, and read back
      instead of training it again when a stopped run is started again
      (:mod:`exvae.uses.augment_runs`); None: no records.
  """

  epochs: int
  hidden: int
  use_val: bool = True
  seed: int = 0
  seeds: Sequence[int] | None = None
  encode_input: str = "grey"
  log_var: float | None = None
  max_steps: int | None = None
  progress: bool = False
  probe: int = 10000
  arms: Sequence[str] = ARMS
  log_every: int = 0
  done_dir: str | None = None


@stopping.deferring
def run_augmentation(
  trained, settings: AugmentSettings | None = None, **kwargs: Any
) -> dict[str, Any]:
  """Trains the classifier without and with augmentation, for each seed; returns test errors.

  Args:
    trained: a :class:`exvae.bank.Trained` (its model generates the augmentations).
    settings: the experiment's settings (:class:`AugmentSettings`).
    **kwargs: instead of ``settings``, its fields as keywords (``epochs`` and ``hidden``
      are required).

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

  Raises:
    TypeError: both ``settings`` and keywords, or a keyword that is not a field.
    ValueError: no seed, no arm, or an arm other than ``"without"`` and ``"with"``.
  """
  if settings is not None and kwargs:
    raise TypeError("run_augmentation takes settings or their fields as keywords, not both")
  a = AugmentSettings(**kwargs) if settings is None else settings
  seeds, arms = _seeds_and_arms(a.seed, a.seeds, a.arms)
  binary = binarise_before_encoding(a.encode_input, trained.splits.binary)
  g = classifier.grey_splits(trained.config, trained.splits)
  x, y = _training_set(g, a.use_val)
  model, mp, mean_fn = trained.setup.model, trained.params["model"], trained.setup.mean_fn
  log_var, source = _noise_log_var(trained, g.train_x, a.log_var)
  out: dict[str, Any] = {
    "epochs": int(a.epochs),
    "hidden": int(a.hidden),
    "use_val": bool(a.use_val),
    "num_train": int(x.shape[0]),
    "num_test": int(g.test_x.shape[0]),
    "grey_eval": bool(g.grey_eval),
    "log_var": float(log_var),
    "log_var_source": source,
    "encode_input": a.encode_input,
    "seeds": seeds,
    "arms": list(arms),
    "runs": [],
  }
  aug = dict(binary=binary, mean_fn=mean_fn)
  out["spread"] = augmentation_spread(model, mp, g.train_x[:2000], float(log_var), **aug)
  probes = (
    x[: a.probe],
    y[: a.probe],
    augmented_set(model, mp, x[: a.probe], float(log_var), **aug),
  )
  out["probe"] = int(probes[0].shape[0])
  fit = dict(
    hidden=a.hidden,
    epochs=a.epochs,
    vae=model,
    vae_params=mp,
    log_var=log_var,
    binary=binary,
    max_steps=a.max_steps,
    mean_fn=mean_fn,
    progress=a.progress,
    log_every=a.log_every,
  )
  common = augment_runs.classifier_settings(
    x, y, fit, encode_input=a.encode_input, probe=out["probe"]
  )
  out["runs"], out["reused"], out["steps"] = augment_runs.train_seeds(
    seeds, arms, common, (x, y, g.test_x, g.test_y), probes, a.done_dir, fit
  )
  out.update(_mean_errors(out["runs"], arms))
  return out


def _seeds_and_arms(
  seed: int, seeds: Sequence[int] | None, arms: Sequence[str]
) -> tuple[list[int], tuple[str, ...]]:
  """The classifier seeds (``[seed]`` unless ``seeds`` are given) and arms, in :data:`ARMS` order.

  Raises:
    ValueError: no seed, no arm, or an arm other than ``"without"`` and ``"with"``.
  """
  seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds must name at least one classifier seed")
  if not arms or set(arms) - set(ARMS):
    raise ValueError(f"arms must be 'without' and/or 'with', got {list(arms)}")
  return seeds, tuple(a for a in ARMS if a in arms)


def _training_set(g: classifier.GreyData, use_val: bool) -> tuple[np.ndarray, np.ndarray]:
  """The classifiers' training images and labels: train, and validation too with ``use_val``."""
  if use_val:
    return np.concatenate([g.train_x, g.val_x]), np.concatenate([g.train_y, g.val_y])
  return g.train_x, g.train_y


def _noise_log_var(trained, train_x: np.ndarray, log_var: float | None) -> tuple[float, str]:
  """The augmentation's log s2 and where it comes from.

  Given, it is used as it is; otherwise the prior's (the bank's), or for a prior
  without one the mean posterior log-variance of ``train_x``
  (:func:`exvae.bank.bank_log_var`).
  """
  if log_var is not None:
    return log_var, "given"
  mean_lv = None
  if "log_var" not in trained.params.get("prior", {}):
    _, mean_lv = bank_lib.encode_images(
      trained.setup.model,
      trained.params["model"],
      train_x,
      np.arange(train_x.shape[0]),
      jax.random.PRNGKey(0),
      binary=trained.splits.binary,
      with_logvar=True,
    )
  return bank_lib.bank_log_var(trained, mean_lv)


def _mean_errors(runs: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, float]:
  """Each arm's test, train and augmented-image errors: the mean over the seeds, and
  ``*_std`` the sample standard deviation (0 for one seed)."""
  out = {}
  for tag in arms:
    for what in ("test_error", "train_error", "aug_error"):
      errs = np.array([r[f"{what}_{tag}"] for r in runs])
      out[f"{what}_{tag}"] = float(errs.mean())
      out[f"{what}_{tag}_std"] = float(errs.std(ddof=1)) if errs.size > 1 else 0.0
  return out
