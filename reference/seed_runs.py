"""Several seeds of one config trained side by side, for the run-to-run spread.

Usage:
  python reference/seed_runs.py --config fashion_vae_exemplar_rat --seeds 100-105 --epochs 52 \
      --out DIR [--parallel K] [--deadline_s S] [--set key=value ...] [--score]

Starts ``train.py`` once per seed (at most --parallel at a time, each in its own
run directory under --workroot), stops any still running at the deadline with
SIGTERM (train.py saves and exits), and with --score scores each run's last
parameters on the reference code's validation images
(``reference/ref_val_loss.py``, one scorer for both codes). Writes
``DIR/seed_runs.json``: per seed the validation loss per epoch (exvae's own
draw), the epochs done, wall-clock and, with --score, the reference-binarisation
figure. On a CPU, --parallel up to the number of cores (pin with taskset as
needed). On one GPU use --parallel 1: five processes at once on an H200 ran
about 1 epoch each in 235 s where one alone runs an epoch in about a second
(CUDA contexts take turns). JAX_DEFAULT_MATMUL_PRECISION=highest in the
environment keeps a GPU's float32 network matmuls out of TF32, as on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exvae.runinfo import read_val_records  # noqa: E402  (re-exported for callers)


def parse_seeds(text: str) -> list[int]:
  """'3', '0-4' or '1,5,7-8' -> sorted distinct seeds; ValueError on anything else."""
  seeds: set[int] = set()
  for part in text.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
    if not m:
      raise ValueError(f"bad seed list {text!r}: use e.g. 0-4 or 1,5,7-8")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
      raise ValueError(f"bad seed range {part.strip()!r}: end before start")
    seeds.update(range(lo, hi + 1))
  return sorted(seeds)


def read_val_curve(workdir: Path) -> list[float]:
  """Validation loss per epoch from a run's metrics.jsonl (empty if none yet)."""
  return [float(r["val_loss"]) for r in read_val_records(workdir)]


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
  for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
    if proc.poll() is not None:
      return
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it exited between the poll and the signal
      return
    try:
      proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
      pass


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--config", required=True, help="a shipped config's name, e.g. fashion_vae_exemplar_rat"
  )
  ap.add_argument("--seeds", required=True, help="e.g. 100-105 or 1,5,7")
  ap.add_argument("--epochs", type=int, required=True)
  ap.add_argument("--out", required=True, help="directory for seed_runs.json and the logs")
  ap.add_argument("--workroot", default=None, help="run directories (default: OUT/runs)")
  ap.add_argument("--parallel", type=int, default=None, help="runs at a time (default: all)")
  ap.add_argument("--deadline_s", type=float, default=None, help="stop every run after this")
  ap.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="extra config override, repeatable",
  )
  ap.add_argument(
    "--score",
    action="store_true",
    help="score each run's last parameters with reference/ref_val_loss.py",
  )
  a = ap.parse_args(argv)
  try:
    seeds = parse_seeds(a.seeds)
  except ValueError as e:
    ap.error(str(e))
  if a.epochs < 1:
    ap.error(f"--epochs must be >= 1, got {a.epochs}")
  if a.parallel is not None and a.parallel < 1:
    ap.error(f"--parallel must be >= 1, got {a.parallel}")
  for kv in a.set:
    if "=" not in kv:
      ap.error(f"--set needs KEY=VALUE, got {kv!r}")
  config_path = ROOT / "configs" / f"{a.config}.py"
  if not config_path.exists():
    ap.error(f"no config {config_path}")
  out = Path(a.out)
  root = Path(a.workroot) if a.workroot else out / "runs"
  out.mkdir(parents=True, exist_ok=True)
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.monotonic()
  deadline = t0 + a.deadline_s if a.deadline_s else float("inf")
  parallel = a.parallel or len(seeds)

  def command(seed: int) -> list[str]:
    return [
      sys.executable,
      "train.py",
      f"--config={config_path}",
      f"--workdir={root / f'seed{seed}'}",
      f"--config.seed={seed}",
      f"--config.num_epochs={a.epochs}",
      "--config.progress=False",
      "--config.tensorboard=False",
      "--config.num_picture_samples=0",
      *[f"--config.{kv}" for kv in a.set],
    ]

  waiting, running, done = list(seeds), {}, {}
  while waiting or running:
    while waiting and len(running) < parallel and time.monotonic() < deadline:
      seed = waiting.pop(0)
      log = open(out / f"seed{seed}.log", "w")
      running[seed] = (
        subprocess.Popen(
          command(seed), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        ),
        log,
        time.monotonic(),
      )
    if time.monotonic() >= deadline:
      waiting.clear()
      for proc, _, _ in running.values():
        _stop(proc)
    for seed in [s for s, (p, _, _) in running.items() if p.poll() is not None]:
      proc, log, start = running.pop(seed)
      log.close()
      done[seed] = {"returncode": proc.returncode, "wall_s": time.monotonic() - start}
    time.sleep(1.0)

  results, curves = {}, {seed: read_val_curve(root / f"seed{seed}") for seed in seeds}
  # Scoring: all runs at once (each process mostly waits on its own compile).
  scorers = {
    seed: subprocess.Popen(
      [
        sys.executable,
        "reference/ref_val_loss.py",
        f"--config={a.config}",
        f"--workdir={root / f'seed{seed}'}",
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for seed in seeds
    if a.score and curves[seed]
  }
  for seed in seeds:
    curve = curves[seed]
    rec = dict(
      done.get(seed, {"returncode": None, "wall_s": 0.0}), epochs_done=len(curve), val_loss=curve
    )
    if seed in scorers:
      text = scorers[seed].communicate()[0]
      m = re.search(r"epoch=(\d+) .*val_loss_on_reference_binarisation=([\d.]+)", text)
      rec["ref_binarisation"] = (
        {"epoch": int(m.group(1)), "val_loss": float(m.group(2))} if m else {"error": text[-1500:]}
      )
    results[str(seed)] = rec
    last = f"{curve[-1]:.3f}" if curve else "-"
    score = rec.get("ref_binarisation", {}).get("val_loss", "-")
    print(
      f"seed {seed}: {len(curve)} epochs, last val {last}, on the reference's images {score}",
      flush=True,
    )
  summary = {
    "config": a.config,
    "epochs": a.epochs,
    "overrides": a.set,
    "matmul_precision": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"),
    "wall_s": time.monotonic() - t0,
    "seeds": results,
  }
  (out / "seed_runs.json").write_text(json.dumps(summary, indent=1))
  finished = [r for r in results.values() if r["epochs_done"] >= a.epochs]
  print(
    f"seed_runs: {len(finished)} of {len(seeds)} runs reached epoch {a.epochs} "
    f"in {summary['wall_s']:.0f} s",
    flush=True,
  )
  return 0 if len(finished) == len(seeds) else 1


if __name__ == "__main__":
  sys.exit(main())
