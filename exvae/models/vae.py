"""The MLP VAE of the Exemplar VAE paper, behind a small pure-function interface.

Encoder: x -> GatedDense(300) -> GatedDense(300) -> (Linear(d) for mu,
clip(Linear(d), -6, 2) for the log-variance).  Decoder: z -> GatedDense(300)
-> GatedDense(300) -> Linear(D) giving Bernoulli logits.

Training, evaluation and the priors only see :class:`~exvae.models.base.Model`, a
bundle of pure functions of ``(params, inputs)``, so new architectures plug in by
providing the same callables.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from exvae.models.base import Model, Scores
from exvae.nets.gated import MATMUL_DTYPES, GatedDense, dense
from exvae.nets.init import init_model_params

# Posterior log-variance range of the reference (Hardtanh(-6, 2)).
LOGVAR_MIN, LOGVAR_MAX = -6.0, 2.0


class MLPEncoderModule(nn.Module):
  """q(z|x) of the MLP VAE, for every model that uses that encoder.

  Subclasses create ``enc_layers`` (gated dense stack), ``enc_mu`` and
  ``enc_logvar`` in ``setup``; the parameter names are theirs.
  """

  def _trunk(self, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for layer in self.enc_layers:
      h = layer(h)
    return h

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: (B, H, W, C) in [0, 1] -> (mu (B, d), logvar (B, d) in [-6, 2])."""
    h = self._trunk(x)
    return self.enc_mu(h), jnp.clip(self.enc_logvar(h), LOGVAR_MIN, LOGVAR_MAX)

  def encode_mean(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> mu (B, d); skips the log-variance head (exemplar codes)."""
    return self.enc_mu(self._trunk(x))


class VAE(MLPEncoderModule):
  """MLP VAE with gated dense layers.

  Attributes:
    image_shape: (H, W, C) of the data.
    latent_dim: size d of z.
    hidden: widths of the gated dense layers (encoder; decoder mirrors).
    matmul_dtype: 'float32' or 'bfloat16': operand dtype of every matrix
      product (parameters, biases, activations, mu, logvar and logits stay
      float32; see :func:`exvae.nets.gated.mixed_matmul`).
  """

  image_shape: Sequence[int]
  latent_dim: int = 40
  hidden: Sequence[int] = (300, 300)
  matmul_dtype: str = "float32"

  def setup(self):
    mm = self.matmul_dtype
    self.enc_layers = [GatedDense(h, mm, name=f"enc_{i}") for i, h in enumerate(self.hidden)]
    self.enc_mu = dense(self.latent_dim, name="enc_mu", matmul_dtype=mm)
    self.enc_logvar = dense(self.latent_dim, name="enc_logvar", matmul_dtype=mm)
    self.dec_layers = [GatedDense(h, mm, name=f"dec_{i}") for i, h in enumerate(self.hidden)]
    self.dec_out = dense(math.prod(self.image_shape), name="dec_out", matmul_dtype=mm)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: (B, d) -> Bernoulli logits (B, H, W, C)."""
    h = z
    for layer in self.dec_layers:
      h = layer(h)
    return self.dec_out(h).reshape((z.shape[0],) + tuple(self.image_shape))

  def __call__(self, x):
    mu, logvar = self.encode(x)
    return self.decode(mu), logvar


def gaussian_score(
  encode, decode, params, x, key, num_samples, log_lik, *, path_weight=None
) -> Scores:
  """Scores of a one-level Gaussian-posterior VAE with S reparameterised samples.

  Args:
    encode: ``encode(params, x) -> (mu, logvar)``.
    decode: ``decode(params, z) -> likelihood parameters``.
    params: model parameters.
    x: (B, H, W, C) images.
    key: PRNG key.
    num_samples: S (static).
    log_lik: ``log_lik(x, decoder_out) -> (B,)``.
    path_weight: None, or (B, S): see :func:`gaussian_posterior_samples`.
  """
  b = x.shape[0]
  mu, logvar = encode(params, x)
  z, log_q = gaussian_posterior_samples(mu, logvar, key, num_samples, path_weight)
  out = decode(params, z.reshape(b * num_samples, -1))
  xr = jnp.broadcast_to(x[:, None], (b, num_samples) + x.shape[1:]).reshape(
    (b * num_samples,) + x.shape[1:]
  )
  log_px = log_lik(xr, out).reshape(b, num_samples)
  return Scores(z=z, mu=mu, log_px=log_px, log_p_rest=jnp.zeros_like(log_px), log_q=log_q)


@jax.custom_vjp
def scale_gradient(x: jax.Array, weight: jax.Array) -> jax.Array:
  """The identity on ``x`` (B, S, ...) whose backward pass multiplies the cotangent by ``weight`` (B, S).

  ``weight`` gets no gradient.  Doubly reparameterised gradients
  (:func:`exvae.objectives.iwae_loss`) put it where a sample leaves the
  posterior, so that every gradient path from the sample to the encoder's
  parameters is reweighted, and nothing else is.
  """
  del weight
  return x


def _scale_gradient_fwd(x, weight):
  return x, weight


def _scale_gradient_bwd(weight, ct):
  w = weight.reshape(weight.shape + (1,) * (ct.ndim - weight.ndim)).astype(ct.dtype)
  return ct * w, jnp.zeros_like(weight)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def gaussian_posterior_samples(
  mu: jax.Array,
  logvar: jax.Array,
  key: jax.Array,
  num_samples: int,
  path_weight: jax.Array | None = None,
):
  """S reparameterised draws of a diagonal Gaussian posterior and their log-density.

  Args:
    mu, logvar: (B, d) posterior parameters.
    key: PRNG key of the noise (B, S, d).
    num_samples: S (static).
    path_weight: None, or (B, S): the samples' gradients are multiplied by it
      (:func:`scale_gradient`) and the log-density holds ``mu`` and ``logvar``
      fixed, so its gradient flows only through the samples.

  Returns:
    ``(z (B, S, d), log_q (B, S))``.
  """
  from exvae.likelihoods import diag_gaussian_log_prob

  eps = jax.random.normal(key, (mu.shape[0], num_samples, mu.shape[-1]))
  z = mu[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps  # (B, S, d)
  if path_weight is None:
    return z, diag_gaussian_log_prob(z, mu[:, None], logvar[:, None])  # (B, S)
  z = scale_gradient(z, path_weight)
  stop = jax.lax.stop_gradient
  return z, diag_gaussian_log_prob(z, stop(mu)[:, None], stop(logvar)[:, None])


# Built-in models whose networks follow config.matmul_dtype='bfloat16', and those that do not
# (a plug-in model gets the config and decides itself).
BF16_MODELS = ("vae", "hvae")
FLOAT32_ONLY_MODELS = ("convhvae", "pixelcnn")


def check_matmul_dtype(config, model: str | None = None) -> str:
  """The one check of ``config.matmul_dtype``: its value, and whether the model implements it.

  ``config_checks.check_values`` calls it before any data is loaded; the model
  factories call it too, so a model built from a config directly is checked.

  Args:
    config: ConfigDict with ``model`` and (optional, default 'float32') ``matmul_dtype``.
    model: the model being built (default ``config.model``).

  Returns:
    The name, one of :data:`~exvae.nets.gated.MATMUL_DTYPES`.

  Raises:
    ValueError (one line): an unknown name, or 'bfloat16' for a built-in
    model without it.
  """
  name = config.get("matmul_dtype", "float32")
  if name not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype must be one of {list(MATMUL_DTYPES)}, got {name!r}.")
  model = model or config.get("model", "vae")
  if name != "float32" and model in FLOAT32_ONLY_MODELS:
    raise ValueError(
      f"matmul_dtype={name!r} is supported by models {list(BF16_MODELS)} only, not "
      f"{model!r}: use --config.matmul_dtype=float32."
    )
  return name


def make_vae(config, image_shape: Sequence[int]) -> Model:
  """Builds the MLP VAE with Bernoulli logits (``config.model = 'vae'``).

  Args:
    config: ConfigDict with ``model``, ``latent_dim``, ``hidden`` and
      (optional, default 'float32') ``matmul_dtype``.
    image_shape: (H, W, C) of the data set.

  Returns:
    A :class:`Model` whose functions are pure and jit-friendly.
  """
  name = config.model
  if name != "vae":
    raise ValueError(f"Unknown model {name!r}; known models: ['vae'].")
  image_shape = tuple(int(s) for s in image_shape)
  module = VAE(
    image_shape=image_shape,
    latent_dim=int(config.latent_dim),
    hidden=tuple(int(h) for h in config.hidden),
    matmul_dtype=check_matmul_dtype(config),
  )

  def init(key):
    return init_model_params(module, image_shape, key)

  def encode(params, x):
    return module.apply({"params": params}, x, method=VAE.encode)

  def encode_mean(params, x):
    return module.apply({"params": params}, x, method=VAE.encode_mean)

  def decode(params, z):
    return module.apply({"params": params}, z, method=VAE.decode)

  def score(params, x, key, num_samples, log_lik, *, path_weight=None):
    return gaussian_score(
      encode, decode, params, x, key, num_samples, log_lik, path_weight=path_weight
    )

  return Model(
    init=init,
    encode=encode,
    encode_mean=encode_mean,
    decode=decode,
    score=score,
    latent_dim=int(config.latent_dim),
    image_shape=image_shape,
    module=module,
  )
