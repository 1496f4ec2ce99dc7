"""Training speed: steps/s and seconds per MNIST-sized epoch for each prior.

Usage: python bench/train_speed.py [--configs rat,exact,gaussian,vampprior] [--steps 60]
                                   [--model vae|hvae|convhvae|pixelcnn]

Uses the genuine Fashion-MNIST if installed (50000 training images, batch 100,
500 steps per epoch), else random binary images of the same size (speed does
not depend on pixel values).  Prints seconds per epoch next to the targets of
issue 2 and the authors' PyTorch code measured on the same kind of 2-core CPU
(about 26 s per RAT epoch and 436 s per exact epoch).
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

TARGETS = {"rat": (9.0, 26.0), "exact": (145.0, 436.0)}


def make_config(name, model="vae"):
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = model
  if name == "rat":
    c.prior, c.exemplar.rat = "exemplar", True
  elif name == "exact":
    c.prior, c.exemplar.rat = "exemplar", False
  else:
    c.prior = name
  return c


def time_config(c, splits, pool, steps):
  """Times the train step of config ``c`` on ``splits``.

  One step compiles, then ``steps`` steps are timed; the prior's epoch-start
  refresh (the RAT cache re-encoding) is compiled, then timed once.

  Args:
    c: the run's config.
    splits: the data (only its sizes and binarisation matter for speed).
    pool: the training images on the device.
    steps: timed steps.

  Returns:
    dict: ``ms_per_step``, ``steps_per_s``, ``steps_per_epoch``, ``refresh_s``
    (one warm epoch-start refresh), ``epoch_s`` (steps_per_epoch steps plus the
    refresh), ``compile_s`` (first refresh and first step, compilation included).
  """
  setup = train_lib.make_setup(c, splits)
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  t0 = time.perf_counter()
  state = train_lib.refresh_step(state, pool, setup=setup)           # compile
  state, m = train_lib.train_step(state, pool, perm, setup=setup)    # compile
  jax.block_until_ready(m)
  t_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  state = train_lib.refresh_step(state, pool, setup=setup)
  jax.block_until_ready(state)
  t_refresh = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps
  refresh = t_refresh if c.prior == "exemplar" and c.exemplar.rat else 0.0
  return {"ms_per_step": dt * 1e3, "steps_per_s": 1.0 / dt,
          "steps_per_epoch": setup.steps_per_epoch, "refresh_s": t_refresh,
          "epoch_s": dt * setup.steps_per_epoch + refresh, "compile_s": t_compile,
          "loss": float(m["loss"])}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="rat,exact,gaussian,vampprior")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--model", default="vae", help="vae | hvae | convhvae | pixelcnn")
  args = ap.parse_args()
  try:
    splits = data.load("fashion_mnist")
    src = splits.source
  except data.DataNotFoundError:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(50000, 28, 28, 1)).astype(np.float32)
    splits = data.Splits("synthetic", x, None, x[:100], None, x[:100], None, True, "synthetic")
    src = "synthetic random images (Fashion-MNIST not installed)"
  print(f"model={args.model} device={jax.devices()[0].device_kind} backend={jax.default_backend()} "
        f"cpus={os.cpu_count()} data={src} N={splits.train_x.shape[0]}")
  pool = jnp.asarray(splits.train_x)
  for name in args.configs.split(","):
    r = time_config(make_config(name, args.model), splits, pool, args.steps)
    line = (f"{name:10s} {r['steps_per_s']:8.2f} steps/s  {r['ms_per_step']:8.1f} ms/step  "
            f"epoch={r['epoch_s']:7.1f} s (steps_per_epoch={r['steps_per_epoch']}, "
            f"epoch-start refresh {r['refresh_s']:.2f} s)")
    if name in TARGETS and args.model == "vae":
      target, torch = TARGETS[name]
      line += f"  target<={target:.0f} s  speedup_vs_pytorch={torch / r['epoch_s']:.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
  main()
