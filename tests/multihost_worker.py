"""Worker for tests/test_multihost.py: a few data-parallel train steps in one of P processes.

Usage: python tests/multihost_worker.py <process_id> <num_processes> <port> <out.json>
(num_processes = 0: a plain single-process run for reference.)
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402

pid, nproc, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 0:
  from exvae import distributed
  distributed.initialize(f"localhost:{port}", nproc, pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import load_config  # noqa: E402
from exvae import distributed, train_lib  # noqa: E402

c = load_config("test", prior="exemplar")
splits = train_lib.load_data(c)
setup = train_lib.make_setup(c, splits)
n = splits.train_x.shape[0]
mesh = distributed.make_data_mesh(0)


def run():
  pool = distributed.replicate(jnp.asarray(splits.train_x), mesh)
  state = distributed.replicate(train_lib.init_state(c, setup, n), mesh)
  perm = distributed.replicate(jnp.asarray(train_lib.epoch_permutation(0, 0, n)), mesh)
  losses = []
  for _ in range(5):
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
    losses.append(float(m["loss"]))
  return state, losses


if mesh is None:
  state, losses = run()
else:
  with jax.set_mesh(mesh):
    state, losses = run()
params = jax.device_get(state.params)
if jax.process_index() == 0:
  with open(out_path, "w") as f:
    json.dump({"losses": losses, "num_devices": len(jax.devices()),
               "num_processes": jax.process_count(),
               "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]}, f)
