"""Bank-sharded exemplar kernels: the exemplar bank is split along N over a 1-D mesh.

Each device runs the streamed single-device kernel on its shard and the partial
results are merged with collectives:
  * log-sum: lse = M + log psum(exp(lse_dev - M)) with M = pmax(lse_dev) (the max
    is only a shift, so it is stop-gradient-ed), count = psum(count_dev);
  * top-k: local top-k with global indices, all_gather along k, top-k again.
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

from exvae.kernels.exemplar_lse import log_kernel_sum, topk_neighbors

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


def _pad_bank(bank: Array, bank_mask: Optional[Array], bank_ids: Optional[Array],
              ndev: int) -> tuple[Array, Optional[Array], Optional[Array], int]:
    """Pad N to a multiple of ndev; padded rows are masked out. Returns n_local too."""
    n = bank.shape[0]
    n_local = -(-n // ndev)
    pad = n_local * ndev - n
    if pad:
        bank = jnp.pad(bank, ((0, pad), (0, 0)))
        base = jnp.ones((n,), bool) if bank_mask is None else jnp.asarray(bank_mask, bool)
        bank_mask = jnp.pad(base, (0, pad))
        if bank_ids is not None:
            bank_ids = jnp.pad(jnp.asarray(bank_ids, jnp.int32), (0, pad), constant_values=-1)
    return bank, bank_mask, bank_ids, n_local


def _bank_shard_args(mesh: Mesh, axis: str, replicated: list, bank: Array,
                     bank_mask: Optional[Array], bank_ids: Optional[Array],
                     query_ids: Optional[Array]):
    """Pads the bank and lays out the shard_map arguments shared by both kernels.

    Args:
      mesh, axis: the mesh and the axis the bank is split along.
      replicated: leading arguments given whole to every device (queries, ...).
      bank, bank_mask, bank_ids, query_ids: as in `log_kernel_sum`.

    Returns:
      ``(args, specs, unpack, n_local)``: the flat arguments and their
      PartitionSpecs, a function mapping the per-device trailing arguments
      ``rest`` to ``(mask_l, ids_l, query_ids)`` (None where absent), and the
      per-device bank size.
    """
    ndev = mesh.shape[axis]
    use_ids = bank_ids is not None and query_ids is not None
    bank, bank_mask, bank_ids, n_local = _pad_bank(bank, bank_mask, bank_ids if use_ids else None,
                                                   ndev)
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

    return args, tuple(specs), unpack, n_local


@partial(jax.jit, static_argnames=("mesh", "axis", "chunk_size", "bank_dtype"))
def sharded_log_kernel_sum(mesh: Mesh, z: Array, bank: Array, log_var: Array, *,
                           bank_mask: Optional[Array] = None,
                           bank_ids: Optional[Array] = None,
                           query_ids: Optional[Array] = None,
                           axis: str = "bank", chunk_size: Optional[int] = None,
                           bank_dtype: Any = None) -> tuple[Array, Array]:
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
    args, specs, unpack, _ = _bank_shard_args(mesh, axis, [z, jnp.asarray(log_var)], bank,
                                              bank_mask, bank_ids, query_ids)

    def local(z, lv, bank_l, *rest):
        mask_l, ids_l, qids = unpack(rest)
        lse_l, cnt_l = log_kernel_sum(z, bank_l, lv, bank_mask=mask_l, bank_ids=ids_l,
                                      query_ids=qids, chunk_size=chunk_size,
                                      bank_dtype=bank_dtype)
        # The shift cancels exactly; stop_gradient keeps pmax out of autodiff.
        m = lax.pmax(lax.stop_gradient(lse_l), axis)
        m_safe = jnp.where(m > -jnp.inf, m, 0.0)
        tot = lax.psum(jnp.exp(lse_l - m_safe), axis)
        lse = jnp.where(tot > 0, m_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
        return lse, lax.psum(cnt_l, axis)

    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    return fn(*args)


_BIG = 3e38  # stands for +inf inside psum (inf + 0 is fine, but keep it finite)


def _gather_psum(x: Array, me: Array, ndev: int, axis: str) -> Array:
    """Concatenate per-device (B, k) blocks along axis 1 via a psum of zero buffers."""
    b, k = x.shape
    buf = jnp.zeros((b, k * ndev), x.dtype)
    buf = lax.dynamic_update_slice_in_dim(buf, x, me * k, axis=1)
    return lax.psum(buf, axis)


@partial(jax.jit, static_argnames=("mesh", "k", "axis", "chunk_size", "approx"))
def sharded_topk_neighbors(mesh: Mesh, z: Array, bank: Array, k: int, *,
                           bank_mask: Optional[Array] = None,
                           bank_ids: Optional[Array] = None,
                           query_ids: Optional[Array] = None,
                           axis: str = "bank", chunk_size: Optional[int] = None,
                           approx: bool = False) -> tuple[Array, Array]:
    """`topk_neighbors` with the bank split along N over `mesh[axis]`.

    Returns:
      (sq_dists (B, k) ascending, idx (B, k) int32 global bank indices, -1 if missing).
    """
    ndev = mesh.shape[axis]
    args, specs, unpack, n_local = _bank_shard_args(
        mesh, axis, [lax.stop_gradient(z)], lax.stop_gradient(bank), bank_mask, bank_ids,
        query_ids)

    def local(z, bank_l, *rest):
        mask_l, ids_l, qids = unpack(rest)
        d_l, i_l = topk_neighbors(z, bank_l, k, bank_mask=mask_l, bank_ids=ids_l,
                                  query_ids=qids, chunk_size=chunk_size, approx=approx)
        offset = lax.axis_index(axis).astype(jnp.int32) * n_local
        i_l = jnp.where(i_l >= 0, i_l + offset, -1)
        # An all-gather built from psum: each device writes its slot of a zero
        # buffer. Unlike lax.all_gather, the result is typed replicated, which the
        # replicated out_specs need (and costs the same on one host).
        me = lax.axis_index(axis)
        d_all = _gather_psum(jnp.where(jnp.isfinite(d_l), d_l, _BIG), me, ndev, axis)
        d_all = jnp.where(d_all >= _BIG, jnp.inf, d_all)  # (B, k * ndev)
        i_all = _gather_psum(i_l, me, ndev, axis)
        neg, pos = lax.top_k(-d_all, k)
        return -neg, jnp.take_along_axis(i_all, pos, axis=1)

    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    return fn(*args)
