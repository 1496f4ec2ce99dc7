"""The authors' augmentation classifier without augmentation: the baseline their code reaches.

  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python reference/ref_classify.py [--seed 1] [--epochs 100] [--threads 1] \\
      [--out results/fidelity/ref_classify_seed1.json]

Runs their ``utils.classify_data.classify_data`` unmodified on the Fashion-MNIST
loaders their ``analysis.py --classify`` builds (``load_dataset(config,
training_num=50000, no_binarization=True)``: grey images, 50000 for training,
the other 10000 for validation), with ``--hyper_lambda 1``: the loss is
``1 * CE(real) + 0 * CE(augmented)``, so the classifier learns from the real
images alone, and the generative model is a stand-in whose "augmented" image is
the real one (no draw from any random stream). Their classifier: MLP
784-1024-1024-10 in float64, label smoothing 0.1, SGD momentum 0.9, lr 0.1
decayed linearly to 1%, batch 100, 100 epochs; the figure is the test error
after the last epoch. It answers how far apart the paper's baseline (8.56%) and
exvae's (``results/<config>/augment.json``, ``test_error_without``) lie because
of the code, not the protocol. It needs the reference installed (see
bench/vs_reference.py); it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACC = re.compile(r"^accuracy test: ([0-9.eE+-]+)$", re.M)


class RealImages:
  """Stands in for their VAE in ``classify_data``: the 'augmented' batch is the real one."""

  def reference_based_generation_x(self, reference_image, N=1):  # noqa: N803 (their name)
    return reference_image.unsqueeze(1).repeat(1, N, 1)


def per_epoch_test_errors(stdout: str) -> list[float]:
  """Test errors (%) printed by ``classify_data``, one per epoch and one after the last.

  ``classify_data`` prints ``accuracy test: <fraction>`` after every epoch and
  once more after training; the last is its result.
  """
  return [100.0 * (1.0 - float(m)) for m in ACC.findall(stdout)]


def torch_side(
  driver_path: str,
  seed: int,
  epochs: int,
  hidden: int,
  training_set_size: int,
  threads: int,
  workdir: str,
) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(driver_path)))
  import driver  # noqa: E402  (puts the shim and the authors' tree on the path)
  import numpy as np
  import torch
  import types
  import utils.classify_data as their_classify
  from utils.load_data.data_loader_instances import load_dataset

  # After training, their compute_accuracy draws a grid of the misread test
  # images with torchvision.utils.make_grid, which the offline shim does not
  # provide; the picture plays no part in the figures, so it is left blank.
  their_classify.torchvision = types.SimpleNamespace(
    utils=types.SimpleNamespace(make_grid=lambda x, **_: x)
  )
  their_classify.imshow = lambda *_, **__: None
  classify_data = their_classify.classify_data

  torch.set_num_threads(threads)
  args = driver.de.parser.parse_args(driver.their_argv("gaussian"))
  args.device = "cpu"
  # analysis.py seeds torch and NumPy with its --seed before loading the data
  # (the 50000/10000 split and the loader's shuffling come from these streams).
  torch.manual_seed(seed)
  np.random.seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):
    train_loader, val_loader, test_loader, args = load_dataset(
      args, training_num=training_set_size, no_binarization=True
    )
  cargs = argparse.Namespace(
    hidden_units=hidden,
    lr=0.1,
    epochs=epochs,
    hyper_lambda=1.0,
    batch_size=100,
    device="cpu",
    input_size=[1, 28, 28],
  )
  # Their classify_data continues from <workdir>/checkpoint.pth (saved at the start of
  # every 10th epoch) when it exists: the per-epoch list then starts there.
  resumed = os.path.exists(os.path.join(workdir, "checkpoint.pth"))
  t0 = time.perf_counter()
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    test_acc, val_acc = classify_data(
      train_loader, val_loader, test_loader, workdir, cargs, RealImages()
    )
  errs = per_epoch_test_errors(buf.getvalue())
  return {
    "test_error": round(100.0 - test_acc, 4),
    "val_error": round(100.0 - val_acc, 4),
    "per_epoch_test_error": errs[:-1],
    "seconds": time.perf_counter() - t0,
    "resumed": resumed,
    "seed": seed,
    "epochs": epochs,
    "hidden": hidden,
    "training_set_size": training_set_size,
    "threads": threads,
    "num_train": len(train_loader.dataset),
    "num_val": len(val_loader.dataset),
    "num_test": len(test_loader.dataset),
    "hyper_lambda": 1.0,
    "images": "grey (no_binarization=True)",
    "dtype": "float64",
    "code": "sajadn/Exemplar-VAE 4dbd091 utils/classify_data.classify_data",
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--side", default="exvae", choices=("exvae", "torch"))
  ap.add_argument("--driver", default=None, help="(internal) path of driver.py")
  ap.add_argument("--seed", type=int, default=1, help="analysis.py's --seed (default 1)")
  ap.add_argument("--epochs", type=int, default=100)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--training_set_size", type=int, default=50000)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--out", default=None, help="JSON record to write")
  ap.add_argument(
    "--workdir",
    default=None,
    help="their classifier's checkpoint folder (default: a temporary one); "
    "their code saves every 10 epochs there and a rerun continues from it",
  )
  a = ap.parse_args(argv)
  if a.epochs < 1 or a.threads < 1:
    ap.error("--epochs and --threads must be positive")
  if a.side == "torch":
    if a.workdir:
      os.makedirs(a.workdir, exist_ok=True)
      rec = torch_side(
        a.driver, a.seed, a.epochs, a.hidden, a.training_set_size, a.threads, a.workdir
      )
    else:
      with tempfile.TemporaryDirectory() as wd:
        rec = torch_side(a.driver, a.seed, a.epochs, a.hidden, a.training_set_size, a.threads, wd)
    print("RESULT " + json.dumps(rec), flush=True)
    return 0

  sys.path.insert(0, ROOT)
  from bench.vs_reference import require_reference

  py, src, drv = require_reference()
  cmd = [
    py,
    "-u",
    os.path.abspath(__file__),
    "--side",
    "torch",
    "--driver",
    drv,
    "--seed",
    str(a.seed),
    "--epochs",
    str(a.epochs),
    "--hidden",
    str(a.hidden),
    "--training_set_size",
    str(a.training_set_size),
    "--threads",
    str(a.threads),
  ]
  if a.workdir:
    cmd += ["--workdir", os.path.abspath(a.workdir)]
  proc = subprocess.run(
    cmd,
    env=dict(os.environ, EXVAE_REF_SRC=src),
    capture_output=True,
    text=True,
    cwd=tempfile.gettempdir(),
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    print(f"the reference's side failed (exit {proc.returncode})", file=sys.stderr)
    return 1
  rec = json.loads(lines[-1][len("RESULT ") :])
  from exvae import runinfo

  # A resumed run's seconds and per-epoch errors cover only its last stretch.
  rec.update(
    commit=runinfo.code_commit(),
    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    cpu=runinfo.cpu_name(),
  )
  print(
    f"their classifier, {rec['num_train']} training images, {rec['epochs']} epochs, seed "
    f"{rec['seed']}: test error {rec['test_error']:.2f}% (validation {rec['val_error']:.2f}%), "
    f"{rec['seconds']:.0f} s on {rec['threads']} thread(s)"
  )
  if a.out:
    from exvae import atomic

    atomic.write_json(a.out, rec)
    print(f"-> {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
