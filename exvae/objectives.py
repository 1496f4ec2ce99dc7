"""Objectives: the (KL-warm-up) ELBO for training and importance weights for the IWAE bound.

Everything here composes a :class:`~exvae.models.Model`, a
:class:`~exvae.priors.Prior` and a likelihood; nothing here is model- or
prior-specific.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from exvae.models.vae import Model
from exvae.priors.base import ContextInputs, Prior


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """Static description of a run: hashed by identity, passed to jitted steps as static.

  Attributes:
    model: the model's pure functions.
    prior: the prior object.
    log_lik: ``log_lik(x, decoder_out) -> (B,)``.
    mean_fn: ``mean_fn(decoder_out) -> (B, H, W, C)`` mean image (pictures).
    optimizer: optax transformation.
    binary: dynamic binarisation of training images (the data points x).
    binary_exemplars: binarise exemplar images before encoding them (the
      reference encodes their grey levels: False for paper configs).
    batch_size: B.
    steps_per_epoch: training steps per epoch (drop-last).
    warmup_epochs: KL warm-up length; beta = min(1, (epoch + 1) / warmup).
    num_train: N, the number of training images (the exemplar pool).
    pool_sharded: the pool is split along N over the ``data`` mesh axis.
  """

  model: Model
  prior: Prior
  log_lik: Callable[[jax.Array, jax.Array], jax.Array]
  mean_fn: Callable[[jax.Array], jax.Array]
  optimizer: optax.GradientTransformation
  binary: bool
  batch_size: int
  steps_per_epoch: int
  warmup_epochs: int
  num_train: int = 0
  pool_sharded: bool = False
  binary_exemplars: bool = False

  def context_inputs(self, pool, key, **kw) -> ContextInputs:
    """The prior's :class:`ContextInputs` for this run's pool (layout fields filled in)."""
    return ContextInputs(key=key, pool=pool, binary=self.binary_exemplars, pool_sharded=self.pool_sharded,
                         pool_size=self.num_train, **kw)


def kl_beta(step: jax.Array, steps_per_epoch: int, warmup_epochs: int) -> jax.Array:
  """KL warm-up weight for a (traced) global step; 1 when warm-up is 0."""
  if warmup_epochs <= 0:
    return jnp.asarray(1.0, jnp.float32)
  epoch = (step // steps_per_epoch).astype(jnp.float32)
  return jnp.minimum(1.0, (epoch + 1.0) / warmup_epochs)


def elbo_loss(params, prior_state, setup: Setup, x: jax.Array, ids: jax.Array,
              key: jax.Array, beta: jax.Array, pool: jax.Array | None):
  """Per-batch training loss with one reparameterised sample (Monte-Carlo KL).

  Args:
    params: ``{"model": ..., "prior": ...}``.
    prior_state: the prior's non-learnable state (e.g. RAT cache).
    setup: static run description.
    x: (B, H, W, C) binarised batch.
    ids: (B,) int32 training-set indices of the batch (leave-one-out).
    key: PRNG key for this step.
    beta: scalar KL weight.
    pool: (N, H, W, C) training images for exemplar priors, or None.

  Returns:
    ``(loss, (metrics, new_prior_state))``; loss is the batch mean of
    ``-log p(x|z) + beta (log q(z|x) - log p(z))``.
  """
  model, prior = setup.model, setup.prior
  k_ctx, k_z = jax.random.split(key)
  sc = model.score(params["model"], x, k_z, 1, setup.log_lik)
  inputs = setup.context_inputs(pool, k_ctx, x=x, ids=ids, mu=sc.mu)
  ctx, new_state = prior.context(params["prior"], prior_state, model, params["model"], inputs,
                                 train=True)
  log_pz = prior.log_prob(params["prior"], sc.z[:, 0], ctx, ids)
  log_px = sc.log_px[:, 0]
  kl = sc.log_q[:, 0] - sc.log_p_rest[:, 0] - log_pz
  loss = jnp.mean(-log_px + beta * kl)
  metrics = {"loss": loss, "elbo": jnp.mean(log_px - kl), "recon": -jnp.mean(log_px),
             "kl": jnp.mean(kl), "beta": beta}
  return loss, (metrics, new_state)


def log_importance_weights(params, setup: Setup, ctx, x: jax.Array, key: jax.Array,
                           num_samples: int, ids: jax.Array | None = None,
                           with_error: bool = False):
  """Importance weights log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), z_s ~ q(z|x).

  Args:
    params: ``{"model": ..., "prior": ...}``.
    setup: static run description.
    ctx: the prior's context (at evaluation: the full exemplar bank).
    x: (B, H, W, C) images.
    key: PRNG key.
    num_samples: S (static).
    ids: optional (B,) ids for leave-one-out (None at evaluation).
    with_error: score the prior through ``prior.log_prob_grouped`` (samples
      grouped by test point, certified pruning if the prior offers it) and
      also return the per-sample certified error.

  Returns:
    ``(log_w, log_px, log_pz, log_qz)``, each (B, S); ``log_pz`` includes the
    lower latents' terms of hierarchical models.  With ``with_error`` a fifth
    (B, S) array: the exact log w lies in ``[log_w, log_w + err]``.
  """
  model, prior = setup.model, setup.prior
  b = x.shape[0]
  sc = model.score(params["model"], x, key, num_samples, setup.log_lik)
  if with_error:
    log_pz, err = prior.log_prob_grouped(params["prior"], sc.z, sc.mu, ctx)
  else:
    rid = None if ids is None else jnp.repeat(ids, num_samples)
    log_pz = prior.log_prob(params["prior"], sc.z.reshape(b * num_samples, -1), ctx,
                            rid).reshape(b, num_samples)
  log_pz = log_pz + sc.log_p_rest          # lower latents' prior terms, if any
  log_px, log_qz = sc.log_px, sc.log_q
  out = (log_px + log_pz - log_qz, log_px, log_pz, log_qz)
  return out + (err,) if with_error else out
