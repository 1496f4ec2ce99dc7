"""Data parallelism over a device mesh, and multi-host start-up.

Training is data-parallel with plain ``jax.jit`` and shardings (no pmap): the
train state is replicated, and inside the step the batch and the subsampled
exemplars are constrained to be split along the ``data`` axis, so each device
encodes and scores its share and XLA inserts the gradient all-reduce.

The training pool (the images, which double as exemplars) is replicated by
default.  With ``config.pool_sharding = 'sharded'`` (the default on several
processes) it is split along N over the ``data`` axis instead: each host puts
only its own rows on its devices (:func:`place_pool`), rows are fetched with
:func:`take_rows` (each device contributes the rows it owns, summed with one
psum), and whole-pool encodings run shard by shard (:func:`map_pool_shards`),
so the pool's memory is divided by the number of devices.  The same code runs on one device (no mesh: constraints
are no-ops).  Multi-host runs call :func:`initialize` first (one process per
host; on CPU the collectives go through gloo).
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(num_devices: int = 0) -> Mesh | None:
  """A 1-D ``data`` mesh over the first ``num_devices`` global devices (0: all).

  Returns None for a single device, so single-device runs take the plain path.
  """
  devices = jax.devices()
  n = len(devices) if num_devices <= 0 else int(num_devices)
  if n > len(devices):
    raise ValueError(f"num_devices={n} but only {len(devices)} devices are visible.")
  if n == 1:
    return None
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


@contextlib.contextmanager
def data_mesh(num_devices: int = 0):
  """Context: the ``data`` mesh of :func:`make_data_mesh`, made active with ``jax.set_mesh``.

  Yields the mesh, or None (and activates nothing) for a single device.
  """
  mesh = make_data_mesh(num_devices)
  if mesh is None:
    yield None
    return
  with jax.set_mesh(mesh):
    yield mesh


def shard_batch(x: jax.Array) -> jax.Array:
  """Inside jit: split ``x`` along its leading axis over the active ``data`` mesh axis.

  A no-op without an active mesh (``jax.set_mesh``) or when the leading
  dimension does not divide evenly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return x
  if x.shape[0] % mesh.shape[DATA_AXIS]:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def active_data_mesh():
  """The active (abstract) mesh if it has a ``data`` axis of size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
    return None
  return mesh


def replicate(tree, mesh: Mesh | None):
  """Places every leaf of ``tree`` on all devices of ``mesh`` (identity without a mesh)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P()))


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Starts multi-host JAX (call before any other JAX use).

  On CPU the cross-process collectives use gloo.  On GPU/TPU clusters with a
  scheduler (SLURM, Cloud TPU), ``jax.distributed.initialize()`` without
  arguments discovers these values; pass empty values to do that.
  """
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()


def is_primary() -> bool:
  """True on the process that writes logs and pictures."""
  return jax.process_index() == 0


# ----------------------------------------------------------------------------
# The training pool split along N (host-sharded data)
# ----------------------------------------------------------------------------

POOL_SHARDING = ("auto", "replicated", "sharded")


def pool_is_sharded(pool_sharding: str, mesh: Mesh | None) -> bool:
  """Resolves ``config.pool_sharding``: 'auto' shards when several processes share the mesh.

  Raises:
    ValueError: unknown value.
  """
  if pool_sharding not in POOL_SHARDING:
    raise ValueError(f"pool_sharding must be one of {POOL_SHARDING}, got {pool_sharding!r}.")
  if mesh is None:
    return False  # one device: nothing to split
  if pool_sharding == "auto":
    return jax.process_count() > 1
  return pool_sharding == "sharded"


def pool_rows_of_this_host(n: int, mesh: Mesh) -> tuple[int, int]:
  """The ``[start, stop)`` rows of an N-row pool that this process's devices hold.

  Rows past ``n`` (padding to a multiple of the device count) are not
  counted.  A loader that can read a row range may read only these rows.
  """
  ndev = mesh.shape[DATA_AXIS]
  n_pad = -(-n // ndev) * ndev
  idx = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((n_pad,))
  starts = [sl[0].start or 0 for sl in idx.values()]
  stops = [sl[0].stop if sl[0].stop is not None else n_pad for sl in idx.values()]
  return min(min(starts), n), min(max(stops), n)


def place_pool(rows, n: int, mesh: Mesh | None, sharded: bool, start: int = 0) -> jax.Array:
  """Puts the training pool on the mesh, replicated or split along N.

  Args:
    rows: the pool's images as a NumPy array; the whole pool, or (sharded)
      at least rows ``[start, start + len(rows))`` covering
      :func:`pool_rows_of_this_host`.
    n: the number of training images N in the whole pool.
    mesh: the ``data`` mesh, or None.
    sharded: split along N (pads N to a multiple of the device count with
      zero images, which no step ever reads).
    start: global index of ``rows[0]``.

  Returns:
    (N, H, W, C) replicated, or (N_pad, H, W, C) split along ``data``.
  """
  if not sharded:
    return replicate(jnp.asarray(rows), mesh)
  ndev = mesh.shape[DATA_AXIS]
  n_pad = -(-n // ndev) * ndev
  shape = (n_pad,) + tuple(rows.shape[1:])
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def shard(index):
    sl = index[0]
    lo, hi = (sl.start or 0), (sl.stop if sl.stop is not None else n_pad)
    out = np.zeros((hi - lo,) + shape[1:], rows.dtype)
    a, b = max(lo, start), min(hi, n, start + rows.shape[0])
    if b > a:
      out[a - lo : b - lo] = rows[a - start : b - start]
    elif lo < n:
      raise ValueError(
        f"place_pool: rows [{lo}, {min(hi, n)}) of the pool are needed on this "
        f"host but only [{start}, {start + rows.shape[0]}) were given."
      )
    return out

  # Only the shards of this process's devices are built (and read from `rows`).
  return jax.make_array_from_callback(shape, sharding, shard)


def take_rows(pool: jax.Array, ids: jax.Array, sharded: bool) -> jax.Array:
  """Inside jit: ``pool[ids]`` for a replicated or an N-split pool (then replicated rows).

  For a split pool each device gathers the requested rows it owns, writes
  zeros for the others, and one psum over ``data`` assembles the rows (exact:
  every row has one owner).  Communication is ``len(ids)`` rows, never the pool.

  Args:
    pool: (N, ...) replicated, or (N_pad, ...) split along ``data``.
    ids: (M,) int row indices in ``[0, N)``.
    sharded: whether ``pool`` is split (static).

  Returns:
    (M, ...) the rows, replicated.
  """
  mesh = active_data_mesh()
  if not sharded or mesh is None:
    return pool[ids]
  n_local = pool.shape[0] // mesh.shape[DATA_AXIS]

  def local(pool_l, ids):
    rel = ids - lax.axis_index(DATA_AXIS) * n_local
    mine = (rel >= 0) & (rel < n_local)
    rows = pool_l[jnp.clip(rel, 0, n_local - 1)]
    rows = jnp.where(mine.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros_like(rows))
    return lax.psum(rows, DATA_AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P()), out_specs=P())(pool, ids)


def map_pool_shards(fn, params, pool: jax.Array, n: int, sharded: bool) -> jax.Array:
  """Inside jit: ``fn(params, rows, row_ids)`` over the whole pool, shard by shard if split.

  Args:
    fn: ``fn(params, rows (n_rows, ...), row_ids (n_rows,) int32) -> (n_rows, d)``.
    params: replicated parameters given to every device.
    pool: (N, ...) replicated, or (N_pad, ...) split along ``data``.
    n: the number of real rows N.
    sharded: whether ``pool`` is split (static).

  Returns:
    (N, d) results for rows ``0 .. N-1``; a split pool's results stay split
    until the padding is sliced off.
  """
  mesh = active_data_mesh()
  if not sharded or mesh is None:
    return fn(params, pool, jnp.arange(pool.shape[0], dtype=jnp.int32))
  n_local = pool.shape[0] // mesh.shape[DATA_AXIS]

  def local(params, pool_l):
    ids = lax.axis_index(DATA_AXIS).astype(jnp.int32) * n_local + jnp.arange(
      n_local, dtype=jnp.int32
    )
    return fn(params, pool_l, ids)

  out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS))(
    params, pool
  )
  return out[:n]
