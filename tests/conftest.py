"""Shared fixtures: the tiny test config and a loaded tiny data set."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_script(relpath: str):
  """Imports a script that is not a package module (``scripts/x.py``, ``bench/y.py``)."""
  import importlib.util

  name = os.path.splitext(os.path.basename(relpath))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def leftover_temporaries(directory: str) -> list[str]:
  """Temporary files of interrupted writes in ``directory``: exvae.atomic writes each file
  as ``.<name><atomic.TMP_MARK><random>`` beside it, then renames it into place."""
  from exvae import atomic

  return sorted(n for n in os.listdir(directory) if n.startswith(".") and atomic.TMP_MARK in n)


def load_config(name: str = "test", **overrides):
  """Loads configs/<name>.py and applies dotted overrides (ml_collections semantics)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py")
  )
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


def fresh_run(c):
  """``(setup, state, pool, perm)`` of config ``c`` at step 0: initialised, the RAT
  cache filled, the first epoch's permutation."""
  import jax.numpy as jnp
  from exvae import train_lib

  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  state = train_lib.refresh_step(state, pool, setup=setup)
  return setup, state, pool, perm


def train_traced_once(c, steps: int):
  """``steps`` train steps of config ``c`` on one device, the step traced exactly once.

  Returns:
    ``(setup, state, pool, losses)``; ``chex.assert_max_traces`` fails the
    caller if the jitted step retraces inside the loop.
  """
  import chex
  import jax
  from exvae import train_lib

  chex.clear_trace_counter()
  setup, state, pool, perm = fresh_run(c)
  step = jax.jit(
    chex.assert_max_traces(train_lib._train_step, n=1),
    static_argnames=("setup",),
    donate_argnames=("state",),
  )
  losses = []
  for _ in range(steps):
    state, m = step(state, pool, perm, setup=setup)
    losses.append(float(m["loss"]))
  return setup, state, pool, losses


@pytest.fixture
def test_config():
  return load_config("test")


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
  """A finished 2-epoch run of configs/test.py (128 steps, checkpoints every 10), trained once
  per test process and shared by every module that asks for it (test_faults, test_uses,
  test_uses_signals): read it, or copy it before changing anything."""
  from exvae import train_lib

  wd = str(tmp_path_factory.mktemp("trained") / "run")
  train_lib.train_and_evaluate(load_config("test"), wd)
  return wd
