"""Optimisers: the reference "AdamNormGrad" as an optax chain, or plain Adam."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class NormalizeByNormState(NamedTuple):
  pass


def normalize_by_norm(eps: float = 1e-7) -> optax.GradientTransformation:
  """Divides each parameter's gradient by its own L2 norm (plus ``eps``).

  This is the first half of the reference's "AdamNormGrad": every leaf of the
  gradient pytree gets unit norm (up to ``eps``), so layers learn at comparable
  rates whatever their gradient scale.

  Args:
    eps: added to the norm to avoid division by zero for zero gradients.

  Returns:
    A stateless optax transformation.
  """

  def init_fn(params):
    del params
    return NormalizeByNormState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda g: g / (jnp.sqrt(jnp.sum(jnp.square(g))) + eps), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_torch_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """Adam's direction in the order of operations of PyTorch's (and the reference's) Adam.

  ``u = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``: eps is added to
  the UNcorrected ``sqrt(v)``, where optax adds it to ``sqrt(v_hat)``; the
  two differ by a factor ``sqrt(1 - b2^t)`` on eps, which matters while
  ``sqrt(v)`` is small (early steps, rarely-updated parameters).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v)``.

  Returns:
    An optax transformation with state ``optax.ScaleByAdamState`` (to be
    followed by a scale by ``-learning_rate``).
  """

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    updates = jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config) -> optax.GradientTransformation:
  """``config.optimizer`` in {'adamnormgrad', 'adam'}, with ``config.learning_rate``.

  'adamnormgrad' is the reference's optimiser: each parameter tensor's
  gradient divided by its own norm, then PyTorch-ordered Adam.
  """
  name = config.optimizer
  adam = optax.adam(config.learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  if name == "adamnormgrad":
    return optax.chain(
      normalize_by_norm(1e-7),
      scale_by_torch_adam(0.9, 0.999, 1e-8),
      optax.scale(-config.learning_rate),
    )
  if name == "adam":
    return adam
  raise ValueError(f"Unknown optimizer {name!r}; known: ['adamnormgrad', 'adam'].")
