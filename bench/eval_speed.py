"""IWAE evaluation throughput: test points per second at S = 5000 against N = 50000 exemplars.

Usage: python bench/eval_speed.py [--points 20] [--samples 5000] [--prior exemplar]

Times `evaluation.evaluate_split` (the code eval.py runs) on an untrained MNIST-
sized model: the cost does not depend on the parameter values.  Prints test
points per second and the projected time for the 10000-image test set.
The comparison with the authors' PyTorch code is made side by side, in one
run on one machine, by bench/vs_reference.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from exvae import data, evaluation, train_lib
from exvae.config_base import base_config


def eval_throughput(c, num_train=50000, points=20, samples=5000, max_queries=5000):
  """Times `evaluation.evaluate_split` (what eval.py runs) on an untrained model.

  Random images: the cost does not depend on pixel or parameter values.

  Args:
    c: config (model, prior, sizes).
    num_train: N, the training images that form the evaluation bank.
    points: timed test points.
    samples: S importance samples per point.
    max_queries: latent codes scored per call.

  Returns:
    dict: ``bank_build_s`` (encoding the bank, compilation included),
    ``s_per_point``, ``test_points_per_s``, ``projected_10000_points_s``,
    ``mean_log_px`` (finite: the evaluation ran).
  """
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(num_train, 28, 28, 1)).astype(np.float32)
  test = (rng.uniform(size=(points, 28, 28, 1)) < 0.3).astype(np.float32)
  splits = data.Splits("synthetic", x, None, test, None, test, None, True, "synthetic")
  setup = train_lib.make_setup(c, splits)
  state = train_lib.init_state(c, setup, num_train)
  pool = jnp.asarray(x)
  t0 = time.perf_counter()
  ctx = evaluation.eval_context(state.params, pool, jax.random.PRNGKey(0), setup=setup)
  jax.block_until_ready(ctx)
  t_bank = time.perf_counter() - t0
  # Warm-up (compile) on one call's worth of points (evaluate_split's batch), then time.
  batch = max(1, min(points, max_queries // min(samples, max_queries)))
  evaluation.evaluate_split(
    state.params, setup, ctx, test[:batch], jax.random.PRNGKey(1), samples, max_queries
  )
  t0 = time.perf_counter()
  res = evaluation.evaluate_split(
    state.params, setup, ctx, test, jax.random.PRNGKey(2), samples, max_queries
  )
  dt = time.perf_counter() - t0
  return {
    "bank_build_s": t_bank,
    "s_per_point": dt / points,
    "test_points_per_s": points / dt,
    "projected_10000_points_s": 10000 * dt / points,
    "mean_log_px": float(np.mean(res["log_px_iwae"])),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--points", type=int, default=20)
  ap.add_argument("--samples", type=int, default=5000)
  ap.add_argument("--prior", default="exemplar")
  ap.add_argument("--max_queries", type=int, default=5000)
  args = ap.parse_args()
  c = base_config()
  c.prior = args.prior
  r = eval_throughput(c, 50000, args.points, args.samples, args.max_queries)
  pps = r["test_points_per_s"]
  print(
    f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} prior={args.prior} "
    f"N=50000 S={args.samples} bank_build={r['bank_build_s']:.2f}s (incl. compile)"
  )
  print(
    f"test_points_per_s={pps:.3f} s_per_point={r['s_per_point']:.4f} "
    f"projected_10000_points_min={r['projected_10000_points_s'] / 60:.1f}"
  )


if __name__ == "__main__":
  main()
