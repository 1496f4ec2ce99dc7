"""A model written outside the library: an MLP VAE with plain ReLU layers (no gating).

    exvae-train --config=test --workdir=runs/pm --config.model=plain_mlp_vae:make_model

A model plug-in is a callable ``(config, image_shape) -> exvae.models.Model``:
pure functions of ``(params, inputs)`` (init, encode, encode_mean, decode,
score). Every prior, the trainer and the evaluation use only those.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from exvae.models.base import Model
from exvae.models.vae import gaussian_score


class PlainVAE(nn.Module):
  image_shape: tuple
  latent_dim: int
  hidden: tuple

  def setup(self):
    self.enc = [nn.Dense(h) for h in self.hidden]
    self.mu = nn.Dense(self.latent_dim)
    self.logvar = nn.Dense(self.latent_dim)
    self.dec = [nn.Dense(h) for h in self.hidden]
    self.out = nn.Dense(math.prod(self.image_shape))

  def encode(self, x):
    h = x.reshape((x.shape[0], -1))
    for layer in self.enc:
      h = nn.relu(layer(h))
    return self.mu(h), jnp.clip(self.logvar(h), -6.0, 2.0)

  def decode(self, z):
    h = z
    for layer in self.dec:
      h = nn.relu(layer(h))
    return self.out(h).reshape((z.shape[0],) + tuple(self.image_shape))  # Bernoulli logits

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


def make_model(config, image_shape):
  image_shape = tuple(int(s) for s in image_shape)
  module = PlainVAE(image_shape, int(config.latent_dim), tuple(int(h) for h in config.hidden))

  def init(key):
    return module.init(key, jnp.zeros((1,) + image_shape, jnp.float32))["params"]

  def encode(params, x):
    return module.apply({"params": params}, x, method=PlainVAE.encode)

  def encode_mean(params, x):
    return encode(params, x)[0]

  def decode(params, z):
    return module.apply({"params": params}, z, method=PlainVAE.decode)

  def score(params, x, key, num_samples, log_lik):
    return gaussian_score(encode, decode, params, x, key, num_samples, log_lik)

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
