"""Gated convolutions of the ConvHVAE reference architecture (VampPrior / Exemplar VAE).

``GatedConv2d(c, k, s)(x) = Conv_h(x) * sigmoid(Conv_g(x))`` with the
PyTorch padding ``k // 2`` of the reference (``nn.Conv2d(.., k, s, k // 2)``).
For odd kernels that padding gives the same output size as 'SAME' padding,
``ceil(n / s)`` per spatial axis, for every input size, so the networks work
for any image shape (28x28 MNIST, 8x8 digits, 64x64 CelebA) and
:func:`conv_output_hw` computes the flattened feature size from the input.

All modules take and return NHWC arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from exvae.nets.gated import LinearParams

# PyTorch's default nn.Conv2d weight init (kaiming_uniform(a=sqrt(5))):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).  The
# reference applies He init to linear layers only, so convolutions keep it.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = kernel_size // 2
  return ((p, p), (p, p))


def conv_output_hw(hw: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
  """Spatial size after a stack of odd-kernel convolutions with padding k // 2.

  Args:
    hw: (H, W) input size.
    strides: stride of every layer of the stack.

  Returns:
    (H', W') with ``n -> ceil(n / s)`` applied per layer (the 'SAME' size).
  """
  h, w = int(hw[0]), int(hw[1])
  for s in strides:
    h, w = math.ceil(h / s), math.ceil(w / s)
  return h, w


class GatedConv2d(nn.Module):
  """Gated 2-D convolution ``h(x) * sigmoid(g(x))`` (both halves from one conv call).

  Attributes:
    features: output channels.
    kernel_size: odd square kernel size k.
    stride: spatial stride s.
  """

  features: int
  kernel_size: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C_in) -> (B, ceil(H/s), ceil(W/s), features)."""
    if self.kernel_size % 2 != 1:
      raise ValueError(f"GatedConv2d needs an odd kernel size, got {self.kernel_size}.")
    k, s, f = self.kernel_size, self.stride, self.features
    # h and g are separate parameters (AdamNormGrad normalises each of the
    # reference's tensors on its own), convolved in ONE pass over the
    # channel-concatenated kernels.
    shape = (k, k, x.shape[-1], f)
    hk, hb = LinearParams(shape, torch_conv_init, name="h")()
    gk, gb = LinearParams(shape, torch_conv_init, name="g")()
    hg = jax.lax.conv_general_dilated(
      x,
      jnp.concatenate([hk, gk], axis=-1),
      window_strides=(s, s),
      padding=_padding(k),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + jnp.concatenate([hb, gb])
    return hg[..., :f] * jax.nn.sigmoid(hg[..., f:])


class GatedConvStack(nn.Module):
  """A sequence of :class:`GatedConv2d` layers.

  Attributes:
    features: output channels per layer.
    kernel_sizes: kernel size per layer.
    strides: stride per layer.
  """

  features: Sequence[int]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H', W', features[-1]), H', W' from :func:`conv_output_hw`."""
    if not len(self.features) == len(self.kernel_sizes) == len(self.strides):
      raise ValueError(
        "GatedConvStack: features, kernel_sizes and strides differ in length "
        f"({len(self.features)}, {len(self.kernel_sizes)}, {len(self.strides)})."
      )
    for i, (f, k, s) in enumerate(zip(self.features, self.kernel_sizes, self.strides)):
      x = GatedConv2d(int(f), int(k), int(s), name=f"layer_{i}")(x)
    return x


def conv1x1(features: int, name: str) -> nn.Conv:
  """A 1x1 convolution (the reference's output layers ``Conv2d(64, C, 1, 1, 0)``)."""
  return nn.Conv(features, (1, 1), kernel_init=torch_conv_init, name=name)
