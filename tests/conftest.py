"""Shared fixtures: the tiny test config and a loaded tiny data set."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(name: str = "test", **overrides):
  """Loads configs/<name>.py and applies dotted overrides (ml_collections semantics)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def run_train_steps(c, num_devices: int, steps: int = 5, on_compiled=None):
  """A few data-parallel train steps of config ``c`` on a ``data`` mesh (used by subprocesses).

  Args:
    c: the config.
    num_devices: devices of the mesh (0: all; 1: no mesh).
    steps: train steps.
    on_compiled: optional callback given the compiled step's HLO text.

  Returns:
    ``(state, losses)``.
  """
  import jax.numpy as jnp
  from exvae import distributed, train_lib
  splits = train_lib.load_data(c)
  n = splits.train_x.shape[0]
  with distributed.data_mesh(num_devices) as mesh:
    pool, sharded = train_lib.make_pool(c, splits, mesh)
    setup = train_lib.make_setup(c, splits, sharded)
    state = distributed.replicate(train_lib.init_state(c, setup, n), mesh)
    perm = distributed.replicate(jnp.asarray(train_lib.epoch_permutation(0, 0, n)), mesh)
    state = train_lib.refresh_step(state, pool, setup=setup)
    if on_compiled is not None:
      on_compiled(train_lib.train_step.lower(state, pool, perm, setup=setup).compile().as_text())
    losses = []
    for _ in range(steps):
      state, m = train_lib.train_step(state, pool, perm, setup=setup)
      losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture
def test_config():
  return load_config("test")
