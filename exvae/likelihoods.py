"""Observation log-likelihoods ``log p(x | decoder output)``, summed per example."""

import jax
import jax.numpy as jnp


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """Bernoulli log-likelihood from logits, stable for any logit magnitude.

  Args:
    x: (B, ...) targets in [0, 1] (binary for a proper likelihood).
    logits: (B, ...) decoder logits, same shape as ``x``.

  Returns:
    (B,) sum over all non-batch axes of ``x log p + (1 - x) log (1 - p)``.
  """
  # log sigmoid(l) = -softplus(-l); log(1 - sigmoid(l)) = -softplus(l).
  ll = -(x * jax.nn.softplus(-logits) + (1.0 - x) * jax.nn.softplus(logits))
  return ll.reshape(ll.shape[0], -1).sum(-1)


def bernoulli_mean(logits: jax.Array) -> jax.Array:
  """Mean image of the Bernoulli decoder (for pictures)."""
  return jax.nn.sigmoid(logits)


LIKELIHOODS = {"bernoulli": (bernoulli_log_prob, bernoulli_mean)}


def get_likelihood(name: str):
  """Returns ``(log_prob(x, params), mean(params))`` for a likelihood name."""
  if name not in LIKELIHOODS:
    raise ValueError(f"Unknown likelihood {name!r}; known: {sorted(LIKELIHOODS)}.")
  return LIKELIHOODS[name]


def diag_gaussian_log_prob(z: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(z; mu, diag(exp(logvar))) summed over the last axis. Shapes broadcast; returns (...)."""
  return -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + logvar + (z - mu) ** 2 * jnp.exp(-logvar), axis=-1)
