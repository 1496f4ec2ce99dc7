"""Bank-sharded kernels on 4 simulated CPU devices vs the single-device kernels.

XLA_FLAGS must be set before jax initialises its backends, and pytest may already
have imported jax for other test modules, so the checks run in a fresh subprocess
(the script below) and this test asserts on its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json
import chex
import jax
import jax.numpy as jnp
import numpy as np
from exvae.kernels import log_kernel_sum
from exvae.parallel import make_mesh, sharded_log_kernel_sum

out = {"num_devices": len(jax.devices())}
rng = np.random.default_rng(0)
b, n, d = 6, 37, 5  # n not divisible by 4: exercises the padding
z = rng.normal(size=(b, d)).astype(np.float32)
bank = rng.normal(size=(n, d)).astype(np.float32)
mask = rng.random(n) > 0.2
ids = np.arange(n, dtype=np.int32)
qids = np.array([0, 3, -1, 36, 8, 9], np.int32)
kw = dict(bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=4)
w = jnp.asarray(rng.normal(size=b).astype(np.float32))

for ndev in (4, 1):
    mesh = make_mesh(ndev)
    tag = f"d{ndev}"
    a = sharded_log_kernel_sum(mesh, z, bank, -0.2, **kw)
    r = log_kernel_sum(z, bank, -0.2, **kw)
    out[tag + "_lse_err"] = float(jnp.max(jnp.abs(a[0] - r[0])))
    out[tag + "_count_eq"] = bool(jnp.all(a[1] == r[1]))

    def loss(fn):
        return lambda z, bk, lv: jnp.sum(w * fn(z, bk, lv)[0])

    gs = jax.grad(loss(lambda z, bk, lv: sharded_log_kernel_sum(mesh, z, bk, lv, **kw)),
                  (0, 1, 2))(z, bank, jnp.float32(-0.2))
    gr = jax.grad(loss(lambda z, bk, lv: log_kernel_sum(z, bk, lv, **kw)),
                  (0, 1, 2))(z, bank, jnp.float32(-0.2))
    out[tag + "_grad_err"] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(gs, gr))

# All-masked rows stay -inf with zero (finite) gradients through the collectives.
mesh = make_mesh(4)
m0 = np.zeros(n, bool)
lse, _ = sharded_log_kernel_sum(mesh, z, bank, 0.0, bank_mask=m0)
out["masked_all_neginf"] = bool(jnp.all(jnp.isneginf(lse)))
g = jax.grad(lambda z: jnp.sum(jnp.where(jnp.isfinite(
    sharded_log_kernel_sum(mesh, z, bank, 0.0, bank_mask=m0)[0]), 1.0, 0.0)))(z)
out["masked_grad_finite"] = bool(jnp.all(jnp.isfinite(g)))

# Used inside an outer jit + no retracing with equal shapes.
@jax.jit
@chex.assert_max_traces(n=1)
def step(z, bk, lv):
    return jnp.sum(sharded_log_kernel_sum(mesh, z, bk, lv)[0])

for t in range(3):
    step(z + t, bank, jnp.float32(0.1 * t))
out["no_retrace"] = True
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
  root = Path(__file__).resolve().parents[1]
  # A real file, not `python -c`: chex.assert_max_traces inspects the source.
  script = tmp_path_factory.mktemp("sharded") / "sharded_check.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ)
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
    [sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_four_devices_visible(sharded_results):
  assert sharded_results["num_devices"] == 4


@pytest.mark.parametrize("ndev", [4, 1])
def test_sharded_values_and_grads_match(sharded_results, ndev):
  r = sharded_results
  assert r[f"d{ndev}_lse_err"] < 1e-5
  assert r[f"d{ndev}_count_eq"]
  assert r[f"d{ndev}_grad_err"] < 1e-5


def test_sharded_edge_cases(sharded_results):
  r = sharded_results
  assert r["masked_all_neginf"] and r["masked_grad_finite"]
  assert r["no_retrace"]
