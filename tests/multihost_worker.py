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

state, losses = run_train_steps(load_config("test", prior="exemplar"), 0)
params = jax.device_get(state.params)
if jax.process_index() == 0:
  with open(out_path, "w") as f:
    json.dump({"losses": losses, "num_devices": len(jax.devices()),
               "num_processes": jax.process_count(),
               "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]}, f)
