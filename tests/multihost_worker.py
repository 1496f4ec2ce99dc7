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

import numpy as np  # noqa: E402

from conftest import load_config, run_train_steps  # noqa: E402

c = load_config("test", prior="exemplar")
state, losses = run_train_steps(c, 0)
params = jax.device_get(state.params)
# The pool layout this process got (pool_sharding 'auto': split when several processes).
from exvae import distributed, train_lib  # noqa: E402

with distributed.data_mesh(0) as mesh:
  pool, sharded = train_lib.make_pool(c, train_lib.load_data(c), mesh)
  local_rows = sum(int(s.data.shape[0]) for s in pool.addressable_shards)
  host_range = (
    list(distributed.pool_rows_of_this_host(1297, mesh)) if mesh is not None else [0, 1297]
  )
if jax.process_index() == 0:
  with open(out_path, "w") as f:
    json.dump(
      {
        "losses": losses,
        "num_devices": len(jax.devices()),
        "num_processes": jax.process_count(),
        "pool_sharded": sharded,
        "local_rows": local_rows,
        "host_range": host_range,
        "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)],
      },
      f,
    )
