"""Certified pruned evaluation of the exemplar prior for samples around one centre.

At test time the S importance samples z_s of one data point all lie within a radius
r of a centre c (e.g. the encoder mean): r = max_s |z_s - c|. By the triangle
inequality |z_s - mu_n| >= |c - mu_n| - r for every s, so

    log N(z_s; mu_n, s2 I) <= bound_n = -max(|c - mu_n| - r, 0)^2 / (2 s2) + const.

Exemplars far from c therefore contribute little to any sample's sum.
(The certificate itself uses each sample's own distance r_s = |z_s - c|, binned
over the skipped exemplars' centre distances: much tighter than the common r.) We keep the
`keep` exemplars with the largest bound (= nearest to c; static size, so the whole
thing jits with static shapes), evaluate the exact streamed log-sum over those, and
certify the error from the skipped ones:

    exact_s = log(kept_s + skipped_s),  skipped_s <= U = sum_{n skipped} exp(bound_n)
    0 <= exact_s - lse_s <= log(1 + U / kept_s) = softplus(log U - lse_s) = err_s.

`num_needed` says how many exemplars the tolerance rule would keep: all n with
bound_n >= L + log(tol / N), where L = -(min_n |c - mu_n| + r)^2 / (2 s2) + const is a
lower bound of every sample's log-sum (the nearest exemplar alone). Skipping the
rest costs at most log(1 + tol). Callers pick `keep` >= num_needed (e.g. a power of
two bucket, or the max over a batch of test points) to guarantee that tolerance;
err_bound is the per-sample certificate either way.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from exvae.kernels.exemplar_lse import log_kernel_sum

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)


class PrunedLSE(NamedTuple):
  """Result of `pruned_log_kernel_sum`."""

  lse: Array  # (S,) log-sum over the kept exemplars: a lower bound of the exact value
  err_bound: Array  # (S,) certified: exact - lse lies in [0, err_bound]
  num_needed: Array  # () int32: exemplars the tolerance rule would keep
  radius: Array  # () radius r actually used


def _pruning_bounds(
  center: Array, radius: Array, bank: Array, log_var: Array, bank_mask: Optional[Array]
) -> tuple[Array, Array]:
  """(dc2 (N,) squared centre distances (+inf if masked), bound_n (N,) log-bound)."""
  d = bank.shape[1]
  # Direct (difference) form: exact, only O(N d) work.
  dc2 = jnp.sum(jnp.square(bank - center[None, :]), axis=1)
  if bank_mask is not None:
    dc2 = jnp.where(bank_mask, dc2, jnp.inf)
  lb = jnp.maximum(jnp.sqrt(dc2) - radius, 0.0)
  const = -0.5 * d * (_LOG_2PI + log_var)
  bound = -0.5 * jnp.exp(-log_var) * jnp.square(lb) + const
  return dc2, jnp.where(jnp.isfinite(dc2), bound, -jnp.inf)


_NUM_BUCKETS = 256


def _skipped_mass_per_sample(
  z: Array, center: Array, dc2: Array, kept: Array, log_var: Array, radius: Array
) -> Array:
  """log U_s: a per-sample upper bound on the skipped exemplars' total density.

  One common radius r = max_s |z_s - c| is loose in high dimension (the S
  samples of a 40-d posterior spread over a shell, and the farthest sets the
  bound for all).  Each sample's own distance r_s = |z_s - c| gives
  |z_s - mu_n| >= |c - mu_n| - r_s.  The skipped centre distances are binned
  into _NUM_BUCKETS buckets; charging every member the bound of its bucket's
  lower edge keeps the bound valid at O(N + S * buckets) cost.

  Args:
    z: (S, d) samples; center: (d,); dc2: (N,) squared centre distances
      (+inf for masked); kept: (N,) bool; log_var: scalar; radius: () cap on r_s.

  Returns:
    (S,) log U_s (-inf if nothing was skipped).
  """
  ct = z.dtype
  d = z.shape[1]
  r_s = jnp.minimum(jnp.sqrt(jnp.sum(jnp.square(lax.stop_gradient(z) - center[None]), 1)), radius)
  dc = jnp.sqrt(dc2)
  skipped = (~kept) & jnp.isfinite(dc)
  lo = jnp.min(jnp.where(skipped, dc, jnp.inf))
  hi = jnp.max(jnp.where(skipped, dc, -jnp.inf))
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
  width = jnp.maximum((jnp.where(jnp.isfinite(hi), hi, lo) - lo) / _NUM_BUCKETS, 1e-30)
  j = jnp.clip(jnp.floor((jnp.where(skipped, dc, lo) - lo) / width), 0, _NUM_BUCKETS - 1).astype(
    jnp.int32
  )
  counts = jax.ops.segment_sum(skipped.astype(ct), j, num_segments=_NUM_BUCKETS)
  edge = lo + jnp.arange(_NUM_BUCKETS, dtype=ct) * width  # <= every member's dc
  lb = jnp.maximum(edge[None, :] - r_s[:, None], 0.0)  # (S, buckets)
  const = -0.5 * d * (_LOG_2PI + log_var)
  log_b = -0.5 * jnp.exp(-log_var) * jnp.square(lb) + const
  log_c = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)
  return jax.nn.logsumexp(log_b + log_c[None, :], axis=1)


@partial(jax.jit, static_argnames=("keep", "chunk_size", "bank_dtype"))
def pruned_log_kernel_sum(
  z: Array,
  center: Array,
  bank: Array,
  log_var: Array,
  *,
  keep: int,
  radius: Optional[Array] = None,
  bank_mask: Optional[Array] = None,
  tol: float = 1e-3,
  chunk_size: Optional[int] = None,
  bank_dtype: Any = None,
) -> PrunedLSE:
  """Log-sum of Gaussian kernels over the `keep` exemplars nearest to `center`.

  Args:
    z: (S, d) samples, all within `radius` of `center`.
    center: (d,) centre (e.g. encoder mean of the test point).
    bank: (N, d) exemplar codes.
    log_var: scalar shared log-variance.
    keep: number of exemplars evaluated exactly (static, <= N).
    radius: optional scalar >= max_s |z_s - center|; computed from z if None.
      (A radius that is too small voids the certificate.)
    bank_mask: optional (N,) bool validity.
    tol: relative tolerance used only to report `num_needed`.
    chunk_size, bank_dtype: passed to `log_kernel_sum`.

  Returns:
    PrunedLSE(lse (S,), err_bound (S,), num_needed (), radius ()): the exact full
    log-sum lies in [lse, lse + err_bound] (up to f32 rounding of the kept sum).
    Use lse (the lower bound) or lse + err_bound / 2 as the estimate.
  """
  ct = jnp.promote_types(jnp.result_type(z, bank), jnp.float32)
  z = jnp.asarray(z, ct)
  bank = jnp.asarray(bank, ct)
  center = jnp.asarray(center, ct).reshape(bank.shape[1])
  log_var = jnp.asarray(log_var, ct).reshape(())
  n = bank.shape[0]
  if not 1 <= keep <= n:
    raise ValueError(f"keep must be in [1, {n}], got {keep}")
  if radius is None:
    radius = jnp.sqrt(jnp.max(jnp.sum(jnp.square(z - center[None, :]), axis=1)))
  radius = lax.stop_gradient(jnp.asarray(radius, ct).reshape(()))
  mask = None if bank_mask is None else jnp.asarray(bank_mask, bool).reshape(n)

  dc2, bound = _pruning_bounds(
    lax.stop_gradient(center), radius, lax.stop_gradient(bank), lax.stop_gradient(log_var), mask
  )
  # Largest bound == smallest centre distance.
  neg_sel, idx = lax.top_k(-dc2, keep)
  kept_valid = jnp.isfinite(neg_sel)
  lse, _ = log_kernel_sum(
    z, bank[idx], log_var, bank_mask=kept_valid, chunk_size=chunk_size, bank_dtype=bank_dtype
  )
  kept = jnp.zeros((n,), bool).at[idx].set(True)
  log_u = _skipped_mass_per_sample(z, center, dc2, kept, log_var, radius)
  err = jnp.where(jnp.isfinite(log_u), jax.nn.softplus(log_u - lse), 0.0)
  err = jnp.where(jnp.isfinite(lse), err, jnp.where(jnp.isfinite(log_u), jnp.inf, 0.0))

  # Tolerance rule (see module docstring).
  n_valid = jnp.sum(jnp.isfinite(dc2))
  const = -0.5 * bank.shape[1] * (_LOG_2PI + log_var)
  lower = -0.5 * jnp.exp(-log_var) * jnp.square(jnp.sqrt(jnp.min(dc2)) + radius) + const
  thresh = lower + jnp.log(tol) - jnp.log(jnp.maximum(n_valid, 1).astype(ct))
  num_needed = jnp.sum(bound >= thresh, dtype=jnp.int32)
  return PrunedLSE(lse, lax.stop_gradient(err), num_needed, radius)
