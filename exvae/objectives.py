"""Objectives: the (KL-warm-up) ELBO and IWAE bound for training, importance weights for evaluation.

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

from exvae.models.base import Model
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
    objective: ``"elbo"`` or ``"iwae"`` (:data:`OBJECTIVES`).
    objective_samples: k, the importance samples per image of ``"iwae"``.
    gradient_estimator: ``"reparam"`` or ``"dreg"`` (:data:`GRADIENT_ESTIMATORS`).
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
  objective: str = "elbo"
  objective_samples: int = 1
  gradient_estimator: str = "reparam"

  def loss_fn(self) -> Callable[..., Any]:
    """The training loss of this run's objective (:func:`elbo_loss` or :func:`iwae_loss`)."""
    return iwae_loss if self.objective == "iwae" else elbo_loss

  def context_inputs(self, pool, key, **kw) -> ContextInputs:
    """The prior's :class:`ContextInputs` for this run's pool (layout fields filled in)."""
    return ContextInputs(
      key=key,
      pool=pool,
      binary=self.binary_exemplars,
      pool_sharded=self.pool_sharded,
      pool_size=self.num_train,
      **kw,
    )


OBJECTIVES = ("elbo", "iwae")
GRADIENT_ESTIMATORS = ("reparam", "dreg")


def check_objective(objective: str, samples: int, estimator: str) -> None:
  """Raises ValueError (one line) unless the three objective settings work together."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}.")
  if estimator not in GRADIENT_ESTIMATORS:
    raise ValueError(
      f"gradient_estimator must be one of {list(GRADIENT_ESTIMATORS)}, got {estimator!r}."
    )
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ValueError(f"objective_samples must be an integer >= 1, got {samples!r}.")
  if objective == "elbo" and (samples != 1 or estimator != "reparam"):
    raise ValueError(
      "objective='elbo' trains with one sample and reparameterised gradients: "
      "use --config.objective=iwae for objective_samples > 1 or "
      "gradient_estimator='dreg'."
    )


def kl_beta(step: jax.Array, steps_per_epoch: int, warmup_epochs: int) -> jax.Array:
  """KL warm-up weight for a (traced) global step; 1 when warm-up is 0."""
  if warmup_epochs <= 0:
    return jnp.asarray(1.0, jnp.float32)
  epoch = (step // steps_per_epoch).astype(jnp.float32)
  return jnp.minimum(1.0, (epoch + 1.0) / warmup_epochs)


def elbo_loss(
  params,
  prior_state,
  setup: Setup,
  x: jax.Array,
  ids: jax.Array,
  key: jax.Array,
  beta: jax.Array,
  pool: jax.Array | None,
):
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
  ctx, new_state = prior.context(
    params["prior"], prior_state, model, params["model"], inputs, train=True
  )
  log_pz = prior.log_prob(params["prior"], sc.z[:, 0], ctx, ids)
  log_px = sc.log_px[:, 0]
  kl = sc.log_q[:, 0] - sc.log_p_rest[:, 0] - log_pz
  loss = jnp.mean(-log_px + beta * kl)
  metrics = {
    "loss": loss,
    "elbo": jnp.mean(log_px - kl),
    "recon": -jnp.mean(log_px),
    "kl": jnp.mean(kl),
    "beta": beta,
  }
  return loss, (metrics, new_state)


def iwae_loss(
  params,
  prior_state,
  setup: Setup,
  x: jax.Array,
  ids: jax.Array,
  key: jax.Array,
  beta: jax.Array,
  pool: jax.Array | None,
):
  """Per-batch training loss: the importance-weighted bound with k samples (KL warm-up).

  With k = ``setup.objective_samples`` samples z_s ~ q(z|x) per image, the
  log-weights under warm-up are ``log w_s = log p(x|z_s) - beta KL_s``, with
  ``KL_s = log q(z_s|x) - log p(z_s)`` (the lower latents' terms included), so
  beta scales the prior and encoder terms of each weight as it scales the
  ELBO's KL; at beta = 1 the loss is ``-log (1/k) sum_s w_s``, the IWAE bound
  of Burda et al. (2016).  The prior's context (exemplar subsample, RAT
  neighbours of each image's encoder mean) is built once per batch and scores
  all k samples of every image; leave-one-out masks each sample's own exemplar.
  With k = 1 and ``"reparam"`` the loss and gradients are :func:`elbo_loss`'s.

  ``"dreg"`` (Tucker et al. 2019) keeps the loss value and changes the
  gradients: the encoder's path gradient from sample s is weighted by
  ``(1 - beta) w~_s + beta w~_s^2`` (w~ = the normalised weights; w~^2 at
  beta = 1), and the posterior's score term is dropped, which the identity
  of Tucker et al. shows to be the same gradient in expectation.  Decoder
  and prior parameters, and the encoder where the prior reads it (exemplar
  codes, pseudo-inputs), get the IWAE gradient ``sum_s w~_s grad log w_s``.

  Args:
    params, prior_state, setup, x, ids, key, beta, pool: as :func:`elbo_loss`.

  Returns:
    ``(loss, (metrics, new_prior_state))``; loss is the batch mean of
    ``-log (1/k) sum_s w_s``.

  References:
    Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders, ICLR 2016.
    Tucker, Lawson, Gu & Maddison, Doubly Reparameterized Gradient Estimators
    for Monte Carlo Objectives, ICLR 2019.
  """
  model, prior = setup.model, setup.prior
  k, b = setup.objective_samples, x.shape[0]
  k_ctx, k_z = jax.random.split(key)
  sc = model.score(params["model"], x, k_z, k, setup.log_lik)
  inputs = setup.context_inputs(pool, k_ctx, x=x, ids=ids, mu=sc.mu)
  ctx, new_state = prior.context(
    params["prior"], prior_state, model, params["model"], inputs, train=True
  )
  rid = jnp.repeat(ids, k)

  def log_weights(scores):
    log_pz = prior.log_prob(params["prior"], scores.z.reshape(b * k, -1), ctx, rid).reshape(b, k)
    kl = scores.log_q - scores.log_p_rest - log_pz  # (B, k)
    return scores.log_px - beta * kl, kl

  log_w, kl = log_weights(sc)
  bound = jax.nn.logsumexp(log_w, axis=1) - jnp.log(jnp.float32(k))
  loss = -jnp.mean(bound)
  if setup.gradient_estimator == "dreg":
    # The same samples and values again, with each sample's path gradient reweighted
    # where it is drawn and log q's parameters held fixed; only this pass is
    # differentiated (the first one gives the weights and the loss value).
    w = jax.nn.softmax(jax.lax.stop_gradient(log_w), axis=1)
    path = model.score(
      params["model"], x, k_z, k, setup.log_lik, path_weight=(1.0 - beta) + beta * w
    )
    surrogate = -jnp.mean(jnp.sum(w * log_weights(path)[0], axis=1))
    # Value: the bound (the added difference is exactly 0); gradient: the surrogate's.
    loss = jax.lax.stop_gradient(loss) + (surrogate - jax.lax.stop_gradient(surrogate))
  log_px, log_w1 = sc.log_px, sc.log_px - kl
  metrics = {
    "loss": loss,
    "elbo": jnp.mean(log_w1),
    "recon": -jnp.mean(log_px),
    "kl": jnp.mean(kl),
    "beta": beta,
    "iwae": jnp.mean(jax.nn.logsumexp(log_w1, axis=1)) - jnp.log(jnp.float32(k)),
  }
  return loss, (metrics, new_state)


def log_importance_weights(
  params,
  setup: Setup,
  ctx,
  x: jax.Array,
  key: jax.Array,
  num_samples: int,
  ids: jax.Array | None = None,
  with_error: bool = False,
):
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
    log_pz = prior.log_prob(params["prior"], sc.z.reshape(b * num_samples, -1), ctx, rid).reshape(
      b, num_samples
    )
  log_pz = log_pz + sc.log_p_rest  # lower latents' prior terms, if any
  log_px, log_qz = sc.log_px, sc.log_q
  out = (log_px + log_pz - log_qz, log_px, log_pz, log_qz)
  return out + (err,) if with_error else out
