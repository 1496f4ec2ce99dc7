"""A trained run in a notebook: ``run = exvae.load_run("runs/fx")``.

:func:`load_run` reads the run's own ``config.json`` (as JSON), restores the
best-on-validation parameters read-only (the run directory is never
modified, also while training writes it) and builds the run's exemplar bank
from the training split, as ``exvae-eval`` and ``exvae-uses`` do. The
returned :class:`Run` holds the model, its parameters, the prior and the bank,
with the few calls a notebook needs::

    import jax, exvae
    run = exvae.load_run("runs/fx")
    z = run.encode(run.splits.test_x[:8])          # (8, d) encoder means
    run.log_prob(z)                                # (8,) log p(z) under the run's prior
    z_new = run.sample(jax.random.PRNGKey(0), 16)  # (16, d) codes from the prior
    images = run.decode(z_new)                     # (16, H, W, C) mean images
    dist, rows = run.bank.nearest(z, k=5)          # kNN among the training exemplars
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass
class Run:
  """A trained run, restored read-only.

  Attributes:
    workdir: the run directory.
    config: the run's ConfigDict (its ``config.json``, plus any overrides).
    model: the :class:`exvae.models.Model` (pure functions of ``params["model"]``).
    params: ``{"model": ..., "prior": ...}``, the best-on-validation parameters.
    prior: the :class:`exvae.priors.Prior` (pure functions of ``params["prior"]``).
    bank: the :class:`exvae.bank.ExemplarBank` of the training split (codes,
      labels, ``log_prob``, ``sample``, ``nearest``), or None if not built.
    splits: the loaded data (``train_x``, ``val_x``, ``test_x``, labels).
    meta: the checkpoint's metadata (``best_epoch`` 0-based, ``best_val``, ...).
    setup: the static run description (likelihood, ``mean_fn``).
  """

  workdir: str
  config: Any
  model: Any
  params: PyTree
  prior: Any
  bank: Any
  splits: Any
  meta: dict
  setup: Any
  _ctx: Any = dataclasses.field(default=None, repr=False)

  def context(self) -> PyTree:
    """The prior's evaluation context (exemplar prior: every training exemplar), built once."""
    if self._ctx is None:
      from exvae import train_lib
      key = jax.random.PRNGKey(int(self.config.eval.bank_seed))
      self._ctx = train_lib.eval_context(self.params, jnp.asarray(self.splits.train_x), key,
                                         setup=self.setup)
    return self._ctx

  def encode(self, x: np.ndarray) -> np.ndarray:
    """Encoder means of images.

    Args:
      x: (B, H, W, C) images in [0, 1] (binarised test images as in ``splits``).

    Returns:
      (B, d) float32 codes.
    """
    mu, _ = self.model.encode(self.params["model"], jnp.asarray(x, jnp.float32))
    return np.asarray(mu)

  def decode(self, z: np.ndarray) -> np.ndarray:
    """Mean images of codes.

    Args:
      z: (B, d) codes.

    Returns:
      (B, H, W, C) float32 images in [0, 1].
    """
    out = self.model.decode(self.params["model"], jnp.asarray(z, jnp.float32))
    return np.asarray(self.setup.mean_fn(out))

  def log_prob(self, z: np.ndarray) -> np.ndarray:
    """log p(z) under the run's prior (exemplar prior: over all training exemplars).

    Args:
      z: (B, d) codes.

    Returns:
      (B,) float32 log-densities (nats).
    """
    z = jnp.asarray(z, jnp.float32)
    return np.asarray(self.prior.log_prob(self.params["prior"], z, self.context()))

  def sample(self, key: jax.Array, n: int) -> np.ndarray:
    """Draws codes from the run's prior.

    Args:
      key: a PRNG key.
      n: the number of codes.

    Returns:
      (n, d) float32 codes.
    """
    return np.asarray(self.prior.sample(self.params["prior"], key, int(n), self.context()))


def load_run(workdir: str, *, config: Any = None, overrides: Sequence[tuple[str, str]] = (),
             bank: bool = True, progress: bool = False) -> Run:
  """Loads a trained run for interactive use, without modifying its directory.

  Args:
    workdir: the run directory (holds ``config.json`` and ``checkpoints/``).
    config: the run's config, a config name or file, or None (the run's
      ``config.json``).
    overrides: ``(dotted key, text)`` pairs applied on top, as
      ``--config.KEY=VALUE`` would be (e.g. ``[("data_dir", "/data")]``).
    bank: also build the exemplar bank of the training split (one encoder
      pass over it).
    progress: show a progress bar while the bank is built.

  Returns:
    The :class:`Run`.

  Raises:
    FileNotFoundError: no ``config.json`` in ``workdir`` and no ``config`` given.
    exvae.checkpoints.CheckpointNotFoundError: no checkpoint in ``workdir``.
    exvae.rundir.ConfigDriftError: ``config`` is not the one the run was trained with.
  """
  import os

  from exvae import bank as bank_lib
  from exvae import config_registry
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist: give the run's config (config=...).")
    config = config_registry.from_json(path)
  elif isinstance(config, str):
    config = config_registry.load(config)
  config_registry.apply_overrides(config, overrides)
  trained = bank_lib.restore_trained(config, workdir)
  b = (bank_lib.from_checkpoint(config, workdir, trained=trained, progress=progress)
       if bank else None)
  return Run(workdir=workdir, config=config, model=trained.setup.model, params=trained.params,
             prior=trained.setup.prior, bank=b, splits=trained.splits, meta=dict(trained.meta),
             setup=trained.setup)
