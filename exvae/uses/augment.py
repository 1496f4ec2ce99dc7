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

import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exvae import atomic, stopping
from exvae import bank as bank_lib
from exvae.likelihoods import bernoulli_mean
from exvae.models.base import Model
from exvae.uses import classifier
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


@stopping.deferring
def run_augmentation(
  trained,
  *,
  epochs: int,
  hidden: int,
  use_val: bool = True,
  seed: int = 0,
  seeds: Sequence[int] | None = None,
  encode_input: str = "grey",
  log_var: float | None = None,
  max_steps: int | None = None,
  progress: bool = False,
  probe: int = 10000,
  arms: Sequence[str] = ARMS,
  log_every: int = 0,
  done_dir: str | None = None,
) -> dict[str, Any]:
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
  seeds, arms = _seeds_and_arms(seed, seeds, arms)
  binary = binarise_before_encoding(encode_input, trained.splits.binary)
  g = classifier.grey_splits(trained.config, trained.splits)
  x, y = _training_set(g, use_val)
  model, mp, mean_fn = trained.setup.model, trained.params["model"], trained.setup.mean_fn
  log_var, source = _noise_log_var(trained, g.train_x, log_var)
  out: dict[str, Any] = {
    "epochs": int(epochs),
    "hidden": int(hidden),
    "use_val": bool(use_val),
    "num_train": int(x.shape[0]),
    "num_test": int(g.test_x.shape[0]),
    "grey_eval": bool(g.grey_eval),
    "log_var": float(log_var),
    "log_var_source": source,
    "encode_input": encode_input,
    "seeds": seeds,
    "arms": list(arms),
    "runs": [],
  }
  out["spread"] = augmentation_spread(
    model, mp, g.train_x[:2000], float(log_var), binary=binary, mean_fn=mean_fn
  )
  probes = (
    x[:probe],
    y[:probe],
    augmented_set(model, mp, x[:probe], float(log_var), binary=binary, mean_fn=mean_fn),
  )
  out["probe"] = int(probes[0].shape[0])
  common = _classifier_settings(
    mp,
    x,
    y,
    epochs=epochs,
    hidden=hidden,
    log_var=log_var,
    encode_input=encode_input,
    max_steps=max_steps,
    probe=out["probe"],
  )
  fit = dict(
    hidden=hidden,
    epochs=epochs,
    vae=model,
    vae_params=mp,
    log_var=log_var,
    binary=binary,
    max_steps=max_steps,
    mean_fn=mean_fn,
    progress=progress,
    log_every=log_every,
  )
  out["runs"], out["reused"], out["steps"] = _train_seeds(
    seeds, arms, common, (x, y, g.test_x, g.test_y), probes, done_dir, fit
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


def _classifier_settings(
  model_params: PyTree,
  x: np.ndarray,
  y: np.ndarray,
  *,
  epochs: int,
  hidden: int,
  log_var: float,
  encode_input: str,
  max_steps: int | None,
  probe: int,
) -> dict[str, Any]:
  """What every classifier's result depends on but its seed and arm (its record's identity).

  Args:
    model_params: the generative model's parameters (fingerprinted).
    x, y: the classifiers' training images and labels (digested).
    epochs, hidden, log_var, encode_input, max_steps: as :func:`run_augmentation`.
    probe: the number of training images the train and augmented-image errors are measured on.

  Returns:
    A JSON-able dict.
  """
  return {
    "model": bank_lib.params_fingerprint(model_params),
    "epochs": int(epochs),
    "hidden": int(hidden),
    "num_train": int(x.shape[0]),
    "train_images": _digest(x, y),
    "log_var": float(log_var),
    "encode_input": encode_input,
    "max_steps": None if max_steps is None else int(max_steps),
    "probe": int(probe),
  }


def _train_seeds(
  seeds: list[int],
  arms: Sequence[str],
  common: dict[str, Any],
  split: tuple[np.ndarray, ...],
  probes: tuple[np.ndarray, ...],
  done_dir: str | None,
  fit: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[str], int]:
  """Every seed's classifier of every arm: read from ``done_dir`` if finished before, else trained.

  Args:
    seeds, arms: which classifiers.
    common: :func:`_classifier_settings`; with the seed and arm, a classifier's identity.
    split, probes, done_dir, fit: as :func:`_train_arm`.

  Returns:
    ``(runs, reused, steps)``: one row per seed (each arm's test error, final
    loss, seconds, train and augmented-image errors), the names of the
    classifiers read from ``done_dir``, and the steps of the last one.
  """
  runs, reused, steps = [], [], None
  for s in seeds:
    row: dict[str, Any] = {"seed": s}
    for tag in arms:
      settings = dict(common, seed=s, arm=tag)
      result = _finished_before(done_dir, s, tag, settings)
      if result is not None:
        reused.append(_name(s, tag))
      else:
        result = _train_arm(split, probes, s, tag, settings, done_dir, fit)
      for what in ("test_error", "final_loss", "seconds", "train_error", "aug_error"):
        row[f"{what}_{tag}"] = result[what]
      steps = result["steps"]
    runs.append(row)
  return runs, reused, steps


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


def _name(seed: int, tag: str) -> str:
  """A classifier's name in ``done_dir``: ``seed<S>_<arm>`` (``.json``, ``.partial.npz``)."""
  return f"seed{seed}_{tag}"


def _finished_before(
  done_dir: str | None, seed: int, tag: str, settings: dict[str, Any]
) -> dict[str, Any] | None:
  """The classifier's result if ``done_dir`` holds its record made with ``settings``, else None."""
  if done_dir is None:
    return None
  path = os.path.join(done_dir, f"{_name(seed, tag)}.json")
  result = _read_record(path, settings)
  if result is not None:
    print(f"seed {seed} {tag} augmentation: done before, read from {path}", flush=True)
  return result


def _train_arm(
  split: tuple[np.ndarray, ...],
  probes: tuple[np.ndarray, ...],
  seed: int,
  tag: str,
  settings: dict[str, Any],
  done_dir: str | None,
  fit: dict[str, Any],
) -> dict[str, Any]:
  """Trains one classifier (``tag``: without or with augmentation) and measures it.

  Args:
    split: ``(x, y, test_x, test_y)``, its training and test images and labels.
    probes: ``(x, y, x_aug)``: training images, their labels and one augmented copy
      of each, on which its train and augmented-image errors are measured.
    seed: the classifier's seed.
    tag: ``"without"`` or ``"with"``.
    settings: what the result depends on (its record's and checkpoint's identity).
    done_dir: where its record is written (and its state kept while it trains), or None.
    fit: the other arguments of :func:`exvae.uses.classifier.train_classifier`.

  Returns:
    ``{'test_error', 'final_loss', 'seconds', 'train_error', 'aug_error', 'steps'}``.
  """
  x, y, test_x, test_y = split
  probe_x, probe_y, probe_aug = probes
  name = _name(seed, tag)
  ckpt = None if done_dir is None else os.path.join(done_dir, f"{name}.partial.npz")
  r = classifier.train_classifier(
    x,
    y,
    test_x,
    test_y,
    augment=tag == "with",
    seed=seed,
    checkpoint_path=ckpt,
    checkpoint_identity=settings,
    **fit,
  )
  result = {
    "test_error": r["test_error"],
    "final_loss": r["losses"][-1] if r["losses"] else None,
    "seconds": r["seconds"],
    "train_error": classifier.error_rate(r["classifier"], r["params"], probe_x, probe_y),
    "aug_error": classifier.error_rate(r["classifier"], r["params"], probe_aug, probe_y),
    "steps": r["steps"],
  }
  if done_dir is not None:
    os.makedirs(done_dir, exist_ok=True)
    atomic.write_json(os.path.join(done_dir, f"{name}.json"), classifier_record(settings, result))
    if os.path.exists(ckpt):
      os.remove(ckpt)
  return result


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


# ----------------------------------------------------------------------------
# One record per finished classifier (resuming a long augmentation)
# ----------------------------------------------------------------------------

RECORD_VERSION = 2  # 2: the record carries a digest of itself (atomic.SELF_DIGEST)


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
  return atomic.with_self_digest(
    {"version": RECORD_VERSION, "settings": settings, "result": result}
  )


def _read_record(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
  """The result in ``path`` if it was made with ``settings``, else None (with a line why)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      rec = json.load(f)
    ok = (
      rec.get("version") == RECORD_VERSION
      and rec.get("settings") == settings
      and isinstance(rec.get("result"), dict)
    )
    if ok:
      atomic.check_self_digest(rec, path, required=True)
  except (OSError, ValueError, AttributeError) as e:
    print(
      f"{path}: unreadable ({type(e).__name__}: {e}); training this classifier again", flush=True
    )
    return None
  if not ok:
    print(f"{path}: made with other settings; training this classifier again", flush=True)
    return None
  return rec["result"]
