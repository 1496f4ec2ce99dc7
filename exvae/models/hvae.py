"""Two-level hierarchical VAE (HVAE) of the VampPrior / Exemplar VAE papers, and shared pieces.

Generative model and posterior (z2: top latent, the one the prior scores)::

    p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1, z2)
    q(z1, z2 | x) = q(z2 | x) q(z1 | x, z2)

Networks (reference ``HVAE_2level``; h = 300, z1 = z2 = 40 in the paper)::

    q(z2|x):    x -> GatedDense(h) -> GatedDense(h) -> Linear(z2) mu, clip(Linear(z2)) logvar
    q(z1|x,z2): [GatedDense(h)(x), GatedDense(h)(z2)] -> GatedDense(h) -> mu, logvar of z1
    p(z1|z2):   z2 -> GatedDense(h) -> GatedDense(h) -> mu, logvar of z1
    p(x|z1,z2): [GatedDense(h)(z1), GatedDense(h)(z2)] -> GatedDense(h) -> output head

Every log-variance is clipped to [-6, 2] (the reference's Hardtanh).  The
output head gives Bernoulli logits, or ``(mean, log_scale)`` of a discretised
logistic (mean = sigmoid(Linear), log_scale = clip(Linear, -4.5, 0), as the
reference's ``p_x_logvar`` Hardtanh(-4.5, 0)).

The :class:`~exvae.models.base.Model` view of a hierarchical model:
``encode`` / ``encode_mean`` give q(z2|x) (so the Gaussian, VampPrior and
exemplar priors all act on z2), ``decode(z2)`` decodes with z1 set to the mean
of p(z1|z2), and ``score`` draws (z2, z1) ~ q and returns
``log_q = log q(z2|x) + log q(z1|x,z2)``, ``log_p_rest = log p(z1|z2)`` and
``log_px = log p(x|z1,z2)``.

This module also holds what the hierarchical models share with each other
(:class:`HierarchicalBase`, :func:`make_hierarchical_model`) and the MLP VAE
with a logistic output head (:class:`HeadVAE`), since ``vae.VAE`` only has a
Bernoulli head.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from exvae.likelihoods import diag_gaussian_log_prob
from exvae.models.base import Model, Scores
from exvae.models.vae import (
  LOGVAR_MIN,
  LOGVAR_MAX,
  VAE,
  check_matmul_dtype,
  gaussian_score,
  scale_gradient,
)
from exvae.nets.gated import GatedDense, dense
from exvae.nets.init import init_model_params

Params = Any

# Range of the logistic decoder's log-scale (the reference's Hardtanh(-4.5, 0)).
LOG_SCALE_MIN, LOG_SCALE_MAX = -4.5, 0.0
LIKELIHOOD_NAMES = ("bernoulli", "logistic")


def check_likelihood(name: str) -> None:
  """Raises ValueError unless ``name`` is a likelihood the decoders can produce."""
  if name not in LIKELIHOOD_NAMES:
    raise ValueError(f"Unknown likelihood {name!r}; decoders support {list(LIKELIHOOD_NAMES)}.")


class GaussianHead(nn.Module):
  """Linear mean and clipped linear log-variance of a diagonal Gaussian.

  Attributes:
    features: latent size.
    matmul_dtype: operand dtype of the two products (outputs stay float32).
  """

  features: int
  matmul_dtype: str = "float32"

  def setup(self):
    self.mu = dense(self.features, name="mu", matmul_dtype=self.matmul_dtype)
    self.logvar = dense(self.features, name="logvar", matmul_dtype=self.matmul_dtype)

  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h: (B, F) -> (mu (B, features), logvar (B, features) in [-6, 2])."""
    return self.mu(h), jnp.clip(self.logvar(h), LOGVAR_MIN, LOGVAR_MAX)

  def mean(self, h: jax.Array) -> jax.Array:
    """h: (B, F) -> mu (B, features) only (skips the log-variance layer)."""
    return self.mu(h)


class DenseOutputHead(nn.Module):
  """Linear output layer of an MLP decoder for a given likelihood.

  Attributes:
    image_shape: (H, W, C).
    likelihood: 'bernoulli' (logits) or 'logistic' ((mean, log_scale)).
    matmul_dtype: operand dtype of the products (outputs stay float32).
  """

  image_shape: Sequence[int]
  likelihood: str = "bernoulli"
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, h: jax.Array):
    """h: (B, F) -> logits (B, H, W, C), or (mean, log_scale) each (B, H, W, C)."""
    shape = (h.shape[0],) + tuple(self.image_shape)
    d = math.prod(self.image_shape)
    mm = self.matmul_dtype
    out = dense(d, name="out", matmul_dtype=mm)(h).reshape(shape)
    if self.likelihood == "bernoulli":
      return out
    log_scale = dense(d, name="log_scale", matmul_dtype=mm)(h).reshape(shape)
    return jax.nn.sigmoid(out), jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)


class HierarchicalBase(nn.Module):
  """Shared logic of two-level models; subclasses define the six networks.

  Subclasses define the submodules ``q_z2_head``, ``q_z1_z2``, ``q_z1_joint``,
  ``q_z1_head``, ``p_z1_layers`` and ``p_z1_head`` and implement
  ``_q_z2_trunk(x) -> (B, F2)``, ``q_z1_features(x) -> (B, F)`` and
  ``p_x(z1, z2) -> likelihood params``; the rest is shared here.
  """

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z2|x): x (B, H, W, C) -> (mu (B, d2), logvar (B, d2))."""
    return self.q_z2_head(self._q_z2_trunk(x))

  def encode_mean(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, C) -> mean of q(z2|x) (B, d2) (the exemplar code)."""
    return self.q_z2_head.mean(self._q_z2_trunk(x))

  def q_z1(self, hx: jax.Array, z2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z1|x,z2) from x-features (N, F) and z2 (N, d2) -> (mu, logvar) (N, d1)."""
    h = jnp.concatenate([hx, self.q_z1_z2(z2)], axis=-1)
    return self.q_z1_head(self.q_z1_joint(h))

  def p_z1(self, z2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p(z1|z2): z2 (N, d2) -> (mu, logvar) (N, d1)."""
    h = z2
    for layer in self.p_z1_layers:
      h = layer(h)
    return self.p_z1_head(h)

  def decode(self, z2: jax.Array):
    """z2: (B, d2) -> likelihood parameters of x (B, H, W, C) with z1 = E[z1 | z2]."""
    mu1, _ = self.p_z1(z2)
    return self.p_x(mu1, z2)

  def scores(
    self,
    x: jax.Array,
    eps2: jax.Array,
    eps1: jax.Array,
    log_lik: Callable[[jax.Array, Any], jax.Array],
    path_weight=None,
  ):
    """Every term of log w for S reparameterised samples per image.

    Args:
      x: (B, H, W, C) images.
      eps2: (B, S, d2) standard normal noise for z2.
      eps1: (B, S, d1) standard normal noise for z1.
      log_lik: ``log_lik(x, decoder_out) -> (B,)``.
      path_weight: None, or (B, S): each sample's gradient paths to the
        encoder are multiplied by it (:func:`~exvae.models.vae.scale_gradient`
        where z2 and z1 are drawn; q(z1|x,z2) reads the unscaled z2, so the path
        z2 -> z1 is scaled once).

    Returns:
      ``(z2 (B, S, d2), mu2 (B, d2), z1 (B*S, d1), log_px, log_p_z1, log_q)``, the
      last three (B, S).
    """
    b, s = eps2.shape[:2]
    mu2, logvar2 = self.encode(x)
    z2 = mu2[:, None] + jnp.exp(0.5 * logvar2)[:, None] * eps2  # (B, S, d2)
    log_q2 = diag_gaussian_log_prob(z2, mu2[:, None], logvar2[:, None])  # (B, S)
    hx = self.q_z1_features(x)  # (B, F), once per x
    hx = jnp.broadcast_to(hx[:, None], (b, s, hx.shape[-1])).reshape(b * s, -1)
    mu1, logvar1 = self.q_z1(hx, z2.reshape(b * s, -1))  # (B*S, d1)
    z1 = mu1 + jnp.exp(0.5 * logvar1) * eps1.reshape(b * s, -1)
    log_q1 = diag_gaussian_log_prob(z1, mu1, logvar1).reshape(b, s)
    if path_weight is not None:
      z2 = scale_gradient(z2, path_weight)
      z1 = scale_gradient(z1.reshape(b, s, -1), path_weight).reshape(b * s, -1)
    z2f = z2.reshape(b * s, -1)
    pm1, plogvar1 = self.p_z1(z2f)
    log_p1 = diag_gaussian_log_prob(z1, pm1, plogvar1).reshape(b, s)
    out = self.p_x(z1, z2f)
    xr = jnp.broadcast_to(x[:, None], (b, s) + x.shape[1:]).reshape((b * s,) + x.shape[1:])
    log_px = log_lik(xr, out).reshape(b, s)
    return z2, mu2, z1, log_px, log_p1, log_q2 + log_q1

  def log_q(self, x: jax.Array, z2: jax.Array, z1: jax.Array) -> jax.Array:
    """log q(z2|x) + log q(z1|x,z2) of given samples z2 (B, S, d2), z1 (B*S, d1) -> (B, S)."""
    b, s = z2.shape[:2]
    mu2, logvar2 = self.encode(x)
    log_q2 = diag_gaussian_log_prob(z2, mu2[:, None], logvar2[:, None])
    hx = self.q_z1_features(x)
    hx = jnp.broadcast_to(hx[:, None], (b, s, hx.shape[-1])).reshape(b * s, -1)
    mu1, logvar1 = self.q_z1(hx, z2.reshape(b * s, -1))
    return log_q2 + diag_gaussian_log_prob(z1, mu1, logvar1).reshape(b, s)

  def __call__(self, x: jax.Array):
    """Runs every network once (used by ``init``): x (B, H, W, C) -> decoder output."""
    mu2, _ = self.encode(x)
    mu1, _ = self.q_z1(self.q_z1_features(x), mu2)
    self.p_z1(mu2)
    return self.p_x(mu1, mu2)


class HVAE(HierarchicalBase):
  """Two-level MLP VAE with gated dense layers (reference ``HVAE_2level``).

  Attributes:
    image_shape: (H, W, C).
    latent_dim: size of z2 (the prior's latent).
    z1_dim: size of z1.
    hidden: widths of the two-layer gated stacks (q(z2|x), p(z1|z2)); the
      single gated layers use ``hidden[0]`` and the joint layers ``hidden[-1]``
      (all 300 in the paper).
    likelihood: 'bernoulli' or 'logistic'.
    matmul_dtype: 'float32' or 'bfloat16': operand dtype of every matrix
      product (parameters and every output stay float32).
  """

  image_shape: Sequence[int]
  latent_dim: int = 40
  z1_dim: int = 40
  hidden: Sequence[int] = (300, 300)
  likelihood: str = "bernoulli"
  matmul_dtype: str = "float32"

  def setup(self):
    h0, hl, mm = self.hidden[0], self.hidden[-1], self.matmul_dtype
    self.q_z2_layers = [GatedDense(w, mm, name=f"q_z2_{i}") for i, w in enumerate(self.hidden)]
    self.q_z2_head = GaussianHead(self.latent_dim, mm, name="q_z2_head")
    self.q_z1_x = GatedDense(h0, mm, name="q_z1_x")
    self.q_z1_z2 = GatedDense(h0, mm, name="q_z1_z2")
    self.q_z1_joint = GatedDense(hl, mm, name="q_z1_joint")
    self.q_z1_head = GaussianHead(self.z1_dim, mm, name="q_z1_head")
    self.p_z1_layers = [GatedDense(w, mm, name=f"p_z1_{i}") for i, w in enumerate(self.hidden)]
    self.p_z1_head = GaussianHead(self.z1_dim, mm, name="p_z1_head")
    self.p_x_z1 = GatedDense(h0, mm, name="p_x_z1")
    self.p_x_z2 = GatedDense(h0, mm, name="p_x_z2")
    self.p_x_joint = GatedDense(hl, mm, name="p_x_joint")
    self.p_x_head = DenseOutputHead(tuple(self.image_shape), self.likelihood, mm, name="p_x_head")

  def _q_z2_trunk(self, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for layer in self.q_z2_layers:
      h = layer(h)
    return h

  def q_z1_features(self, x: jax.Array) -> jax.Array:
    """The x-branch of q(z1|x,z2): (B, H, W, C) -> (B, hidden[0])."""
    return self.q_z1_x(x.reshape(x.shape[0], -1))

  def p_x(self, z1: jax.Array, z2: jax.Array):
    """p(x|z1,z2): z1 (N, d1), z2 (N, d2) -> logits or (mean, log_scale), (N, H, W, C)."""
    h = jnp.concatenate([self.p_x_z1(z1), self.p_x_z2(z2)], axis=-1)
    return self.p_x_head(self.p_x_joint(h))


class HeadVAE(VAE):
  """The one-level MLP :class:`~exvae.models.vae.VAE` with a selectable output head.

  Same parameters as ``VAE`` for 'bernoulli'; 'logistic' adds a linear
  log-scale layer ``dec_log_scale`` and squashes the mean with a sigmoid.

  Attributes:
    likelihood: 'bernoulli' or 'logistic'.
  """

  likelihood: str = "bernoulli"

  def setup(self):
    super().setup()
    if self.likelihood == "logistic":
      self.dec_log_scale = dense(
        math.prod(self.image_shape), name="dec_log_scale", matmul_dtype=self.matmul_dtype
      )

  def decode(self, z: jax.Array):
    """z (B, d) -> logits (B, H, W, C), or (mean, log_scale) each (B, H, W, C)."""
    h = z
    for layer in self.dec_layers:
      h = layer(h)
    shape = (z.shape[0],) + tuple(self.image_shape)
    out = self.dec_out(h).reshape(shape)
    if self.likelihood == "bernoulli":
      return out
    log_scale = self.dec_log_scale(h).reshape(shape)
    return jax.nn.sigmoid(out), jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)


def _init_fn(module: nn.Module, image_shape: tuple[int, ...]) -> Callable[[jax.Array], Params]:
  def init(key: jax.Array) -> Params:
    return init_model_params(module, image_shape, key)

  return init


def make_head_vae_model(config, image_shape: Sequence[int]) -> Model:
  """:class:`Model` of the one-level MLP VAE with ``config.likelihood``'s output head.

  Args:
    config: ConfigDict with ``latent_dim``, ``hidden``, ``likelihood``.
    image_shape: (H, W, C).

  Returns:
    A :class:`Model` (same interface as ``vae.make_vae``).
  """
  check_likelihood(config.likelihood)
  image_shape = tuple(int(s) for s in image_shape)
  module = HeadVAE(
    image_shape=image_shape,
    latent_dim=int(config.latent_dim),
    hidden=tuple(int(h) for h in config.hidden),
    likelihood=config.likelihood,
    matmul_dtype=check_matmul_dtype(config),
  )

  def encode(params, x):
    return module.apply({"params": params}, x, method="encode")

  def encode_mean(params, x):
    return module.apply({"params": params}, x, method="encode_mean")

  def decode(params, z):
    return module.apply({"params": params}, z, method="decode")

  def score(params, x, key, num_samples, log_lik, *, path_weight=None):
    return gaussian_score(
      encode, decode, params, x, key, num_samples, log_lik, path_weight=path_weight
    )

  return Model(
    init=_init_fn(module, image_shape),
    encode=encode,
    encode_mean=encode_mean,
    decode=decode,
    score=score,
    latent_dim=int(config.latent_dim),
    image_shape=image_shape,
    module=module,
  )


def hierarchical_noise(
  key: jax.Array, batch: int, num_samples: int, d2: int, d1: int
) -> tuple[jax.Array, jax.Array]:
  """The standard normal noise of :func:`make_hierarchical_model`'s ``score``.

  Returns:
    ``(eps2 (B, S, d2), eps1 (B, S, d1))`` from ``jax.random.split(key)``.
  """
  k2, k1 = jax.random.split(key)
  return (
    jax.random.normal(k2, (batch, num_samples, d2)),
    jax.random.normal(k1, (batch, num_samples, d1)),
  )


def make_hierarchical_model(module: HierarchicalBase, image_shape: Sequence[int]) -> Model:
  """Wraps a :class:`HierarchicalBase` module as a :class:`Model` (prior on z2).

  Args:
    module: an unbound HVAE / ConvHVAE with ``latent_dim`` (z2) and ``z1_dim``.
    image_shape: (H, W, C).

  Returns:
    A :class:`Model`: ``encode``/``encode_mean`` are q(z2|x), ``decode(z2)``
    uses z1 = E[z1|z2], ``score`` returns ``Scores`` with ``z`` = z2 samples,
    ``log_q = log q(z2|x) + log q(z1|x,z2)``, ``log_p_rest = log p(z1|z2)``.
  """
  image_shape = tuple(int(s) for s in image_shape)
  d2, d1 = int(module.latent_dim), int(module.z1_dim)

  def encode(params, x):
    return module.apply({"params": params}, x, method="encode")

  def encode_mean(params, x):
    return module.apply({"params": params}, x, method="encode_mean")

  def decode(params, z):
    return module.apply({"params": params}, z, method="decode")

  def score(params, x, key, num_samples, log_lik, *, path_weight=None) -> Scores:
    eps2, eps1 = hierarchical_noise(key, x.shape[0], num_samples, d2, d1)
    z2, mu2, z1, log_px, log_p1, log_q = module.apply(
      {"params": params}, x, eps2, eps1, log_lik, path_weight, method="scores"
    )
    if path_weight is not None:
      # The posterior's networks with their parameters held fixed, at the samples:
      # gradients reach the encoder only through z2 and z1.
      log_q = module.apply({"params": jax.lax.stop_gradient(params)}, x, z2, z1, method="log_q")
    return Scores(z=z2, mu=mu2, log_px=log_px, log_p_rest=log_p1, log_q=log_q)

  return Model(
    init=_init_fn(module, image_shape),
    encode=encode,
    encode_mean=encode_mean,
    decode=decode,
    score=score,
    latent_dim=d2,
    image_shape=image_shape,
    module=module,
  )


def make_hvae(config, image_shape: Sequence[int]) -> Model:
  """Builds the MLP HVAE from ``config`` (``latent_dim`` = z2, ``hvae.z1_dim``, ``hidden``,
  ``likelihood``, ``matmul_dtype``)."""
  check_likelihood(config.likelihood)
  module = HVAE(
    image_shape=tuple(int(s) for s in image_shape),
    latent_dim=int(config.latent_dim),
    z1_dim=int(config.hvae.z1_dim),
    hidden=tuple(int(h) for h in config.hidden),
    likelihood=config.likelihood,
    matmul_dtype=check_matmul_dtype(config),
  )
  return make_hierarchical_model(module, image_shape)
