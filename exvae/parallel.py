"""The bank-sharded exemplar log-sum: the exemplar bank is split along N over a 1-D mesh.

The exemplar prior evaluates its full bank this way on a ``data`` mesh
(:meth:`exvae.priors.exemplar.ExemplarPrior.log_prob`). Each device runs the streamed
single-device kernel on its shard and the partial results are merged with
collectives: lse = M + log psum(exp(lse_dev - M)) with M = pmax(lse_dev) (the max
is only a shift, so it is stop-gradient-ed), count = psum(count_dev).
Queries and log_var are replicated. Uses `jax.shard_map`, so gradients flow through
(z and log_var cotangents are summed over devices by shard_map's transpose). The
same code runs on a 1-device mesh.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from exvae.kernels.exemplar_lse import log_kernel_sum

Array = jax.Array


def make_mesh(num_devices: Optional[int] = None, axis: str = "bank") -> Mesh:
  """1-D mesh over the first `num_devices` devices (all if None).

  Args:
    num_devices: number of devices to use.
    axis: mesh axis name the bank is split along.
  Returns:
    jax.sharding.Mesh of shape (num_devices,).
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices}, have {len(devices)} devices")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (axis,))


def _pad_bank(
  bank: Array, bank_mask: Optional[Array], bank_ids: Optional[Array], ndev: int
) -> tuple[Array, Optional[Array], Optional[Array]]:
  """Pad N to a multiple of ndev; padded rows are masked out."""
  n = bank.shape[0]
  n_local = -(-n // ndev)
  pad = n_local * ndev - n
  if pad:
    bank = jnp.pad(bank, ((0, pad), (0, 0)))
    base = jnp.ones((n,), bool) if bank_mask is None else jnp.asarray(bank_mask, bool)
    bank_mask = jnp.pad(base, (0, pad))
    if bank_ids is not None:
      bank_ids = jnp.pad(jnp.asarray(bank_ids, jnp.int32), (0, pad), constant_values=-1)
  return bank, bank_mask, bank_ids


def _bank_shard_args(
  mesh: Mesh,
  axis: str,
  replicated: list,
  bank: Array,
  bank_mask: Optional[Array],
  bank_ids: Optional[Array],
  query_ids: Optional[Array],
):
  """Pads the bank and lays out the shard_map arguments of the sharded kernel.

  Args:
    mesh, axis: the mesh and the axis the bank is split along.
    replicated: leading arguments given whole to every device (queries, ...).
    bank, bank_mask, bank_ids, query_ids: as in `log_kernel_sum`.

  Returns:
    ``(args, specs, unpack)``: the flat arguments and their PartitionSpecs, and
    a function mapping the per-device trailing arguments ``rest`` to
    ``(mask_l, ids_l, query_ids)`` (None where absent).
  """
  ndev = mesh.shape[axis]
  use_ids = bank_ids is not None and query_ids is not None
  bank, bank_mask, bank_ids = _pad_bank(bank, bank_mask, bank_ids if use_ids else None, ndev)
  args = list(replicated) + [bank]
  specs = [P()] * len(replicated) + [P(axis)]
  has_mask = bank_mask is not None
  if has_mask:
    args.append(jnp.asarray(bank_mask, bool))
    specs.append(P(axis))
  if use_ids:
    args += [bank_ids, jnp.asarray(query_ids, jnp.int32)]
    specs += [P(axis), P()]

  def unpack(rest):
    mask_l = rest[0] if has_mask else None
    ids_l, qids = (rest[-2], rest[-1]) if use_ids else (None, None)
    return mask_l, ids_l, qids

  return args, tuple(specs), unpack


@partial(jax.jit, static_argnames=("mesh", "axis", "chunk_size", "bank_dtype"))
def sharded_log_kernel_sum(
  mesh: Mesh,
  z: Array,
  bank: Array,
  log_var: Array,
  *,
  bank_mask: Optional[Array] = None,
  bank_ids: Optional[Array] = None,
  query_ids: Optional[Array] = None,
  axis: str = "bank",
  chunk_size: Optional[int] = None,
  bank_dtype: Any = None,
) -> tuple[Array, Array]:
  """`log_kernel_sum` with the bank split along N over `mesh[axis]`.

  Args:
    mesh: mesh from `make_mesh` (static / hashable).
    z: (B, d) queries (replicated).
    bank: (N, d) exemplars; any N (padded to a multiple of the device count).
    log_var: scalar shared log-variance.
    bank_mask, bank_ids, query_ids: as in `log_kernel_sum`.
    axis: mesh axis name.
    chunk_size, bank_dtype: per-device streaming options.

  Returns:
    (lse (B,), count (B,)) replicated, equal to the single-device result.
  """
  args, specs, unpack = _bank_shard_args(
    mesh, axis, [z, jnp.asarray(log_var)], bank, bank_mask, bank_ids, query_ids
  )

  def local(z, lv, bank_l, *rest):
    mask_l, ids_l, qids = unpack(rest)
    lse_l, cnt_l = log_kernel_sum(
      z,
      bank_l,
      lv,
      bank_mask=mask_l,
      bank_ids=ids_l,
      query_ids=qids,
      chunk_size=chunk_size,
      bank_dtype=bank_dtype,
    )
    # The shift cancels exactly; stop_gradient keeps pmax out of autodiff.
    m = lax.pmax(lax.stop_gradient(lse_l), axis)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    tot = lax.psum(jnp.exp(lse_l - m_safe), axis)
    lse = jnp.where(tot > 0, m_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
    return lse, lax.psum(cnt_l, axis)

  fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
  return fn(*args)
