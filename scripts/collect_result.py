"""Copies one evaluated run into ``results/<name>/``: what others need to compare against it.

Usage: python scripts/collect_result.py --workdir RUN_DIR --name CONFIG_NAME [--out results]
           [--eval_dir DIR]

``--eval_dir`` names where eval.py wrote ``eval_metrics.json`` and ``per_example.npz``
(its ``--config.eval.out_dir``); by default the run directory.

Writes, atomically per file:
  metrics.json      eval.py's eval_metrics.json (test NLL, its standard error, ELBO terms, ...)
  config.json       the config the run trained with
  budget.json       epochs trained, early stop, best epoch, training wall-clock (summed over
                    resumed segments) and how much of it the job sat paused, all as of the
                    evaluated checkpoint (training may have gone on since); evaluation time,
                    this machine's measured matmul rate and its load average then, the
                    CPUs that trained it (machines.jsonl, with their epochs), source commit
  per_example.npz   per-example test log-likelihoods (float32, one per test image) and ELBOs,
                    with the test-set identity, as eval.py wrote them
  curve.csv         validation loss per epoch

Reads the run directory only (never writes there).
"""

import argparse
import json
import os
import shutil
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae.runinfo import (
  cpu_name,
  matmul_rate,
  paused_seconds,
  read_jsonl,  # noqa: E402
  training_wall_clock,
)


def machines_text(segments: list[dict], steps_per_epoch: int, last_epoch: int) -> str:
  """Which CPUs trained which epochs, from the run's ``machines.jsonl``.

  Args:
    segments: its records in file (time) order: ``step`` where a segment
      started, ``cpu``. A segment that starts before the end of an earlier one
      (a resume from an older checkpoint) trains those epochs again.
    steps_per_epoch: steps in one epoch.
    last_epoch: the last epoch counted (the evaluated checkpoint's); segments
      that start after it are ignored.

  Returns:
    The CPU's name when one kind of CPU trained every counted epoch, else
    ``"A (epochs 1-714), B (epochs 715-1068)"``.
  """
  spans: list[list] = []
  for seg in segments:
    first = int(seg.get("step", 0)) // max(1, steps_per_epoch) + 1
    if first > last_epoch:
      continue
    cpu = str(seg.get("cpu", "?"))
    spans = [sp for sp in spans if sp[1] < first]
    if spans:
      spans[-1][2] = first - 1
    if spans and spans[-1][0] == cpu:
      spans[-1][2] = last_epoch
    else:
      spans.append([cpu, first, last_epoch])
  if len({c for c, _, _ in spans}) <= 1:
    return spans[0][0] if spans else "?"
  return ", ".join(f"{c} (epochs {a}-{b})" for c, a, b in spans)


def _steps_per_epoch(records: list[dict]) -> int:
  """Steps per epoch from the validation records (``step`` at the end of ``epoch``), or 0."""
  for r in records:
    if "val_loss" in r and r.get("step") and r.get("epoch"):
      return int(r["step"]) // int(r["epoch"])
  return 0


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def collect(
  workdir: str,
  name: str,
  out_root: str,
  measure: bool = True,
  eval_dir: str | None = None,
  cpu: str | None = None,
) -> str:
  """Writes ``out_root/name/`` from ``workdir``; returns that directory.

  The evaluation's files are read from ``eval_dir`` (default: ``workdir``).
  ``budget.json``'s ``cpu`` names the CPUs that trained the run (its
  ``machines.jsonl``), ``cpu`` when given (a run trained before that file
  existed), else this machine's.
  """
  eval_dir = eval_dir or workdir
  need = [os.path.join(eval_dir, f) for f in ("eval_metrics.json", "per_example.npz")] + [
    os.path.join(workdir, f) for f in ("config.json", "metrics.jsonl")
  ]
  missing = [p for p in need if not os.path.exists(p)]
  if missing:
    raise SystemExit(
      f"collect_result: {', '.join(missing)} missing: train and evaluate the "
      "run first (eval.py writes eval_metrics.json and per_example.npz)."
    )
  from exvae import atomic, eval_lib

  try:  # its own digest, the files it records, the means of per_example.npz
    metrics = eval_lib.check_outputs(eval_dir)
  except atomic.NPZ_READ_ERRORS as e:
    raise SystemExit(
      f"collect_result: the evaluation in {eval_dir} does not check "
      f"({' '.join(str(e).split())}): evaluate the run again."
    ) from None
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  # Training may go on after the evaluation (an interim result): the budget is the
  # run's as of the evaluated checkpoint, not what the run directory holds now.
  ckpt = metrics.get("checkpoint_step")
  if ckpt is not None:
    records = [r for r in records if int(r.get("step", 0)) <= int(ckpt)]
  val = {}
  for r in records:
    if "val_loss" in r:
      val[int(r["epoch"])] = float(r["val_loss"])  # a resume may re-log an epoch: keep last
  summaries = [r["summary"] for r in records if "summary" in r]
  last = summaries[-1] if summaries else {}
  epochs = max(val) if val else 0
  best_epoch = min(val, key=val.get) if val else 0
  source = None
  prov = os.path.join(workdir, "provenance.json")
  if os.path.exists(prov):
    with open(prov) as f:
      source = json.load(f)
  budget = {
    "epochs_trained": epochs,
    "early_stopped": bool(last.get("early_stopped", False)),
    "best_epoch": best_epoch,
    "best_val_loss": val.get(best_epoch),
    "max_epochs": int(config.get("num_epochs", 0)),
    "warmup_epochs": int(config.get("warmup_epochs", 0)),
    "early_stopping_patience": int(config.get("early_stopping_patience", 0)),
    "train_wall_clock_s": training_wall_clock(records),
    "train_paused_s": paused_seconds(records),
    "eval_seconds": metrics.get("eval_seconds"),
    "num_importance_samples": metrics.get("num_importance_samples"),
    "num_test_examples": metrics.get("num_test_examples"),
    "cpu": cpu_name(with_isa=True),
    "cpu_source": "the machine that collected the run",
    "cpu_count": os.cpu_count(),
    "source": source,
  }
  machines = os.path.join(workdir, "machines.jsonl")
  if cpu:
    budget.update(cpu=cpu, cpu_source="given (--cpu)")
  elif os.path.exists(machines):
    segments = read_jsonl(machines)
    spe = int(last.get("steps_per_epoch") or 0) or _steps_per_epoch(records)
    if segments and spe:
      budget.update(
        cpu=machines_text(segments, spe, epochs), machines=segments, cpu_source="machines.jsonl"
      )
  if ckpt is not None:
    budget["evaluated_checkpoint_step"] = int(ckpt)
  if measure:
    budget["matmul_gflops_at_collect"] = round(matmul_rate() / 1e9, 1)
    budget["loadavg_at_collect"] = [round(x, 2) for x in os.getloadavg()]
  dest = os.path.join(out_root, name)
  os.makedirs(dest, exist_ok=True)
  _write_json(os.path.join(dest, "metrics.json"), metrics)
  _write_json(os.path.join(dest, "config.json"), config)
  _write_json(os.path.join(dest, "budget.json"), budget)
  tmp = os.path.join(dest, "per_example.npz.tmp")
  shutil.copyfile(os.path.join(eval_dir, "per_example.npz"), tmp)
  os.replace(tmp, os.path.join(dest, "per_example.npz"))
  with open(os.path.join(dest, "curve.csv.tmp"), "w") as f:
    f.write("epoch,val_loss\n")
    for e in sorted(val):
      f.write(f"{e},{val[e]:.4f}\n")
  os.replace(os.path.join(dest, "curve.csv.tmp"), os.path.join(dest, "curve.csv"))
  return dest


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--name", required=True, help="results entry name (the config's name)")
  ap.add_argument("--out", default="results")
  ap.add_argument(
    "--eval_dir",
    default=None,
    help="where eval.py wrote its files (--config.eval.out_dir); default --workdir",
  )
  ap.add_argument("--no-measure", action="store_true", help="skip the matmul-rate measurement")
  ap.add_argument(
    "--cpu",
    default=None,
    help="the CPUs that trained the run, for a run without machines.jsonl "
    "(default: its machines.jsonl, else this machine's CPU)",
  )
  a = ap.parse_args(argv)
  print(collect(a.workdir, a.name, a.out, measure=not a.no_measure, eval_dir=a.eval_dir, cpu=a.cpu))
  return 0


if __name__ == "__main__":
  sys.exit(main())
