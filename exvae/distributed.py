"""Data parallelism over a device mesh, and multi-host start-up.

Training is data-parallel with plain ``jax.jit`` and shardings (no pmap): the
train state and the training pool are replicated, and inside the step the
batch and the subsampled exemplars are constrained to be split along the
``data`` axis, so each device encodes and scores its share and XLA inserts the
gradient all-reduce.  The same code runs on one device (no mesh: constraints
are no-ops).  Multi-host runs call :func:`initialize` first (one process per
host; on CPU the collectives go through gloo).
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
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
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()


def is_primary() -> bool:
  """True on the process that writes logs and pictures."""
  return jax.process_index() == 0
