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
    run.log_px(run.splits.test_x[:8])              # (8,) IWAE estimates of log p(x), nats
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
    meta: what the run's training recorded, the same keys for a run directory and
      a published model: ``best_epoch`` (1-based, as training prints it; 0 when
      no epoch was validated) and ``best_val`` (its validation loss, or None).
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
  # The built context in a 1-tuple: a prior without one builds None, and that is cached too.
  _ctx: tuple | None = dataclasses.field(default=None, repr=False)

  def context(self) -> PyTree:
    """The prior's evaluation context, built once.

    Returns:
      The prior's own context type (exemplar prior: an
      :class:`exvae.priors.ExemplarContext` of every training exemplar), or
      None for a prior that needs none.
    """
    if self._ctx is None:
      from exvae import evaluation

      key = jax.random.PRNGKey(int(self.config.eval.bank_seed))
      self._ctx = (
        evaluation.eval_context(
          self.params, jnp.asarray(self.splits.train_x), key, setup=self.setup
        ),
      )
    return self._ctx[0]

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

  def scores(
    self,
    x: np.ndarray,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    progress: bool = False,
  ) -> dict[str, np.ndarray]:
    """Per-image importance-sampled scores, as ``exvae-eval`` computes them.

    The same function as ``exvae-eval`` (:func:`exvae.evaluation.evaluate_split`, chunked
    so memory does not depend on S or on the number of images), with the same key
    (``PRNGKey(seed)``) and the same evaluation context: the same images in the same
    order, S and seed give the numbers of its ``per_example.npz``. An image's draws
    depend on its place among ``x`` (its batch), not only on the image.

    Args:
      x: (B, H, W, C) images in [0, 1]; for binary data sets, binary images (the
        test images in ``splits`` are binarised once, as ``exvae-eval`` scores them).
      num_samples: importance samples S per image (default ``config.eval.num_importance_samples``).
      seed: the sampling seed (default ``config.eval.seed``, as ``exvae-eval``).
      progress: show a progress bar.

    Returns:
      dict of (B,) float64 arrays in nats, the keys of ``per_example.npz``:
      ``log_px`` (the IWAE estimate of log p(x)), ``elbo`` (the ELBO estimate, a lower
      bound), ``recon`` (-E_q log p(x|z)) and ``kl`` (E_q[log q(z|x) - log p(z)]).

    Raises:
      ValueError: ``x`` is not a batch of images of the run's shape in [0, 1], or not
        binary for a binary data set.
    """
    from exvae import data, evaluation

    x = np.asarray(x, np.float32)
    data.validate_images(x, image_shape=tuple(self.splits.image_shape), name="x")
    if self.splits.binary and not np.all((x == 0) | (x == 1)):
      raise ValueError(
        "x: this model scores binary images (its data set is binarised); "
        "binarise them first, e.g. exvae.data.binarize(x, seed)"
      )
    s = int(self.config.eval.num_importance_samples if num_samples is None else num_samples)
    if s < 1:
      raise ValueError(f"num_samples must be >= 1, got {s}")
    key = jax.random.PRNGKey(int(self.config.eval.seed if seed is None else seed))
    res = evaluation.evaluate_split(
      self.params,
      self.setup,
      self.context(),
      x,
      key,
      num_samples=s,
      max_queries=int(self.config.eval.max_queries),
      progress=progress,
      desc=f"log p(x) (S={s})",
    )
    return {
      "log_px": res["log_px_iwae"],
      "elbo": res["elbo"],
      "recon": res["recon"],
      "kl": res["kl"],
    }

  def log_px(
    self,
    x: np.ndarray,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    progress: bool = False,
  ) -> np.ndarray:
    """IWAE estimates of log p(x) per image (nats): ``scores(x, ...)["log_px"]``.

    Args and defaults as :meth:`scores`.

    Returns:
      (B,) float64; ``-run.log_px(x).mean()`` is the NLL ``exvae-eval`` reports for ``x``.
    """
    return self.scores(x, num_samples=num_samples, seed=seed, progress=progress)["log_px"]

  def sample(self, key: jax.Array, n: int) -> np.ndarray:
    """Draws codes from the run's prior.

    Args:
      key: a PRNG key.
      n: the number of codes.

    Returns:
      (n, d) float32 codes.
    """
    return np.asarray(self.prior.sample(self.params["prior"], key, int(n), self.context()))


def load_run(
  workdir: str,
  *,
  config: Any = None,
  overrides: Sequence[tuple[str, str]] = (),
  bank: bool = True,
  progress: bool = False,
) -> Run:
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
    exvae.errors.ConfigDriftError: ``config`` is not the one the run was trained with.
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
  b = (
    bank_lib.from_checkpoint(config, workdir, trained=trained, progress=progress) if bank else None
  )
  return Run(
    workdir=workdir,
    config=config,
    model=trained.setup.model,
    params=trained.params,
    prior=trained.setup.prior,
    bank=b,
    splits=trained.splits,
    meta=dict(trained.meta),
    setup=trained.setup,
  )
