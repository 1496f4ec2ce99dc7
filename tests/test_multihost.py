"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives) vs one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  ref = tmp_path / "ref.json"
  r = subprocess.run(
    [sys.executable, WORKER, "0", "0", "0", str(ref)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  port = str(_free_port())
  out = tmp_path / "multi.json"
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, str(i), "2", port, str(out)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = json.loads(ref.read_text()), json.loads(out.read_text())
  assert a["num_processes"] == 1 and b["num_processes"] == 2 and b["num_devices"] == 2
  # Each host holds only its half of the training images (1297 padded to 1298).
  assert b["pool_sharded"] and not a["pool_sharded"]
  assert b["local_rows"] == 649 and b["host_range"] == [0, 649]
  assert a["local_rows"] == 1297
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=2e-4)
  for x, y in zip(b["params"], a["params"]):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
