"""An exvae checkpoint's validation loss on the reference code's own validation images.

Usage: python reference/ref_val_loss.py --config=fashion_vae_exemplar_rat --workdir RUN [--params last|best]
       python reference/ref_val_loss.py --config=fashion_vae_exemplar_rat --ref_checkpoint CKPT.pth

The two codes binarise the 10000 validation images once each, with different
random draws (the authors' code: ``np.random.seed(777)``, then
``np.random.binomial(1, x_val)`` on the last 10000 training images / 255),
so their per-epoch validation losses differ by the binarisation as well as by
the models.  This scores exvae's parameters (the last ones by default, which
is what the reference's per-epoch validation loss uses) on exactly the
reference's validation images, with exvae's validation (one posterior sample
per image, the full bank of 50000 grey-level exemplars), so that the two
curves can be compared number for number.  Reads the run directory only.

``--ref_checkpoint`` scores a checkpoint of the AUTHORS' code instead (its
weights mapped onto exvae's parameters as ``reference/ref_step_check.py`` maps
them; reading the .pth needs ``$EXVAE_REF_PYTHON``, the reference's venv),
so that both codes' models are measured by one and the same validation.
``--keys K`` repeats the one-sample validation with K noise draws and prints
their mean and spread (the metric's own noise).
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np


def reference_val_set(config) -> np.ndarray:
  """The reference's binarised Fashion-MNIST validation images, bit for bit.

  Their ``np.random.seed(777)`` draw on the last 10000 training images
  (``exvae.data.reference_binarize``, as ``--config.eval_binarize=reference``).

  Returns:
    (10000, 28, 28, 1) float32 binary images.
  """
  from exvae import data

  return data.load(
    "fashion_mnist", data_dir=config.data_dir or None, source="idx", eval_binarize="reference"
  ).val_x


def val_terms(params, setup, pool, xval: np.ndarray, config, key_index: int = 0) -> dict:
  """exvae's one-sample validation of ``params`` on ``xval`` (noise key ``7 + key_index``).

  Returns:
    ``train_lib.evaluate_split``'s per-image arrays (``elbo``, ``recon``, ``kl``); the
    validation loss is ``-elbo.mean()``.
  """
  from exvae import train_lib

  ctx = train_lib.eval_context(params, pool, jax.random.PRNGKey(config.eval.bank_seed), setup=setup)
  return train_lib.evaluate_split(
    params,
    setup,
    ctx,
    xval,
    jax.random.PRNGKey(7 + key_index),
    num_samples=1,
    max_queries=int(config.eval.max_queries),
  )


def load_reference_params(path: str, template: dict) -> dict:
  """exvae ``{"model", "prior"}`` parameters holding the authors' checkpoint ``path``."""
  from reference.ref_step_check import reference_params

  py = os.path.expanduser(os.environ.get("EXVAE_REF_PYTHON", ""))
  if not py or not os.access(py, os.X_OK):
    raise SystemExit(
      "ref_val_loss: set EXVAE_REF_PYTHON to the reference venv's python (torch reads the .pth)."
    )
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "w.npz")
    code = (
      "import sys, numpy, torch; sd = torch.load(sys.argv[1], map_location='cpu', "
      "weights_only=False)['state_dict']; numpy.savez(sys.argv[2], "
      "**{k: v.numpy() for k, v in sd.items()})"
    )
    subprocess.run([py, "-c", code, os.path.abspath(path), out], check=True)
    w = dict(np.load(out))
  return reference_params(w, template["model"])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="a shipped config's name")
  ap.add_argument("--workdir", default=None, help="an exvae run directory")
  ap.add_argument("--ref_checkpoint", default=None, help="a checkpoint of the authors' code")
  ap.add_argument("--params", default="last", choices=["last", "best"])
  ap.add_argument(
    "--keys", type=int, default=1, help="noise draws to average (first: key 7, exvae's validation)"
  )
  a = ap.parse_args(argv)
  if (a.workdir is None) == (a.ref_checkpoint is None):
    ap.error("give exactly one of --workdir and --ref_checkpoint")
  if a.keys < 1:
    ap.error(f"--keys must be >= 1, got {a.keys}")
  from exvae import checkpoints, config_registry, train_lib

  config = config_registry.get_config(a.config)
  splits = train_lib.load_data(config)
  if splits.name != "fashion_mnist":
    raise SystemExit("ref_val_loss: the reference's binarisation is reproduced for Fashion-MNIST.")
  xval = reference_val_set(config)
  pool, _ = train_lib.make_pool(config, splits, None)
  setup = train_lib.make_setup(config, splits)
  template = train_lib.init_state(config, setup, splits.train_x.shape[0])
  if a.ref_checkpoint:
    params = load_reference_params(a.ref_checkpoint, template.params)
    what = f"reference checkpoint {a.ref_checkpoint}"
  else:
    manager = checkpoints.Manager(
      os.path.join(a.workdir, "checkpoints"), create=False, read_only=True
    )
    state, best, meta = manager.restore_latest(template, template.params)
    params = state.params if a.params == "last" else best
    what = f"epoch={int(state.step) // setup.steps_per_epoch} params={a.params}"
  losses = []
  for i in range(a.keys):
    res = val_terms(params, setup, pool, xval, config, key_index=i)
    losses.append(float(-res["elbo"].mean()))
    if i == 0:
      first = res
  print(
    f"{what} val_loss_on_reference_binarisation={losses[0]:.3f} "
    f"(recon {first['recon'].mean():.3f}, kl {first['kl'].mean():.3f})"
  )
  if a.keys > 1:
    print(
      f"over {a.keys} noise draws: mean {np.mean(losses):.3f}, sd {np.std(losses, ddof=1):.3f}, "
      f"min {min(losses):.3f}, max {max(losses):.3f}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
