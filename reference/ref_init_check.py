"""exvae's fresh initialisation against the authors' code's, tensor by tensor, over seeds.

  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python reference/ref_init_check.py [--seeds 20] [--model vae|hvae]

The reference initialises every ``nn.Linear`` weight with its ``he_init``
(normal, sd sqrt(2 / fan_in)), keeps PyTorch's default biases
(U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and draws the exemplar prior's log-variance
from ``torch.randn(1)``. This builds the reference's RAT model (their
``VAE(args)``, through ``../shared/reference/driver.py``) for ``--seeds`` torch
seeds and exvae's for as many seeds, maps the tensors onto each other
(``reference/ref_step_check.param_map``) and prints, per tensor, the mean and sd
over all entries and seeds of both codes, the sd ratio, and a two-sample
Kolmogorov-Smirnov p-value on (a subsample of) the entries. The last line is
``max_sd_ratio_dev=... min_ks_p=...`` over the network tensors. It needs the
reference installed (see bench/vs_reference.py); it is not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_side(out_path: str, driver_path: str, seeds: int, model_kind: str = "vae") -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(driver_path)))
  sys.path.insert(0, ROOT)
  import driver  # noqa: E402  (puts the shim and the authors' tree on the path)
  import torch
  from reference.ref_step_check import MODELS

  argv = driver.their_argv("rat", seed=0, extra=["--model_name", MODELS[model_kind]["model_name"]])
  args, *_, model, _ = driver.build(argv, 1)
  cls = type(model)
  out: dict[str, list] = {}
  for s in range(seeds):
    torch.manual_seed(s)
    m = cls(args)  # their constructor: he_initializer() included
    for k, v in m.state_dict().items():
      out.setdefault(k, []).append(v.detach().numpy().ravel().copy())
  np.savez(out_path, **{k: np.stack(v) for k, v in out.items()})


def exvae_side(seeds: int, model_kind: str = "vae") -> dict[str, np.ndarray]:
  """exvae's fresh parameters for seeds 0..seeds-1, under the reference's tensor names."""
  sys.path.insert(0, ROOT)
  import jax
  from reference.ref_step_check import MODELS, _node, param_map
  from exvae import config_registry, train_lib

  config = config_registry.get_config(MODELS[model_kind]["config"])
  config.progress = False
  splits = train_lib.load_data(config)
  setup = train_lib.make_setup(config, splits)  # does not depend on the seed
  out: dict[str, list] = {}
  for s in range(seeds):
    config.seed = s
    params = jax.tree.map(
      np.asarray, train_lib.init_state(config, setup, splits.train_x.shape[0]).params
    )
    for path, name in param_map(model_kind).items():
      node = _node(params["model"], path)
      out.setdefault(f"{name}.weight", []).append(node["kernel"].T.ravel())
      out.setdefault(f"{name}.bias", []).append(node["bias"].ravel())
    out.setdefault("prior_log_variance", []).append(np.ravel(params["prior"]["log_var"]))
  return {k: np.stack(v) for k, v in out.items()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--side", default="exvae", choices=("exvae", "torch"))
  ap.add_argument("--out", default=None, help="(internal) where the torch side writes")
  ap.add_argument("--driver", default=None, help="(internal) path of driver.py")
  ap.add_argument("--seeds", type=int, default=20)
  ap.add_argument(
    "--model",
    default="vae",
    choices=("vae", "hvae"),
    help="the MLP VAE or the two-level HVAE (reference/ref_step_check.MODELS)",
  )
  a = ap.parse_args(argv)
  if a.seeds < 2:
    ap.error("--seeds must be >= 2")
  if a.side == "torch":
    torch_side(a.out, a.driver, a.seeds, a.model)
    return 0

  sys.path.insert(0, ROOT)
  from scipy import stats

  from bench.vs_reference import require_reference

  py, src, drv = require_reference()
  out = os.path.join(tempfile.mkdtemp(prefix="exvae_ref_init_"), "ref.npz")
  proc = subprocess.run(
    [
      py,
      "-u",
      os.path.abspath(__file__),
      "--side",
      "torch",
      "--out",
      out,
      "--driver",
      drv,
      "--seeds",
      str(a.seeds),
      "--model",
      a.model,
    ],
    env=dict(os.environ, EXVAE_REF_SRC=src),
    capture_output=True,
    text=True,
  )
  if proc.returncode != 0:
    print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    print(f"the reference's side failed (exit {proc.returncode})", file=sys.stderr)
    return 1
  ref = np.load(out)
  ex = exvae_side(a.seeds, a.model)
  if sorted(ref.files) != sorted(ex):
    print(
      f"tensor names differ: reference {sorted(ref.files)}, exvae {sorted(ex)}", file=sys.stderr
    )
    return 1
  rng = np.random.default_rng(0)
  print(f"model {a.model}; {a.seeds} seeds each; mean and sd over all entries and seeds")
  print(
    f"{'tensor':26s} {'ref mean':>9s} {'exvae':>9s} {'ref sd':>8s} {'exvae':>8s} {'ratio':>6s} {'KS p':>6s}"
  )
  devs, ps = [], []
  for k in sorted(ref.files):
    r, e = ref[k].ravel(), ex[k].ravel()
    if r.shape != e.shape:
      print(f"{k}: shapes differ, reference {ref[k].shape}, exvae {ex[k].shape}", file=sys.stderr)
      return 1
    take = min(r.size, 20000)  # KS on a subsample keeps it fast
    p = stats.ks_2samp(
      rng.choice(r, take, replace=False), rng.choice(e, take, replace=False)
    ).pvalue
    ratio = e.std() / r.std()
    print(
      f"{k:26s} {r.mean():9.4f} {e.mean():9.4f} {r.std():8.4f} {e.std():8.4f} {ratio:6.3f} {p:6.3f}"
    )
    if k != "prior_log_variance":  # one value per seed: too few for a ratio bound
      devs.append(abs(ratio - 1.0))
      ps.append(p)
  print(f"max_sd_ratio_dev={max(devs):.4f} min_ks_p={min(ps):.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
