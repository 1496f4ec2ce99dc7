"""Learning per epoch from one shared state: exvae and the authors' code continue the same checkpoint.

  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python reference/ref_continue.py --ref_checkpoint RUN/checkpoint_last.pth \\
          --epochs 8 --exvae_seeds 100 101 102 --ref_seeds 100 101 --out DIR

Seeds trained from scratch for 52 epochs differ by their whole random
trajectory (sd 0.1-0.2 nats), so a small per-epoch difference in how fast the
two codes learn needs many of them to see.  Here both codes start from ONE
state of the authors' code -- its weights, the prior variance and
AdamNormGrad's moments and step count at the end of epoch E -- and train
epochs E+1 .. E+N with their own randomness:

* exvae: the state mapped onto its parameters and optax state (the mapping
  ``reference/ref_step_check.py`` checks to float32), then its own epoch loop
  (permutation, epoch-start cache refresh, jitted ``train_step``) with base
  key ``--exvae_seeds``;
* the reference: THEIR outer loop (``driver.py train``) resumed from the same
  checkpoint (``epoch`` set to E + 1, so it does not repeat epoch E), with
  ``--seed`` ``--ref_seeds`` for its draws.

After each epoch exvae's parameters are scored on the reference's validation
images with exvae's validation (``reference/ref_val_loss.py``); the reference's
per-epoch loss is its own ``evaluate_loss`` (the two scorers agree to 0.02-0.04
nats on the same weights), and its final weights are also scored with
exvae's validation, so that the last column compares both codes with one
scorer.  Writes ``DIR/summary.json`` and prints one table.  Reads the
checkpoint only; it is not a test.

``--ref_fresh_seed S`` starts instead from the reference's FRESH initialisation
with torch seed S (their ``VAE(args)`` after ``driver.build`` seeds; zero Adam
moments, step 0): exvae trains from those weights with its own randomness, and
the reference trains from scratch with ``--seed S``, whose initialisation is
the same one.  Each such pair shares its start, so the difference between the
codes over the first epochs is measured without the seed-to-seed spread of
the initialisation (the prior log-variance's N(0, 1) draw alone moves the
epoch-12 validation loss by several nats).

  python reference/ref_continue.py --ref_fresh_seed 20 --epochs 12 --exvae_seeds 20 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs under the reference's python: the checkpoint's tensors and optimiser
# state as NumPy, by parameter name (torch's optimiser state is keyed by the
# parameters' order in model.parameters(), which is named_parameters' order).
_DUMP = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[3]); import driver
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
_, _, _, _, model, _ = driver.build(driver.their_argv('rat'), 1)
names = [n for n, _ in model.named_parameters()]
out = {f'w/{k}': v.numpy() for k, v in ck['state_dict'].items()}
st = ck['optimizer']['state']
order = ck['optimizer']['param_groups'][0]['params']
assert len(order) == len(names), (len(order), len(names))
for name, idx in zip(names, order):
    s = st[idx]
    out[f'm/{name}'] = s['exp_avg'].numpy(); out[f'v/{name}'] = s['exp_avg_sq'].numpy()
    out[f'step/{name}'] = np.float64(float(s['step']))
np.savez(sys.argv[2], **out)
"""

# Runs under the reference's python: their fresh model for one torch seed, with
# the state a fresh AdamNormGrad would have (zero moments, step 0).
_DUMP_FRESH = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[3]); import driver
_, _, _, _, model, _ = driver.build(driver.their_argv('rat', seed=int(sys.argv[1])), 1)
out = {f'w/{k}': v.detach().numpy() for k, v in model.state_dict().items()}
for name, p in model.named_parameters():
    out[f'm/{name}'] = np.zeros(tuple(p.shape), np.float32)
    out[f'v/{name}'] = np.zeros(tuple(p.shape), np.float32)
    out[f'step/{name}'] = np.float64(0)
np.savez(sys.argv[2], **out)
"""

# Runs under the reference's python: the checkpoint to resume from, with the
# next epoch E + 1 (from the Adam step count: the driver's checkpoint_last.pth
# counts the epochs of its own process only) and a fresh early-stopping record
# (it stores best_loss None, which their loop cannot compare).
_PATCH = r"""
import sys, math, torch
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
ck['epoch'] = int(sys.argv[3])
ck['best_loss'] = math.inf
ck['e'] = 0
torch.save(ck, sys.argv[2])
"""


def adam_state_from_reference(optimizer, w: dict, params, step: int):
  """exvae's AdamNormGrad state holding the reference's moments.

  Args:
    optimizer: ``optim.make_optimizer``'s AdamNormGrad chain.
    w: ``m/<name>``, ``v/<name>`` arrays of the reference's parameters
      (``exp_avg``, ``exp_avg_sq``), as written by the dump above.
    params: exvae ``{"model", "prior"}`` parameters (structure only).
    step: the reference's Adam step count (the same for every tensor).

  Returns:
    The chain's state with the moments and step count in its Adam part.
  """
  import jax.numpy as jnp
  import optax
  from reference.ref_step_check import reference_params

  fresh = optimizer.init(params)
  adam = [i for i, s in enumerate(fresh) if isinstance(s, optax.ScaleByAdamState)]
  if len(adam) != 1:
    raise ValueError("the optimiser is not AdamNormGrad (no single Adam state in its chain)")
  mu = reference_params(w, params["model"], prefix="m/")
  nu = reference_params(w, params["model"], prefix="v/")
  state = list(fresh)  # optax.chain's state is a plain tuple
  state[adam[0]] = optax.ScaleByAdamState(count=jnp.asarray(step, jnp.int32), mu=mu, nu=nu)
  return tuple(state)


def _ref_val(py: str, path: str) -> list[float]:
  """The reference's per-epoch validation losses (their ``vae.val_loss`` list)."""
  code = (
    "import sys, torch; print(' '.join(repr(float(v)) for v in "
    "torch.load(sys.argv[1], weights_only=False)))"
  )
  out = subprocess.run([py, "-c", code, path], check=True, capture_output=True, text=True)
  return [float(v) for v in out.stdout.split()]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  start = ap.add_mutually_exclusive_group(required=True)
  start.add_argument(
    "--ref_checkpoint",
    help="a checkpoint of the authors' code with its optimiser state "
    "(driver.py's checkpoint_last.pth or their checkpoint.pth)",
  )
  start.add_argument(
    "--ref_fresh_seed",
    type=int,
    help="start from the reference's fresh initialisation with this torch seed",
  )
  ap.add_argument("--epochs", type=int, default=8, help="epochs to continue")
  ap.add_argument("--exvae_seeds", type=int, nargs="*", default=[100, 101, 102])
  ap.add_argument(
    "--ref_seeds",
    type=int,
    nargs="*",
    default=None,
    help="the reference's seeds (default 100 101; with --ref_fresh_seed S only S, "
    "the seed of the shared initialisation)",
  )
  ap.add_argument("--threads", type=int, default=2, help="the reference's torch threads")
  ap.add_argument(
    "--out", required=True, help="a new directory for the reference runs and summary.json"
  )
  a = ap.parse_args(argv)
  if a.epochs < 1:
    ap.error(f"--epochs must be >= 1, got {a.epochs}")
  fresh = a.ref_fresh_seed is not None
  if a.ref_seeds is None:
    a.ref_seeds = [a.ref_fresh_seed] if fresh else [100, 101]
  if fresh and any(s != a.ref_fresh_seed for s in a.ref_seeds):
    ap.error(
      f"with --ref_fresh_seed {a.ref_fresh_seed} the reference can only run with that "
      f"seed (its initialisation is the shared start), got --ref_seeds {a.ref_seeds}"
    )
  if not a.exvae_seeds and not a.ref_seeds:
    ap.error("give at least one of --exvae_seeds and --ref_seeds")
  ckpt = None
  if not fresh:
    ckpt = os.path.abspath(os.path.expanduser(a.ref_checkpoint))
    if not os.path.isfile(ckpt):
      ap.error(f"--ref_checkpoint {ckpt} is not a file")
  from bench.vs_reference import require_reference

  py, src, drv = require_reference()
  env = dict(os.environ, EXVAE_REF_SRC=src)
  out_dir = os.path.abspath(os.path.expanduser(a.out))
  os.makedirs(out_dir, exist_ok=True)

  import jax.numpy as jnp
  from configs import fashion_vae_exemplar_rat
  from exvae import train_lib
  from reference.ref_step_check import reference_params
  from reference.ref_val_loss import load_reference_params, reference_val_set, val_terms

  with tempfile.TemporaryDirectory() as tmp:
    dump = os.path.join(tmp, "ck.npz")
    subprocess.run(
      [
        py,
        "-c",
        _DUMP_FRESH if fresh else _DUMP,
        str(a.ref_fresh_seed) if fresh else ckpt,
        dump,
        os.path.dirname(drv),
      ],
      check=True,
      env=env,
      capture_output=True,
    )
    w = dict(np.load(dump))
  steps = {float(v) for k, v in w.items() if k.startswith("step/")}
  if len(steps) != 1:
    raise SystemExit(f"ref_continue: the checkpoint's tensors have different Adam steps {steps}")
  adam_step = int(steps.pop())

  config = fashion_vae_exemplar_rat.get_config()
  config.progress = False
  splits = train_lib.load_data(config)
  xval = reference_val_set(config)
  setup = train_lib.make_setup(config, splits)
  pool, _ = train_lib.make_pool(config, splits, None)
  n = splits.train_x.shape[0]
  spe = setup.steps_per_epoch
  if adam_step % spe:
    raise SystemExit(
      f"ref_continue: the checkpoint is mid-epoch (Adam step {adam_step}, {spe} steps per epoch)"
    )
  e_done = adam_step // spe  # epochs the checkpoint has trained

  def score(params) -> float:
    return float(-val_terms(params, setup, pool, xval, config)["elbo"].mean())

  template = train_lib.init_state(config, setup, n)
  start_params = reference_params(w, template.params["model"], prefix="w/")
  summary = {
    "ref_checkpoint": ckpt,
    "ref_fresh_seed": a.ref_fresh_seed,
    "start_epoch": e_done,
    "epochs": a.epochs,
    "adam_step": adam_step,
    "start_val_exvae_scorer": score(start_params),
    "exvae": {},
    "reference": {},
  }
  where = f"the reference's fresh initialisation, seed {a.ref_fresh_seed}," if fresh else ckpt
  print(
    f"start: {where} after epoch {e_done} (Adam step {adam_step}); exvae's validation "
    f"{summary['start_val_exvae_scorer']:.3f}",
    flush=True,
  )

  for seed in a.exvae_seeds:
    config.seed = seed
    t0 = time.time()
    state = train_lib.init_state(config, setup, n)
    params = reference_params(w, template.params["model"], prefix="w/")
    opt_state = adam_state_from_reference(setup.optimizer, w, params, adam_step)
    state = state.replace(params=params, opt_state=opt_state, step=jnp.int32(e_done * spe))
    vals = []
    for epoch in range(e_done, e_done + a.epochs):  # 0-based: epoch E+1 is index E
      perm = jnp.asarray(train_lib.epoch_permutation(seed, epoch, n))
      state = train_lib.refresh_step(state, pool, setup=setup)
      for _ in range(spe):
        state, _ = train_lib.train_step(state, pool, perm, setup=setup)
      vals.append(score(state.params))
      print(f"exvae seed {seed} epoch {epoch + 1}: {vals[-1]:.3f}", flush=True)
    summary["exvae"][str(seed)] = {"val": vals, "seconds": time.time() - t0}

  for seed in a.ref_seeds:
    run = os.path.join(out_dir, f"ref_seed{seed}")
    if os.path.exists(run):
      shutil.rmtree(run)
    os.makedirs(run)
    if not fresh:  # fresh: their own start, seeded as the dump was
      subprocess.run(
        [py, "-c", _PATCH, ckpt, os.path.join(run, "checkpoint.pth"), str(e_done + 1)],
        check=True,
        env=env,
      )
    t0 = time.time()
    with open(os.path.join(run, "driver.log"), "w") as log:
      proc = subprocess.run(
        [
          py,
          "-u",
          drv,
          "train",
          "--mode",
          "rat",
          "--seed",
          str(seed),
          "--threads",
          str(a.threads),
          "--epochs",
          str(e_done + a.epochs),
          "--out",
          run,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    if proc.returncode != 0:
      raise SystemExit(
        f"ref_continue: the reference's run failed (exit {proc.returncode}); see {run}/driver.log"
      )
    own = _ref_val(py, os.path.join(run, "vae.val_loss"))
    final = score(load_reference_params(os.path.join(run, "checkpoint_last.pth"), template.params))
    summary["reference"][str(seed)] = {
      "val_own_scorer": own,
      "final_exvae_scorer": final,
      "seconds": time.time() - t0,
    }
    print(
      f"reference seed {seed}: own validation per epoch "
      f"{' '.join(f'{v:.3f}' for v in own)}; final by exvae's validation {final:.3f}",
      flush=True,
    )

  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(
    f"\nfrom epoch {e_done} ({summary['start_val_exvae_scorer']:.3f}), validation after "
    f"each of {a.epochs} epochs:"
  )
  for seed, r in summary["exvae"].items():
    print(f"  exvae {seed:>5}: " + " ".join(f"{v:.3f}" for v in r["val"]))
  for seed, r in summary["reference"].items():
    print(
      f"  ref   {seed:>5}: "
      + " ".join(f"{v:.3f}" for v in r["val_own_scorer"])
      + f"   (final, exvae's scorer: {r['final_exvae_scorer']:.3f})"
    )
  ex = [r["val"][-1] for r in summary["exvae"].values()]
  rf = [r["final_exvae_scorer"] for r in summary["reference"].values()]
  if ex and rf:
    print(
      f"final, one scorer: exvae {np.mean(ex):.3f} (n={len(ex)}), reference {np.mean(rf):.3f} "
      f"(n={len(rf)}), difference {np.mean(ex) - np.mean(rf):+.3f}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
