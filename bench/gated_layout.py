"""Cost of keeping h and g as separate tensors in the gated layers (per-tensor AdamNormGrad).

Usage: python bench/gated_layout.py [--rows 1100] [--reps 30]
       python bench/gated_layout.py --steps rat,exact,gaussian [--n 10] [--rounds 8]

exvae's GatedDense stores the reference's four tensors (h/kernel, h/bias,
g/kernel, g/bias) and runs one matmul per kernel.  The default mode times the
forward and backward pass of the MLP VAE encoder (784-300-300 gated, the
layers a RAT step runs over about 1100 rows) against one fused ``hg`` kernel
stored as a single tensor, alternating them in one process so both see the
same machine load, and prints the ratio.

``--steps``: the whole training step of each named config (train_speed's
configs) with exvae's layer against :class:`ConcatGatedDense` (the same four
tensors, the kernels concatenated for ONE matmul per call): the loss and the
parameters after one step from the same state, then alternated timings (wall
and CPU per step).
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exvae.nets.gated import GatedDense, LinearParams, he_init


class FusedGatedDense(nn.Module):
  """The earlier layout: one (in, 2F) kernel ``hg``."""

  features: int

  @nn.compact
  def __call__(self, x):
    hg = nn.Dense(2 * self.features, kernel_init=he_init, name="hg")(x)
    h, g = jnp.split(hg, 2, axis=-1)
    return h * jax.nn.sigmoid(g)


class ConcatGatedDense(GatedDense):
  """exvae's four tensors, the kernels concatenated for one (in, 2F) matmul per call."""

  @nn.compact
  def __call__(self, x):
    f, n_in = self.features, x.shape[-1]
    hk, hb = LinearParams((n_in, f), name="h")()
    gk, gb = LinearParams((n_in, f), name="g")()
    hg = x @ jnp.concatenate([hk, gk], axis=1) + jnp.concatenate([hb, gb])
    return hg[..., :f] * jax.nn.sigmoid(hg[..., f:])


def steps_ab(name: str, n: int, rounds: int) -> float:
  """The train step of config ``name`` with each layer; returns the CPU-time ratio concat/exvae."""
  from bench import train_speed as ts
  from exvae import train_lib
  from exvae.models import vae as vae_mod

  splits, _ = ts.load_splits()
  pool = jnp.asarray(splits.train_x)
  layers = {"concatenated": ConcatGatedDense, "separate": GatedDense}
  runs = {}
  try:
    for k, layer in layers.items():  # traced while the layer is patched in
      vae_mod.GatedDense = layer
      runs[k] = ts.prepare(ts.make_config(name), splits, pool)
      ts.time_steps(runs[k], pool, 1)
  finally:
    vae_mod.GatedDense = GatedDense
  s0 = jax.tree.map(jnp.copy, runs["separate"].state)
  out = {}
  for k, r in runs.items():
    st, m = train_lib.train_step(jax.tree.map(jnp.copy, s0), pool, r.perm, setup=r.setup)
    out[k] = (float(m["loss"]), st.params)
  d = ts._grad_diffs(out["concatenated"][1], out["separate"][1])[0]
  print(
    f"{name}: loss concatenated {out['concatenated'][0]:.6f}, separate "
    f"{out['separate'][0]:.6f}; parameters after one step: max rel. diff {d:.1e}"
  )
  for r in runs.values():
    r.state = jax.tree.map(jnp.copy, s0)
  wall, cpu = ts.alternate(
    {k: functools.partial(ts.time_steps, r, pool) for k, r in runs.items()}, rounds, n, flip=True
  )
  med = lambda v: float(np.median(v))
  for k in runs:
    print(
      f"{name} {k}: wall {med(wall[k]) * 1e3:.1f} ms/step, CPU {med(cpu[k]) * 1e3:.1f} "
      f"ms/step (medians of {rounds} alternated rounds of {n} steps)"
    )
  ratio = med(cpu["concatenated"]) / med(cpu["separate"])
  print(
    f"{name}: separate faster by wall {med(wall['concatenated']) / med(wall['separate']):.3f}x"
    f", CPU {ratio:.3f}x; load average {os.getloadavg()[0]:.2f}",
    flush=True,
  )
  return ratio


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
  ap.add_argument("--steps", default="", help="instead: the train steps of these configs")
  ap.add_argument("--n", type=int, default=10, help="--steps: steps per timed round")
  ap.add_argument("--rounds", type=int, default=8, help="--steps: alternated rounds")
  a = ap.parse_args()
  if a.steps:
    for name in a.steps.split(","):
      steps_ab(name, a.n, a.rounds)
    return
  runs = {
    "fused hg": timed_grad_fn(FusedGatedDense, a.rows),
    "separate h, g": timed_grad_fn(GatedDense, a.rows),
  }
  times = {k: [] for k in runs}
  for _ in range(a.reps):  # alternate: both layouts see the same load
    for k, r in runs.items():
      times[k].append(r())
  med = {k: float(np.median(v)) for k, v in times.items()}
  for k, v in med.items():
    print(f"{k:>14}: {v * 1e3:.2f} ms (median of {a.reps}, fwd+bwd, {a.rows} rows)")
  print(f"load average {os.getloadavg()[0]:.1f}")
  print(f"separate_over_fused={med['separate h, g'] / med['fused hg']:.3f}")


if __name__ == "__main__":
  main()
