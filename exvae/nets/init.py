"""PyTorch's default bias initialisation, applied to a Flax parameter tree.

The reference builds every layer with PyTorch defaults and then overwrites
only the ``nn.Linear`` weights with He init; every bias (linear and
convolution) keeps PyTorch's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, with
``fan_in`` the kernel's input size (in_features, or in_channels * kh * kw).
Flax's ``bias_init`` does not see the fan-in, so the models draw their
biases here, once, after ``module.init``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def torch_biases(params: PyTree, key: jax.Array) -> PyTree:
  """Redraws every ``bias`` that sits beside a ``kernel`` as PyTorch would.

  Args:
    params: a Flax ``params`` tree (nested dicts).
    key: PRNG key; each bias gets ``fold_in(key, i)`` in a fixed (sorted
      path) order, so the result is a pure function of ``key``.

  Returns:
    The same tree with each such bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    ``fan_in = prod(kernel.shape[:-1])`` (Dense (in, out) and Conv
    (kh, kw, in, out) layouts alike).  Biases without a kernel are left alone.
  """
  counter = [0]

  def walk(tree):
    if not isinstance(tree, Mapping):
      return tree
    out = {}
    for name in sorted(tree):
      out[name] = walk(tree[name])
    if "bias" in tree and "kernel" in tree and not isinstance(tree["bias"], dict):
      kernel, bias = tree["kernel"], tree["bias"]
      bound = 1.0 / np.sqrt(max(int(np.prod(kernel.shape[:-1])), 1))
      k = jax.random.fold_in(key, counter[0])
      counter[0] += 1
      out["bias"] = jax.random.uniform(k, bias.shape, bias.dtype, -bound, bound)
    return out

  return walk(params)


def init_model_params(module, image_shape: tuple[int, ...], key: jax.Array) -> PyTree:
  """``module.init`` on a (1, *image_shape) dummy batch, then PyTorch's default biases.

  Args:
    module: a Flax model module whose ``__call__`` takes a batch of images.
    image_shape: (H, W, C).
    key: PRNG key (weights from ``key``, biases from ``fold_in(key, 1)``).

  Returns:
    The ``params`` tree.
  """
  params = module.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
  return torch_biases(params, jax.random.fold_in(key, 1))
