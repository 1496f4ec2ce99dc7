"""Fast counter-based Bernoulli draws for dynamic binarisation.

Dynamic binarisation draws one Bernoulli variable per pixel of every image a
step touches: the batch, and in exact exemplar mode M = 25000 exemplars, i.e.
20M pixels per step.  ``jax.random.bernoulli`` (threefry, 20 rounds per 32-bit
word) costs about 220 ms for that on a 2-core CPU, as much as the encoder's
forward and backward pass; the murmur3 finaliser used here (two multiplies,
three xor-shifts per pixel) costs about 4 ms.  Its statistical quality is far
beyond what binarising images needs (uniform 24-bit outputs, full avalanche);
it is NOT meant for cryptographic or Monte-Carlo-integration use.

Every draw is a pure function of (key, row id, pixel index), so an exemplar is
binarised identically wherever it appears in a batch and whatever the batch
size: resumed runs, sharded runs and incrementally grown banks agree exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B1
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def _seed_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  key = key.reshape(-1).astype(jnp.uint32)
  return key[0], key[-1]


def uniform_rows(key: jax.Array, shape: tuple[int, ...], row_ids: jax.Array) -> jax.Array:
  """Uniform [0, 1) floats (24-bit resolution), one per element of ``shape``.

  Args:
    key: a JAX PRNG key (raw uint32[2] or typed).
    shape: (R, ...) output shape.
    row_ids: (R,) integer identity of each row (e.g. training-set index).

  Returns:
    (R, ...) float32; element [r, j] depends only on (key, row_ids[r], j).
  """
  s0, s1 = _seed_words(key)
  rows = _fmix32(row_ids.astype(jnp.uint32) * jnp.uint32(_GOLDEN) + s0)  # (R,)
  inner = 1
  for s in shape[1:]:
    inner *= int(s)
  j = jax.lax.iota(jnp.uint32, inner)
  h = _fmix32((j[None, :] * jnp.uint32(_M2)) ^ (rows[:, None] + s1))
  h = _fmix32(h + rows[:, None])
  return ((h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))).reshape(shape)


def bernoulli_rows(
  key: jax.Array, p: jax.Array, row_ids: jax.Array, dtype=jnp.float32
) -> jax.Array:
  """Bernoulli(p) as {0, 1}; row r's draws depend on (key, row_ids[r]) only.

  Args:
    key: PRNG key.
    p: (R, ...) probabilities in [0, 1].
    row_ids: (R,) integer row identities.
    dtype: output dtype (uint8 stores large batches of bits 4x smaller).

  Returns:
    (R, ...) array of 0s and 1s.
  """
  return (uniform_rows(key, p.shape, row_ids) < p).astype(dtype)


def bernoulli(key: jax.Array, p: jax.Array) -> jax.Array:
  """Bernoulli(p) as float32 {0, 1} for any array ``p`` (rows = leading axis)."""
  if p.ndim == 0:
    return bernoulli_rows(key, p.reshape(1, 1), jnp.zeros((1,), jnp.uint32)).reshape(())
  return bernoulli_rows(key, p, jnp.arange(p.shape[0], dtype=jnp.uint32))
