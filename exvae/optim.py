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


def make_optimizer(config) -> optax.GradientTransformation:
  """``config.optimizer`` in {'adamnormgrad', 'adam'}, with ``config.learning_rate``."""
  name = config.optimizer
  adam = optax.adam(config.learning_rate, b1=0.9, b2=0.999, eps=1e-8)
  if name == "adamnormgrad":
    return optax.chain(normalize_by_norm(1e-7), adam)
  if name == "adam":
    return adam
  raise ValueError(f"Unknown optimizer {name!r}; known: ['adamnormgrad', 'adam'].")
