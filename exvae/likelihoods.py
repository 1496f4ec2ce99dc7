"""Observation log-likelihoods ``log p(x | decoder output)``, summed per example.

* ``bernoulli``: decoder output = logits (B, H, W, C), for binarised images.
* ``logistic``: discretised logistic over 256 grey levels (the VampPrior /
  Exemplar VAE ``log_logistic_256`` for grey/continuous data, made exactly
  normalised): decoder output = ``(mean, log_scale)``, two (B, H, W, C) arrays.

:func:`get_likelihood` returns ``(log_prob(x, out) -> (B,), mean(out) -> (B, H, W, C))``.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp


# The reference clamps Bernoulli probabilities to [1e-5, 1 - 1e-5] (its
# ``log_bernoulli``), in training and in the test NLL alike.
BERNOULLI_EPS = 1e-5


def bernoulli_log_prob(x: jax.Array, logits: jax.Array, eps: float = BERNOULLI_EPS) -> jax.Array:
  """Bernoulli log-likelihood from logits, probabilities clamped to [eps, 1 - eps].

  Clamping p = sigmoid(l) to [eps, 1 - eps] equals clipping the logit to
  ``+-log((1 - eps) / eps)`` (sigmoid is monotone), which keeps the log-space
  form stable; the gradient is zero outside the range, as with the
  reference's ``torch.clamp``.

  Args:
    x: (B, ...) targets in [0, 1] (binary for a proper likelihood).
    logits: (B, ...) decoder logits, same shape as ``x``.
    eps: probability clamp (0: none).

  Returns:
    (B,) sum over all non-batch axes of ``x log p + (1 - x) log (1 - p)``.
  """
  if eps > 0:
    bound = math.log1p(-eps) - math.log(eps)
    logits = jnp.clip(logits, -bound, bound)
  # log sigmoid(l) = -softplus(-l); log(1 - sigmoid(l)) = -softplus(l).
  ll = -(x * jax.nn.softplus(-logits) + (1.0 - x) * jax.nn.softplus(logits))
  return ll.reshape(ll.shape[0], -1).sum(-1)


def bernoulli_mean(logits: jax.Array) -> jax.Array:
  """Mean image of the Bernoulli decoder (for pictures)."""
  return jax.nn.sigmoid(logits)


NUM_BINS = 256


def _log_sigmoid_diff(a: jax.Array, b: jax.Array, delta: jax.Array) -> jax.Array:
  """log(sigmoid(a) - sigmoid(b)) for ``a = b + delta``, ``delta > 0``, accurate everywhere.

  Uses the identity ``sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-delta))``:
  each factor is computed in log space without cancellation, so neither a
  narrow bin near the mode (where the two CDF values nearly coincide) nor a
  bin far in either tail (where both saturate at 0 or 1) loses precision.
  """
  return (
    jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b) + jnp.log(-jnp.expm1(-jnp.maximum(delta, 1e-30)))
  )


def discretized_logistic_log_prob(x: jax.Array, params, num_bins: int = NUM_BINS) -> jax.Array:
  """Discretised logistic log-likelihood over ``num_bins`` grey levels, summed per example.

  Grey level ``k`` (x = k / (num_bins - 1)) owns the interval
  ``[x - h, x + h]`` with ``h = 1 / (2 (num_bins - 1))``; the first bin
  extends to -inf and the last to +inf, so the probabilities of the
  ``num_bins`` levels sum to one for any ``(mean, log_scale)``:

      P(k) = sigmoid((x + h - mean) / s) - sigmoid((x - h - mean) / s),  s = exp(log_scale).

  Args:
    x: (B, ...) grey levels in [0, 1] on the 1/(num_bins - 1) grid (values
      are snapped to the nearest level).
    params: ``(mean, log_scale)``, each broadcastable to ``x`` (per-pixel or
      global scale).
    num_bins: number of grey levels (256 for 8-bit images).

  Returns:
    (B,) log-likelihood summed over all non-batch axes.
  """
  mean, log_scale = params
  k = jnp.round(jnp.clip(x, 0.0, 1.0) * (num_bins - 1))
  xc = k / (num_bins - 1)
  half = 0.5 / (num_bins - 1)
  inv_s = jnp.exp(-log_scale)
  plus = (xc + half - mean) * inv_s
  minus = (xc - half - mean) * inv_s
  log_mid = _log_sigmoid_diff(plus, minus, (2.0 * half) * inv_s)
  log_first = jax.nn.log_sigmoid(plus)  # P(x <= x0 + h)
  log_last = jax.nn.log_sigmoid(-minus)  # P(x >= x_last - h)
  ll = jnp.where(k <= 0, log_first, jnp.where(k >= num_bins - 1, log_last, log_mid))
  return ll.reshape(ll.shape[0], -1).sum(-1)


def logistic_mean(params) -> jax.Array:
  """Picture of the logistic decoder: its location parameter clipped to [0, 1] (B, H, W, C)."""
  mean, _ = params
  return jnp.clip(mean, 0.0, 1.0)


LIKELIHOODS: dict[str, tuple[Callable, Callable]] = {
  "bernoulli": (bernoulli_log_prob, bernoulli_mean),
  "logistic": (discretized_logistic_log_prob, logistic_mean),
}


def get_likelihood(name: str):
  """Returns ``(log_prob(x, params), mean(params))`` for a likelihood name."""
  if name not in LIKELIHOODS:
    raise ValueError(f"Unknown likelihood {name!r}; known: {sorted(LIKELIHOODS)}.")
  return LIKELIHOODS[name]


def diag_gaussian_log_prob(z: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(z; mu, diag(exp(logvar))) summed over the last axis. Shapes broadcast; returns (...)."""
  return -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + logvar + (z - mu) ** 2 * jnp.exp(-logvar), axis=-1)
