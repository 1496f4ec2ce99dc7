"""The authors' training loop fed exvae's random draws: is a gap in the draws or in the computation?

  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python reference/ref_draws_run.py --seed 15 --epochs 24 --threads 1 --out DIR

From the reference's fresh initialisation for torch seed S (the start of
their from-scratch run with ``--seed S`` and of ``reference/ref_continue.py
--ref_fresh_seed S``), THEIR ``calculate_loss`` / ``backward`` /
``AdamNormGrad.step`` train for ``--epochs`` epochs, with every random input
of training taken from exvae's stream for ``--exvae_seed`` (default S): the
batch order and ids, the binarised batch, the reparameterisation noise and
the M RAT candidates, exactly what exvae's ``train_step`` consumes
(``bench/ref_step_check.exvae_draws``; ``torch.randint`` and
``model.reparameterize`` patched during training only, as in
``ref_step_check``). ``--exvae_inputs`` takes a subset of ``batch`` (order and
bits), ``order`` (exvae's rows, their bits), ``eps`` and ``cand``; the
reference draws the others itself, as its
own loop does (``torch.randperm``, ``torch.bernoulli``, its own noise and
``torch.randint``), to find which input a difference comes from.
``--reseed`` re-seeds torch with S after building the model, as their
``initial_or_load`` does (with ``--exvae_inputs none`` it is their own run);
``--stream_seed T`` re-seeds with T instead: another torch stream from the
same start, for the spread between streams. Each epoch
starts with their ``cache_z`` and ends with
their ``evaluate_loss`` on their validation images, with their own
randomness. exvae writes each epoch's draws to ``DIR`` (at most two epochs
ahead, about 100 MB each); the reference's process consumes and deletes them.

What it separates, at equal start:

* against ``ref_continue --ref_fresh_seed S --exvae_seeds S`` (exvae's code,
  the same start, the SAME draws): what differs is the computation;
* against their from-scratch run with ``--seed S`` (their code and start,
  their own draws): what differs is the draws.

Writes ``DIR/summary.json`` (their validation loss per epoch, the final
weights scored by exvae's validation on their images, seconds) and
``DIR/checkpoint_last.pth``. Reads nothing it writes elsewhere; it is not a
test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# The random inputs of a training step that can come from exvae: the batch (its
# order and its bits: exvae's bits are drawn for exvae's rows), or its order
# alone (exvae's rows, binarised by torch.bernoulli), the reparameterisation
# noise, and the M RAT candidates.
INPUTS = ("batch", "order", "eps", "cand")


def parse_inputs(text: str) -> frozenset:
  """``--exvae_inputs``: a comma-separated subset of :data:`INPUTS` ('' or 'none': none)."""
  got = frozenset(t for t in text.replace(" ", "").split(",") if t and t != "none")
  bad = sorted(got - set(INPUTS))
  if bad:
    raise ValueError(f"unknown --exvae_inputs {bad}; choose from {list(INPUTS)}")
  return got


def draws_path(io_dir: str, epoch: int) -> str:
  """The file holding exvae's draws for (1-based) ``epoch``."""
  return os.path.join(io_dir, f"draws_{epoch:04d}.npz")


def write_epoch_draws(io_dir: str, epoch: int, draws: dict) -> str:
  """Writes one epoch's draws atomically (the reader never sees a partial file).

  Args:
    io_dir: the exchange directory.
    epoch: 1-based epoch.
    draws: ``ref_step_check.exvae_draws``'s dict (x (T, B, D) in {0, 1}, ids (T, B),
      eps (T, B, d), cand (T, M)).

  Returns:
    the file's path.

  Raises:
    ValueError: if ``x`` holds anything but 0 and 1 (it is stored as uint8).
  """
  x = np.asarray(draws["x"])
  if not np.all((x == 0) | (x == 1)):
    raise ValueError("write_epoch_draws: x must be a binarised batch (0s and 1s only)")
  path = draws_path(io_dir, epoch)
  tmp = path + ".tmp.npz"
  np.savez(
    tmp,
    x=x.astype(np.uint8),
    ids=draws["ids"].astype(np.int32),
    eps=draws["eps"].astype(np.float32),
    cand=draws["cand"].astype(np.int32),
  )
  os.replace(tmp, path)
  return path


# ---------------------------------------------------------------------------
# The reference's side (runs under $EXVAE_REF_PYTHON)
# ---------------------------------------------------------------------------


def torch_side(
  io_dir: str,
  driver_path: str,
  seed: int,
  epochs: int,
  threads: int,
  inputs: frozenset = frozenset(INPUTS),
  stream_seed: int | None = None,
) -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(driver_path)))
  import random

  import driver  # noqa: E402  (puts the shim and the authors' tree on the path)
  import torch
  from utils.evaluation import evaluate_loss

  from reference.ref_step_check import their_loss_backward

  args, train_loader, val_loader, _, model, opt = driver.build(
    driver.their_argv("rat", seed=seed), threads
  )
  if stream_seed is not None:
    # As their run_density_estimation (initial_or_load) does after building the model,
    # where the stream seed is the model's seed.
    torch.manual_seed(stream_seed)
    random.seed(stream_seed)
  dataset = train_loader.dataset
  vals, secs = [], []
  for epoch in range(1, epochs + 1):
    path = draws_path(io_dir, epoch)
    while not os.path.exists(path):
      time.sleep(0.5)
    d = dict(np.load(path))
    os.remove(path)
    t0 = time.perf_counter()
    model.train()
    beta = min(1.0, epoch / args.warmup)  # their set_beta
    with torch.no_grad():
      cache = model.cache_z(dataset)
    steps, bsz = d["ids"].shape
    if "batch" in inputs or "order" in inputs:
      order = torch.from_numpy(d["ids"].astype(np.int64))
      loader = None
    else:  # their order: their own DataLoader, as they iterate it
      loader = iter(train_loader)
    for s in range(steps):
      if loader is not None:
        data, ids, _ = next(loader)
      else:
        ids = order[s].reshape(-1, 1)
        data = dataset.tensors[0][ids.reshape(-1)]
      if "batch" in inputs:
        x = torch.from_numpy(d["x"][s].astype(np.float32))
      else:  # their bits
        x = torch.bernoulli(data)
      loss, _, _ = their_loss_backward(
        model,
        opt,
        (x, ids),
        beta,
        cache,
        dataset,
        eps=torch.from_numpy(d["eps"][s]) if "eps" in inputs else None,
        cand=torch.from_numpy(d["cand"][s].astype(np.int64)) if "cand" in inputs else None,
      )
      opt.step()
      cache = (cache[0].detach(), cache[1].detach())
      if not np.isfinite(loss.item()):
        raise SystemExit(f"non-finite loss at epoch {epoch}, step {s}")
    with torch.no_grad():
      val, _, _ = evaluate_loss(args, model, val_loader, dataset=dataset)
    vals.append(float(val))
    secs.append(time.perf_counter() - t0)
    print(
      f"reference on exvae's draws, epoch {epoch}: validation {val:.3f} ({secs[-1]:.0f} s)",
      flush=True,
    )
    with open(os.path.join(io_dir, "torch_val.json"), "w") as f:
      json.dump({"val": vals, "seconds": secs}, f)
  torch.save(
    {"epoch": epochs, "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
    os.path.join(io_dir, "checkpoint_last.pth"),
  )


# ---------------------------------------------------------------------------
# exvae's side
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--side", default="exvae", choices=("exvae", "torch"))
  ap.add_argument("--io", default=None, help="(internal) exchange directory")
  ap.add_argument("--driver", default=None, help="(internal) path of driver.py")
  ap.add_argument(
    "--seed", type=int, required=True, help="torch seed of the reference's fresh initialisation"
  )
  ap.add_argument(
    "--exvae_seed", type=int, default=None, help="exvae seed whose draws are fed (default: --seed)"
  )
  ap.add_argument(
    "--exvae_inputs",
    default=",".join(INPUTS),
    help="which random inputs come from exvae (comma-separated subset of "
    f"{','.join(INPUTS)}; the rest the reference draws itself)",
  )
  ap.add_argument(
    "--reseed",
    action="store_true",
    help="re-seed torch with --seed after building the model, as their "
    "initial_or_load does (with --exvae_inputs none: their own run)",
  )
  ap.add_argument(
    "--stream_seed",
    type=int,
    default=None,
    help="re-seed torch with this seed instead after building the model: "
    "another stream from the same start (implies --reseed)",
  )
  ap.add_argument("--epochs", type=int, default=24)
  ap.add_argument("--threads", type=int, default=1, help="the reference's torch threads")
  ap.add_argument("--out", default=None, help="a new or empty directory")
  a = ap.parse_args(argv)
  if a.epochs < 1:
    ap.error(f"--epochs must be >= 1, got {a.epochs}")
  try:
    inputs = parse_inputs(a.exvae_inputs)
  except ValueError as e:
    ap.error(str(e))
  if a.side == "torch":
    torch_side(a.io, a.driver, a.seed, a.epochs, a.threads, inputs, a.stream_seed)
    return 0
  stream_seed = a.stream_seed if a.stream_seed is not None else (a.seed if a.reseed else None)
  if not a.out:
    ap.error("--out is required")
  out = os.path.abspath(os.path.expanduser(a.out))
  if os.path.isdir(out) and os.listdir(out):
    ap.error(f"--out {out} is not empty")
  os.makedirs(out, exist_ok=True)
  exvae_seed = a.seed if a.exvae_seed is None else a.exvae_seed

  from bench.vs_reference import require_reference

  py, src, drv = require_reference()

  import jax.numpy as jnp
  from reference.ref_step_check import exvae_draws
  from configs import fashion_vae_exemplar_rat
  from exvae import train_lib
  from reference.ref_val_loss import load_reference_params, reference_val_set, val_terms

  config = fashion_vae_exemplar_rat.get_config()
  config.progress = False
  config.seed = exvae_seed
  splits = train_lib.load_data(config)
  setup = train_lib.make_setup(config, splits)
  pool = jnp.asarray(splits.train_x)
  n = splits.train_x.shape[0]
  spe = setup.steps_per_epoch
  m = int(config.exemplar.num_exemplars)
  template = train_lib.init_state(
    config, setup, n
  )  # its key: exvae's stream; its params: the layout

  t0 = time.time()
  log = open(os.path.join(out, "torch.log"), "w")
  proc = subprocess.Popen(
    [
      py,
      "-u",
      os.path.abspath(__file__),
      "--side",
      "torch",
      "--io",
      out,
      "--driver",
      drv,
      "--seed",
      str(a.seed),
      "--epochs",
      str(a.epochs),
      "--threads",
      str(a.threads),
      "--exvae_inputs",
      ",".join(sorted(inputs)) or "none",
    ]
    + ([] if stream_seed is None else ["--stream_seed", str(stream_seed)]),
    env=dict(os.environ, EXVAE_REF_SRC=src),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  print(
    f"the reference from its seed-{a.seed} initialisation, on exvae seed {exvae_seed}'s "
    f"draws of {sorted(inputs) or 'nothing'}, {a.epochs} epochs; its log: {out}/torch.log",
    flush=True,
  )
  for epoch in range(1, a.epochs + 1):
    # Stay at most two epochs ahead of the reader (each file is about 100 MB).
    while os.path.exists(draws_path(out, epoch - 2)) if epoch > 2 else False:
      if proc.poll() is not None:
        break
      time.sleep(1.0)
    if proc.poll() is not None:
      break
    e0 = epoch - 1
    perm = jnp.asarray(train_lib.epoch_permutation(exvae_seed, e0, n))
    write_epoch_draws(out, epoch, exvae_draws(template.key, setup, pool, perm, e0 * spe, spe, m))
  rc = proc.wait()
  log.close()
  if rc != 0:
    with open(os.path.join(out, "torch.log")) as f:
      print(f.read()[-3000:], file=sys.stderr)
    raise SystemExit(f"ref_draws_run: the reference's side failed (exit {rc}); see {out}/torch.log")
  with open(os.path.join(out, "torch_val.json")) as f:
    tv = json.load(f)

  # Their final weights, scored by exvae's validation on their images (one scorer).
  params = load_reference_params(os.path.join(out, "checkpoint_last.pth"), template.params)
  final = float(-val_terms(params, setup, pool, reference_val_set(config), config)["elbo"].mean())
  summary = {
    "ref_fresh_seed": a.seed,
    "exvae_draws_seed": exvae_seed,
    "exvae_inputs": sorted(inputs),
    "reseed": stream_seed is not None,
    "stream_seed": stream_seed,
    "epochs": a.epochs,
    "val_own_scorer": tv["val"],
    "final_exvae_scorer": final,
    "seconds": time.time() - t0,
  }
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print("their validation per epoch: " + " ".join(f"{v:.3f}" for v in tv["val"]))
  print(f"final weights by exvae's validation: {final:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
