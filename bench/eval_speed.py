"""IWAE evaluation throughput: test points per second at S = 5000 against N = 50000 exemplars.

Usage: python bench/eval_speed.py [--points 20] [--samples 5000] [--prior exemplar]

Times `train_lib.evaluate_split` (the code eval.py runs) on an untrained MNIST-
sized model: the cost does not depend on the parameter values.  Prints test
points per second and the projected time for the 10000-image test set; the
authors' PyTorch code needs about 5.7 s per test point on a 2-core CPU
(about 16 hours for the test set).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from exvae import data, train_lib
from exvae.config_base import base_config

TORCH_S_PER_POINT = 5.7


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--points", type=int, default=20)
  ap.add_argument("--samples", type=int, default=5000)
  ap.add_argument("--prior", default="exemplar")
  ap.add_argument("--max_queries", type=int, default=5000)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(50000, 28, 28, 1)).astype(np.float32)
  test = (rng.uniform(size=(args.points, 28, 28, 1)) < 0.3).astype(np.float32)
  splits = data.Splits("synthetic", x, None, test, None, test, None, True, "synthetic")
  c = base_config()
  c.prior = args.prior
  setup = train_lib.make_setup(c, splits)
  state = train_lib.init_state(c, setup, 50000)
  pool = jnp.asarray(x)
  t0 = time.perf_counter()
  ctx = train_lib.eval_context(state.params, pool, jax.random.PRNGKey(0), setup=setup)
  jax.block_until_ready(ctx)
  t_bank = time.perf_counter() - t0
  # Warm-up (compile) on one point, then time.
  train_lib.evaluate_split(state.params, setup, ctx, test[:1], jax.random.PRNGKey(1),
                           args.samples, args.max_queries)
  t0 = time.perf_counter()
  train_lib.evaluate_split(state.params, setup, ctx, test, jax.random.PRNGKey(2),
                           args.samples, args.max_queries)
  dt = time.perf_counter() - t0
  pps = args.points / dt
  print(f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} prior={args.prior} "
        f"N=50000 S={args.samples} bank_build={t_bank:.2f}s (incl. compile)")
  print(f"test_points_per_s={pps:.3f} s_per_point={dt / args.points:.4f} "
        f"projected_10000_points_min={10000 / pps / 60:.1f} "
        f"speedup_vs_pytorch={TORCH_S_PER_POINT * pps:.1f}x")


if __name__ == "__main__":
  main()
