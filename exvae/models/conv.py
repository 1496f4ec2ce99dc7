"""Convolutional two-level VAE (ConvHVAE) of the VampPrior / Exemplar VAE papers.

Networks (reference ``convHVAE_2level`` of the Exemplar VAE code; every conv
is a gated conv with padding k // 2, every log-variance clipped to [-6, 2])::

    q(z2|x):    x -> GC(32, 7x7) -> GC(32, 3x3, s2) -> GC(64, 5x5) -> GC(64, 3x3, s2)
                  -> GC(6, 3x3) -> flatten (294 for 28x28) -> Linear mu, logvar of z2
    q(z1|x,z2): [flatten(GC stack as above with 3x3 kernels)(x), GatedDense(294)(z2)]
                  -> GatedDense(300) -> mu, logvar of z1
    p(z1|z2):   z2 -> GatedDense(300) -> GatedDense(300) -> mu, logvar of z1
    p(x|z1,z2): [GatedDense(300)(z1), GatedDense(300)(z2)] -> GatedDense(H*W*C)
                  -> reshape (H, W, C) -> 4 x GC(64, 3x3) -> 1x1 conv output head

The 1x1 head gives Bernoulli logits (the reference's sigmoid output, before
the sigmoid) or a discretised logistic's ``(mean, log_scale)`` (two 1x1
convs; mean through a sigmoid, log_scale clipped to [-4.5, 0]).

Channel counts (``config.hvae.conv_channels``, ``config.hvae.dec_channels``)
and the dense width (``config.hidden``) are configurable so tests can run
tiny versions; the flattened feature size is computed from the image shape,
so any (H, W, C) works (e.g. 8x8 digits -> 2x2x6 = 24 features).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from exvae.models.base import Model
from exvae.models.hvae import (
  LOG_SCALE_MAX,
  LOG_SCALE_MIN,
  GaussianHead,
  HierarchicalBase,
  check_likelihood,
  make_hierarchical_model,
)
from exvae.models.vae import check_matmul_dtype
from exvae.nets.conv import GatedConvStack, conv1x1, conv_output_hw
from exvae.nets.gated import GatedDense

# The reference encoder stacks: kernel sizes and strides of the five gated convs.
Q_Z2_KERNELS = (7, 3, 5, 3, 3)
Q_Z1_KERNELS = (3, 3, 3, 3, 3)
ENCODER_STRIDES = (1, 2, 1, 2, 1)


def encoder_feature_size(image_shape: Sequence[int], channels: Sequence[int]) -> int:
  """Flattened size of the conv encoders' output: H' * W' * channels[-1] (294 for 28x28x1)."""
  h, w = conv_output_hw(image_shape[:2], ENCODER_STRIDES)
  return h * w * int(channels[-1])


class ConvOutputHead(nn.Module):
  """1x1 convolutional output layer for a given likelihood.

  Attributes:
    channels: C of the images.
    likelihood: 'bernoulli' (logits) or 'logistic' ((mean, log_scale)).
  """

  channels: int
  likelihood: str = "bernoulli"

  @nn.compact
  def __call__(self, h: jax.Array):
    """h: (B, H, W, F) -> logits (B, H, W, C), or (mean, log_scale) each (B, H, W, C)."""
    out = conv1x1(self.channels, name="out")(h)
    if self.likelihood == "bernoulli":
      return out
    log_scale = conv1x1(self.channels, name="log_scale")(h)
    return jax.nn.sigmoid(out), jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)


class ConvHVAE(HierarchicalBase):
  """Two-level VAE with gated convolutional encoders and decoder.

  Attributes:
    image_shape: (H, W, C).
    latent_dim: size of z2 (the prior's latent).
    z1_dim: size of z1.
    hidden: dense widths; the two-layer p(z1|z2) stack uses all of them, the
      single dense layers ``hidden[-1]`` (300 in the paper).
    conv_channels: channels of the five encoder convs (32, 32, 64, 64, 6).
    dec_channels: channels of the decoder's 3x3 gated convs (64, 64, 64, 64).
    likelihood: 'bernoulli' or 'logistic'.
  """

  image_shape: Sequence[int]
  latent_dim: int = 40
  z1_dim: int = 40
  hidden: Sequence[int] = (300, 300)
  conv_channels: Sequence[int] = (32, 32, 64, 64, 6)
  dec_channels: Sequence[int] = (64, 64, 64, 64)
  likelihood: str = "bernoulli"

  def setup(self):
    if len(self.conv_channels) != len(ENCODER_STRIDES):
      raise ValueError(
        f"ConvHVAE needs {len(ENCODER_STRIDES)} encoder channel counts, got "
        f"{tuple(self.conv_channels)}."
      )
    fc = self.hidden[-1]
    h_size = encoder_feature_size(self.image_shape, self.conv_channels)
    self.q_z2_conv = GatedConvStack(
      tuple(self.conv_channels), Q_Z2_KERNELS, ENCODER_STRIDES, name="q_z2_conv"
    )
    self.q_z2_head = GaussianHead(self.latent_dim, name="q_z2_head")
    self.q_z1_conv = GatedConvStack(
      tuple(self.conv_channels), Q_Z1_KERNELS, ENCODER_STRIDES, name="q_z1_conv"
    )
    self.q_z1_z2 = GatedDense(h_size, name="q_z1_z2")
    self.q_z1_joint = GatedDense(fc, name="q_z1_joint")
    self.q_z1_head = GaussianHead(self.z1_dim, name="q_z1_head")
    self.p_z1_layers = [GatedDense(w, name=f"p_z1_{i}") for i, w in enumerate(self.hidden)]
    self.p_z1_head = GaussianHead(self.z1_dim, name="p_z1_head")
    self.p_x_z1 = GatedDense(fc, name="p_x_z1")
    self.p_x_z2 = GatedDense(fc, name="p_x_z2")
    self.p_x_pre = GatedDense(math.prod(self.image_shape), name="p_x_pre")
    n_dec = len(self.dec_channels)
    self.p_x_conv = GatedConvStack(
      tuple(self.dec_channels), (3,) * n_dec, (1,) * n_dec, name="p_x_conv"
    )
    self.p_x_head = ConvOutputHead(int(self.image_shape[-1]), self.likelihood, name="p_x_head")

  def _q_z2_trunk(self, x: jax.Array) -> jax.Array:
    h = self.q_z2_conv(x)
    return h.reshape(h.shape[0], -1)

  def q_z1_features(self, x: jax.Array) -> jax.Array:
    """The conv x-branch of q(z1|x,z2): (B, H, W, C) -> (B, h_size)."""
    h = self.q_z1_conv(x)
    return h.reshape(h.shape[0], -1)

  def p_x(self, z1: jax.Array, z2: jax.Array):
    """p(x|z1,z2): z1 (N, d1), z2 (N, d2) -> logits or (mean, log_scale), (N, H, W, C)."""
    h = jnp.concatenate([self.p_x_z1(z1), self.p_x_z2(z2)], axis=-1)
    h = self.p_x_pre(h).reshape((z1.shape[0],) + tuple(self.image_shape))
    return self.p_x_head(self.p_x_conv(h))


def make_convhvae(config, image_shape: Sequence[int]) -> Model:
  """Builds the ConvHVAE from ``config``.

  Args:
    config: ConfigDict with ``latent_dim`` (z2), ``hidden``, ``likelihood``,
      ``hvae.z1_dim``, ``hvae.conv_channels``, ``hvae.dec_channels``.
    image_shape: (H, W, C) of the data.

  Returns:
    A :class:`Model` with the prior on z2 (see :func:`make_hierarchical_model`).
  """
  check_likelihood(config.likelihood)
  check_matmul_dtype(config, "convhvae")
  module = ConvHVAE(
    image_shape=tuple(int(s) for s in image_shape),
    latent_dim=int(config.latent_dim),
    z1_dim=int(config.hvae.z1_dim),
    hidden=tuple(int(h) for h in config.hidden),
    conv_channels=tuple(int(c) for c in config.hvae.conv_channels),
    dec_channels=tuple(int(c) for c in config.hvae.dec_channels),
    likelihood=config.likelihood,
  )
  return make_hierarchical_model(module, image_shape)
