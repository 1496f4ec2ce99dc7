"""Statistics of exvae's counter-based binarisation bits (exvae/rng.py) against NumPy's.

  python reference/binarize_rng_check.py [--steps 4000]

Draws the bits of four training images at many steps exactly as the training
step does (key fold_in(base, step), split, ``rng.bernoulli_rows``) and prints
the marginal frequencies at several probabilities, and the correlations
between pixel pairs of one image, between two images of one step, and between
consecutive steps of one image, beside the same figures for NumPy's generator
(independent bits give correlations with sd 1/sqrt(steps)).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from exvae import rng


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=4000)
  a = ap.parse_args(argv)
  if a.steps < 10:
    ap.error("--steps must be >= 10")
  t = a.steps
  base = jax.random.PRNGKey(0)

  def bits(step, ids, p):
    k_bin, _ = jax.random.split(jax.random.fold_in(base, step))  # as train_lib.train_batch
    return rng.bernoulli_rows(k_bin, p, ids)

  draw = jax.jit(jax.vmap(bits, in_axes=(0, None, None)))
  ids = jnp.array([0, 1, 2, 12345])
  b = np.asarray(draw(jnp.arange(t), ids, jnp.full((4, 784), 0.5)))  # (T, 4, 784)
  x, y = b[:, 0, :] - 0.5, b[:, 1, :] - 0.5
  z = (np.random.default_rng(0).random((t, 784)) < 0.5) - 0.5
  off = ~np.eye(784, dtype=bool)
  cx, cz = (x.T @ x / t / 0.25)[off], (z.T @ z / t / 0.25)[off]
  print(f"steps {t}; independent bits: correlation sd {1 / np.sqrt(t):.4f}")
  print(
    f"pixel pairs of one image:   exvae sd {cx.std():.4f} max|r| {np.abs(cx).max():.4f}   "
    f"numpy sd {cz.std():.4f} max|r| {np.abs(cz).max():.4f}"
  )
  cr = (x * y).mean(0) / 0.25
  print(f"two images, same step:      exvae mean {cr.mean():+.4f} sd {cr.std():.4f}")
  lag = (x[1:] * x[:-1]).mean(0) / 0.25
  print(f"one image, steps s and s+1: exvae mean {lag.mean():+.4f} sd {lag.std():.4f}")
  for p in (0.01, 0.1, 0.3, 0.5):
    m = np.asarray(draw(jnp.arange(t), ids, jnp.full((4, 784), p))).mean()
    print(
      f"p = {p:.2f}: frequency {m:.5f} (standard error {np.sqrt(p * (1 - p) / (t * 4 * 784)):.5f})"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
