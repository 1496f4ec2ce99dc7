"""An exvae checkpoint's validation loss on the reference code's own validation images.

Usage: python scripts/ref_val_loss.py --config=fashion_vae_exemplar_rat --workdir RUN [--params last|best]

The two codes binarise the 10000 validation images once each, with different
random draws (the authors' code: ``np.random.seed(777)``, then
``np.random.binomial(1, x_val)`` on the last 10000 training images / 255),
so their per-epoch validation losses differ by the binarisation as well as by
the models.  This scores exvae's parameters (the last ones by default, which
is what the reference's per-epoch validation loss uses) on exactly the
reference's validation images, with exvae's validation (one posterior sample
per image, the full bank of 50000 grey-level exemplars), so that the two
curves can be compared number for number.  Reads the run directory only.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np


def reference_val_images(train_x_grey: np.ndarray, val_size: int = 10000) -> np.ndarray:
  """The reference's binarised validation set, bit for bit.

  Args:
    train_x_grey: (60000, 28, 28, 1) official training images in [0, 1] (uint8 / 255).
    val_size: the last ``val_size`` images validate.

  Returns:
    (val_size, 28, 28, 1) float32 binary images, drawn as the reference draws them.
  """
  x_val = train_x_grey[-val_size:].reshape(val_size, -1).astype(np.float64)
  np.random.seed(777)                       # base_load_data.binarize: val first, then test
  x_val = np.random.binomial(1, x_val)
  return x_val.reshape((val_size,) + train_x_grey.shape[1:]).astype(np.float32)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="a shipped config's name")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--params", default="last", choices=["last", "best"])
  a = ap.parse_args(argv)
  from exvae import checkpoints, config_registry, data, train_lib
  config = config_registry.get_config(a.config)
  splits = train_lib.load_data(config)
  if splits.name != "fashion_mnist":
    raise SystemExit("ref_val_loss: the reference's binarisation is reproduced for Fashion-MNIST.")
  found = data.find_idx_dir("fashion_mnist", config.data_dir or data.DEFAULT_IDX_DIRS["fashion_mnist"])
  if found is None:
    raise SystemExit("ref_val_loss: Fashion-MNIST IDX files not found.")
  images = data.load_idx_dataset("fashion_mnist", found[0], found[1])[0]
  full = (images.astype(np.float64) / 255.0)[..., None]
  xval = reference_val_images(full)
  pool, _ = train_lib.make_pool(config, splits, None)
  setup = train_lib.make_setup(config, splits)
  template = train_lib.init_state(config, setup, splits.train_x.shape[0])
  manager = checkpoints.Manager(os.path.join(a.workdir, "checkpoints"), create=False,
                                read_only=True)
  state, best, meta = manager.restore_latest(template, template.params)
  params = state.params if a.params == "last" else best
  ctx = train_lib.eval_context(params, pool, jax.random.PRNGKey(config.eval.bank_seed),
                               setup=setup)
  res = train_lib.evaluate_split(params, setup, ctx, xval, jax.random.PRNGKey(7), num_samples=1,
                                 max_queries=int(config.eval.max_queries))
  epoch = int(state.step) // setup.steps_per_epoch
  print(f"epoch={epoch} params={a.params} val_loss_on_reference_binarisation="
        f"{-res['elbo'].mean():.3f} (recon {res['recon'].mean():.3f}, kl {res['kl'].mean():.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
