"""Data-parallel training on 4 simulated CPU devices equals single-device training.

Each check runs in a fresh interpreter because XLA_FLAGS must be set before
JAX initialises its CPU backend.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
import jax, numpy as np
from conftest import load_config, run_train_steps
out = {{}}
for name, ndev, pool in (("single", 1, "auto"), ("mesh", 4, "replicated"), ("split", 4, "sharded")):
    c = load_config("test", prior={prior!r}, num_devices=ndev, pool_sharding=pool,
                    **{{"exemplar.rat": {rat}}}, **{over!r})
    def hlo(text, name=name):
        out["allreduce_" + name] = "all-reduce" in text
        # Does any collective move the whole (padded, 1300-row) pool?
        out["pool_moved_" + name] = any(("all-gather" in l or "all-to-all" in l) and "[1300," in l
                                        for l in text.splitlines())
    state, losses = run_train_steps(c, ndev, on_compiled=hlo)
    out[name] = dict(losses=losses, n_dev=len(jax.devices()),
                     params=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)])
from exvae import distributed, train_lib
c = load_config("test", num_devices=4, pool_sharding="sharded")
with distributed.data_mesh(4) as mesh:
    pool, sharded = train_lib.make_pool(c, train_lib.load_data(c), mesh)
    out["split_rows"] = [int(s.data.shape[0]) for s in pool.addressable_shards]
print("RESULT" + json.dumps(out))
"""


IWAE_DREG = {"objective": "iwae", "objective_samples": 3, "gradient_estimator": "dreg"}


@pytest.mark.slow
@pytest.mark.parametrize(
  "prior,rat,over",
  [
    ("exemplar", False, {}),
    ("exemplar", True, {}),
    ("vampprior", False, {}),
    ("exemplar", True, IWAE_DREG),
  ],
)
def test_four_device_training_matches_single_device(prior, rat, over):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-c", SCRIPT.format(root=ROOT, prior=prior, rat=rat, over=over)],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.split("RESULT", 1)[1])
  assert res["mesh"]["n_dev"] == 4
  # The 4-device step is really data parallel: gradients are all-reduced.
  assert res["allreduce_mesh"] and not res["allreduce_single"]
  # The split pool: 1297 images padded to 1300, a quarter on each device, and
  # the compiled step never gathers the whole pool onto a device.
  assert res["split_rows"] == [325] * 4
  assert not res["pool_moved_split"]
  import numpy as np

  # A pool split along N (each device holding a quarter of the images) gives
  # the same steps as a replicated pool and as one device.
  for name in ("mesh", "split"):
    np.testing.assert_allclose(res[name]["losses"], res["single"]["losses"], rtol=2e-4)
    for a, b in zip(res[name]["params"], res["single"]["params"]):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_from_four_devices_resumes_on_one(tmp_path):
  """A run checkpointed on 4 devices resumes on 1 device and tracks a 1-device run."""
  import chex
  from conftest import load_config
  from exvae import checkpoints, train_lib

  wd = str(tmp_path / "four")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--config={ROOT}/configs/test.py",
      f"--workdir={wd}",
      "--config.max_steps=30",
      "--config.num_devices=4",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  c = load_config("test", max_steps=60, num_devices=1)
  train_lib.train_and_evaluate(c, wd)  # resume here, on one device
  ref = str(tmp_path / "one")
  train_lib.train_and_evaluate(c, ref)
  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  t = train_lib.init_state(c, setup, splits.train_x.shape[0])
  s4, _, _ = checkpoints.Manager(os.path.join(wd, "checkpoints")).restore_latest(t, t.params)
  s1, _, _ = checkpoints.Manager(os.path.join(ref, "checkpoints")).restore_latest(t, t.params)
  assert int(s4.step) == int(s1.step) == 60
  chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_eval_with_bank_sharded_over_four_devices_matches_one(tmp_path):
  """eval.py on 4 devices (bank split along N, shard_map reduction) equals 1 device."""
  import json as _json
  from conftest import load_config
  from exvae import eval_lib, train_lib

  wd = str(tmp_path / "run")
  c = load_config("test", max_steps=64)
  train_lib.train_and_evaluate(c, wd)
  one = eval_lib.evaluate(c, wd)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  # The training images replicated, then split along N (the bank encoded shard by shard).
  for pool in ("replicated", "sharded"):
    r = subprocess.run(
      [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        f"--config={ROOT}/configs/test.py",
        f"--workdir={wd}",
        "--config.num_devices=4",
        f"--config.pool_sharding={pool}",
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    four = _json.load(open(os.path.join(wd, "eval_metrics.json")))
    assert four["num_devices"] == 4 and one["num_devices"] == 1
    for k in ("test_nll", "test_elbo", "test_kl"):
      assert abs(four[k] - one[k]) < 1e-3 * max(1.0, abs(one[k])), (pool, k, four[k], one[k])
