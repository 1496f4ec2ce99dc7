"""Leave-one-out counting, shared by every implementation of the exemplar log-sum-exp.

A query that is itself a training image (``query_ids[b] >= 0``) must not be scored
against its own code: the kernels drop the bank rows with its id, and normalise by
the number of exemplars left.  The XLA path (:mod:`exvae.kernels.exemplar_lse`) and
the Pallas kernels (:mod:`exvae.kernels.pallas_lse`) count them here, the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def loo_counts(valid: Array, bank_ids: Array, qids: Array) -> Array:
  """Number of valid bank rows whose id equals each query id (0 if id < 0).

  Args:
    valid: (N,) bool, the bank rows that count (a bank mask, or all True).
    bank_ids: (N,) int32 training-set index of each bank row.
    qids: (B,) int32 training-set index of each query, -1 for none.

  Returns:
    (B,) int32.
  """
  big = jnp.iinfo(jnp.int32).max
  sorted_ids = jnp.sort(jnp.where(valid, bank_ids, big))
  lo = jnp.searchsorted(sorted_ids, qids, side="left")
  hi = jnp.searchsorted(sorted_ids, qids, side="right")
  return jnp.where(qids >= 0, hi - lo, 0)


def exemplar_counts(
  b: int, n: int, bank_mask: Array | None, bank_ids: Array | None, query_ids: Array | None
) -> Array:
  """N', the exemplars each query is scored against: the valid rows less its own.

  Args:
    b: B, the number of queries.
    n: N, the number of bank rows.
    bank_mask: (N,) bool or None (every row valid).
    bank_ids, query_ids: (N,) and (B,) int32 ids, or None (no leave-one-out).

  Returns:
    (B,) float32.
  """
  valid = jnp.ones((n,), bool) if bank_mask is None else bank_mask
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  if bank_ids is not None and query_ids is not None:
    return (n_valid - loo_counts(valid, bank_ids, query_ids)).astype(jnp.float32)
  return jnp.broadcast_to(n_valid.astype(jnp.float32), (b,))
