"""Cost of keeping h and g as separate tensors in the gated layers (per-tensor AdamNormGrad).

Usage: python bench/gated_layout.py [--rows 1100] [--reps 30]

exvae's GatedDense stores the reference's four tensors (h/kernel, h/bias,
g/kernel, g/bias) and concatenates the kernels for ONE matmul per call; the
earlier layout stored one fused ``hg`` kernel.  This times the forward and
backward pass of the MLP VAE encoder (784-300-300 gated, the layers a RAT
step runs over about 1100 rows) in both layouts, alternating them in one
process so both see the same machine load, and prints the ratio.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exvae.nets.gated import GatedDense, he_init


class FusedGatedDense(nn.Module):
  """The earlier layout: one (in, 2F) kernel ``hg``."""
  features: int

  @nn.compact
  def __call__(self, x):
    hg = nn.Dense(2 * self.features, kernel_init=he_init, name="hg")(x)
    h, g = jnp.split(hg, 2, axis=-1)
    return h * jax.nn.sigmoid(g)


class Encoder(nn.Module):
  layer: type
  widths: tuple = (300, 300)

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = self.layer(w)(x)
    return nn.Dense(40)(x)


def timed_grad_fn(layer, rows: int):
  model = Encoder(layer)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(rows, 784)).astype(np.float32))
  params = model.init(jax.random.PRNGKey(0), x)
  f = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
  jax.block_until_ready(f(params, x))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(f(params, x))
    return time.perf_counter() - t
  return run


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=1100)
  ap.add_argument("--reps", type=int, default=30)
  a = ap.parse_args()
  runs = {"fused hg": timed_grad_fn(FusedGatedDense, a.rows),
          "separate h, g": timed_grad_fn(GatedDense, a.rows)}
  times = {k: [] for k in runs}
  for _ in range(a.reps):                  # alternate: both layouts see the same load
    for k, r in runs.items():
      times[k].append(r())
  med = {k: float(np.median(v)) for k, v in times.items()}
  for k, v in med.items():
    print(f"{k:>14}: {v * 1e3:.2f} ms (median of {a.reps}, fwd+bwd, {a.rows} rows)")
  print(f"load average {os.getloadavg()[0]:.1f}")
  print(f"separate_over_fused={med['separate h, g'] / med['fused hg']:.3f}")


if __name__ == "__main__":
  main()
