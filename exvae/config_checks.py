"""Config checks: every check of a run's config values, in one place.

Two stages, each run once per training start:

- :func:`check_training_config` (:func:`exvae.train_lib.train_and_evaluate`, before
  the run directory is locked or any data is loaded): the plug-ins
  (:func:`check_plugins`) and :func:`check_values`;
- :func:`check_sizes` and :func:`check_model_and_prior` (:func:`exvae.train_lib.make_setup`,
  once the training set, then the model and the prior, exist): sizes against the
  training set, the gradient estimator against the model, a plug-in prior's shapes.

Readers of a trained run (``exvae-eval``, :func:`exvae.bank.restore_trained`) run
:func:`check_values` before they load the data. Checks that belong to a model's
or a prior's own contract stay with it (the model factories check
``matmul_dtype`` through :func:`exvae.models.check_matmul_dtype`; the exemplar
prior checks its leave-one-out needs when it is initialised) and are called
from here as well where a config alone can tell.
"""

from __future__ import annotations

import inspect
import math

from exvae import distributed, plugins
from exvae.data import user as user_data
from exvae.errors import ConfigError
from exvae.models import check_matmul_dtype
from exvae.objectives import check_objective
from exvae.priors import checks as prior_checks
from exvae.priors.base import Prior


def check_training_config(config) -> None:
  """All that can be checked of a training config before any data is loaded.

  Raises:
    PluginError, ValueError, ConfigError: naming the key or plug-in and what is wrong.
  """
  check_plugins(config)
  check_values(config)


def check_plugins(config) -> None:
  """What can be checked of ``config``'s plug-ins before any data is loaded.

  A plug-in prior is imported and its class checked
  (:func:`exvae.priors.checks.check_prior_class`), a plug-in's options checked
  against its signature (:func:`exvae.plugins.check_options`);
  ``prior_options`` / ``model_options`` must be empty for a built-in prior / model;
  a user's data set is found (:func:`exvae.data.user.check_dataset`).

  Raises:
    PluginError, ValueError: naming the plug-in and what is wrong.
  """
  user_data.check_dataset(str(config.get("dataset", "")))
  for kind in ("prior", "model"):
    name = str(config.get(kind, ""))
    opts = plugins.options(config, f"{kind}_options")
    if not plugins.is_spec(name):
      if opts:
        raise plugins.PluginError(
          f"{kind}_options {sorted(opts)} are for a plug-in {kind} "
          f"(--config.{kind}=MODULE:ATTR); the built-in {kind} {name!r} "
          f"takes its settings from its own config keys."
        )
      continue
    if kind == "prior":
      cls = plugins.load(name, "prior")
      if isinstance(cls, type) and issubclass(cls, Prior):
        prior_checks.check_prior_class(cls, name)
      plugins.check_options(cls, name, "prior", config, opts=opts)
    else:
      plugins.check_options(plugins.load(name, "model"), name, "model", config, None, opts=opts)


def check_values(config) -> None:
  """Rejects config values that cannot work (no data needed).

  Raises:
    ValueError: a size, rate or name that cannot work.
    ConfigError: a cadence, ``keep_checkpoints``, a non-finite learning rate or
      negative lengths, naming the key, its value and what would work.
  """
  if config.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}.")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}.")
  if config.latent_dim < 1:
    raise ValueError(f"latent_dim must be >= 1, got {config.latent_dim}.")
  if config.eval.num_importance_samples < 1:
    raise ValueError("eval.num_importance_samples must be >= 1.")
  if config.pool_sharding not in distributed.POOL_SHARDING:
    raise ValueError(
      f"pool_sharding must be one of {distributed.POOL_SHARDING}, got {config.pool_sharding!r}."
    )
  check_matmul_dtype(config)  # value, and whether the model implements it
  check_objective(config.objective, config.objective_samples, config.gradient_estimator)
  _check_cadences(config)


def _check_cadences(config) -> None:
  """Cadences, ``keep_checkpoints``, a finite learning rate, non-negative lengths."""

  def at_least_one(key, value):
    if int(value) < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}: set --config.{key}=<n> with n >= 1.")

  for key in (
    "checkpoint_every_steps",
    "log_every_steps",
    "val_every_epochs",
    "early_stopping_patience",
  ):
    at_least_one(key, config[key])
  at_least_one("eval.max_queries", config.eval.max_queries)
  if int(config.keep_checkpoints) < 1:
    raise ConfigError(
      f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}: 0 would delete every "
      "checkpoint of the workdir, including earlier ones. Set --config.keep_checkpoints=1 or more."
    )
  if not math.isfinite(float(config.learning_rate)):
    raise ConfigError(f"learning_rate must be finite, got {config.learning_rate}.")
  if int(config.num_epochs) < 0 or int(config.max_steps) < 0:
    raise ConfigError(
      f"num_epochs and max_steps must be >= 0, got {config.num_epochs} and {config.max_steps}."
    )


def check_sizes(config, num_train: int) -> None:
  """The checks that need the training set size (before the model is built).

  Raises:
    ValueError: ``batch_size`` beyond the training set.
    ConfigError: ``exemplar.num_exemplars`` or ``exemplar.rat_k`` beyond what the
      training set gives.
  """
  if config.batch_size > num_train:
    raise ValueError(f"batch_size {config.batch_size} exceeds the training set size {num_train}.")
  _check_exemplars(config, num_train)


def check_model_and_prior(config, num_train: int, model, prior) -> None:
  """The checks that need the built model and prior.

  Args:
    config: the run's ConfigDict.
    num_train: the training set size.
    model: the model (:class:`exvae.models.Model`).
    prior: the prior (:class:`exvae.priors.Prior`).

  Raises:
    ValueError: ``gradient_estimator='dreg'`` with a model whose ``score`` takes no
      ``path_weight``.
    PluginError: a plug-in prior's shapes are wrong (one traced call).
  """
  if config.gradient_estimator == "dreg" and not _accepts_keyword(model.score, "path_weight"):
    raise ValueError(
      f"gradient_estimator='dreg' needs the model's score(..., path_weight=...) "
      f"(docs/objectives.md); model {config.model!r} does not take it."
    )
  if plugins.is_spec(config.prior):  # one traced call: shapes checked before any step
    prior_checks.check_prior_shapes(prior, model, num_train, config.prior)


def _check_exemplars(config, num_train: int) -> None:
  """``exemplar.num_exemplars`` and ``exemplar.rat_k`` against the training set."""
  if config.prior != "exemplar" or "exemplar" not in config:
    return
  m = int(config.exemplar.num_exemplars)
  if m > num_train:
    raise ConfigError(
      f"exemplar.num_exemplars={m} exceeds the {num_train} training images: set "
      f"--config.exemplar.num_exemplars={num_train} or 0 (all of them)."
    )
  candidates = num_train if m <= 0 else m
  if bool(config.exemplar.rat) and int(config.exemplar.rat_k) > candidates:
    raise ConfigError(
      f"exemplar.rat_k={config.exemplar.rat_k} exceeds the {candidates} exemplar candidates "
      f"per step: set --config.exemplar.rat_k to at most {candidates}."
    )


def _accepts_keyword(fn, name: str) -> bool:
  """Whether ``fn`` can be called with the keyword argument ``name``."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)
