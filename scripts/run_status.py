"""Where long runs stand: one line per run directory, read without changing anything.

Usage: python scripts/run_status.py [--runs ~/exvae-runs] [NAME_OR_WORKDIR ...] [--json]

For each run (every directory under ``--runs`` holding a ``config.json``, or
the names and paths given): who is writing it (``train.py``'s pid, from its
lock), the last validated epoch and the budget, the best validation loss and
its epoch, the bad epochs counted towards the early stop, the recent seconds
per epoch, the training time so far (summed over resumed segments, pauses
left out), the earliest epoch at which the protocol's early stop can end the
run (if the validation loss does not improve again) and how long that is at
the recent speed, and where its evaluation stands (scored test images of a
running or stopped ``eval.py``, or the test NLL it wrote). ``--json`` prints
the same as one JSON object per line.

Safe beside a running job: the writer lock is probed with a shared lock on a
read-only descriptor and every file is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae import rundir  # noqa: E402
from exvae.runinfo import (
  PAUSE_GAP_S,
  paused_seconds,
  read_jsonl,  # noqa: E402
  training_wall_clock,
)

RECENT_EPOCHS = 10  # the speed is the median over this many recent epochs
EVAL_FRESH_S = 180.0  # eval.py saves its scores every 60 s: older than this, it stopped


def earliest_stop(
  epoch: int, bad_epochs: int, warmup_epochs: int, patience: int, num_epochs: int
) -> int:
  """The first epoch at which the run can end, if the validation loss never improves again.

  Mirrors ``train_lib.early_stopping_update`` and ``should_stop_early``: an
  epoch (1-based ``e``) that does not improve counts as bad from ``e >=
  warmup_epochs`` on, and the run stops once more than ``patience`` were bad;
  it ends at ``num_epochs`` in any case.

  Args:
    epoch: the last validated epoch (1-based, as ``metrics.jsonl`` records it).
    bad_epochs: bad epochs counted so far.
    warmup_epochs: KL warm-up length.
    patience: early-stopping patience.
    num_epochs: the budget.

  Returns:
    A 1-based epoch, at least ``epoch``.
  """
  start = max(epoch, warmup_epochs - 1)
  return max(epoch, min(start + patience + 1 - bad_epochs, num_epochs))


def seconds_per_epoch(val_records: list[dict], recent: int = RECENT_EPOCHS) -> float | None:
  """Median seconds between consecutive validated epochs over the last ``recent`` ones.

  Pairs that straddle a resume (the clock restarts) or a pause (a gap of over
  ``PAUSE_GAP_S`` beyond the median) are left out; None without two records.
  """
  gaps = []
  for a, b in zip(val_records, val_records[1:]):
    if "time" in a and "time" in b and int(b["epoch"]) == int(a["epoch"]) + 1:
      if b["time"] > a["time"]:
        gaps.append(b["time"] - a["time"])
  gaps = gaps[-recent:]
  if not gaps:
    return None
  med = statistics.median(gaps)
  kept = [g for g in gaps if g <= med + PAUSE_GAP_S]
  return statistics.median(kept)


def _eval_state(workdir: str, config: dict, now: float) -> dict:
  """Where the run's evaluation stands, from the files ``eval.py`` writes in its out_dir."""
  out_dir = (config.get("eval") or {}).get("out_dir") or workdir
  metrics = os.path.join(out_dir, "eval_metrics.json")
  partial = os.path.join(out_dir, "eval_partial.npz")
  if os.path.exists(partial):
    try:
      with np.load(partial, allow_pickle=False) as f:
        ident = json.loads(str(f["identity"]))
        done = int(f["done_batches"])
      total = int(ident["m"])
      age = now - os.path.getmtime(partial)
      return {
        "eval": "running" if age < EVAL_FRESH_S else "stopped",
        "eval_done": min(done * int(ident["batch"]), total),
        "eval_total": total,
        "eval_saved_s_ago": round(age),
      }
    except (OSError, ValueError, KeyError, TypeError):
      return {"eval": "unreadable partial evaluation"}
  if os.path.exists(metrics):
    try:
      with open(metrics) as f:
        m = json.load(f)
    except (OSError, ValueError):
      return {"eval": "unreadable eval_metrics.json"}
    return {
      "eval": "done",
      "test_nll": m.get("test_nll"),
      "test_nll_se": m.get("test_nll_se"),
      "eval_checkpoint_step": m.get("checkpoint_step"),
    }
  return {}


def status(workdir: str, now: float | None = None) -> dict:
  """Everything :func:`format_line` prints about one run directory, as a dict.

  Args:
    workdir: a run directory (``config.json``; ``metrics.jsonl`` once it trains).
    now: the current time (seconds since the epoch), for the age of a partial
      evaluation.

  Returns:
    ``name``, ``workdir``, ``writer`` (the lock holder's pid and host, or
    None), ``epoch``, ``num_epochs``, ``best_val``, ``best_epoch``,
    ``bad_epochs``, ``patience``, ``s_per_epoch``, ``trained_s``, ``paused_s``,
    ``stop_by_epoch`` and ``stop_in_s`` (the earliest end without an
    improvement; ``stop_in_s`` None without a speed), ``finished`` (early
    stopped or at the budget), and the evaluation keys of ``_eval_state``.
  """
  now = time.time() if now is None else now
  workdir = os.path.abspath(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  path = os.path.join(workdir, "metrics.jsonl")
  records = read_jsonl(path) if os.path.exists(path) else []
  by_epoch = {}
  for r in records:
    if "val_loss" in r and "epoch" in r:
      by_epoch[int(r["epoch"])] = r  # a resume may re-log an epoch: keep the last
  val = [by_epoch[e] for e in sorted(by_epoch)]
  num_epochs = int(config.get("num_epochs", 0))
  patience = int(config.get("early_stopping_patience", 0))
  warmup = int(config.get("warmup_epochs", 0))
  holder = rundir.writer_of(workdir)
  out = {
    "name": os.path.basename(workdir),
    "workdir": workdir,
    "writer": None if holder is None else {"pid": holder.get("pid"), "host": holder.get("host")},
    "num_epochs": num_epochs,
    "patience": patience,
    "trained_s": training_wall_clock(records) - paused_seconds(records),
    "paused_s": paused_seconds(records),
  }
  if val:
    last = val[-1]
    best = min(val, key=lambda r: float(r["val_loss"]))
    epoch, bad = int(last["epoch"]), int(last.get("bad_epochs", 0))
    spe = seconds_per_epoch(val)
    stop = earliest_stop(epoch, bad, warmup, patience, num_epochs)
    # train.py appends a summary when it ends; it says whether the budget is spent (early
    # stop, num_epochs or max_steps) unless training went on after it (a resume).
    finished = epoch >= num_epochs
    for r in reversed(records):
      if "val_loss" in r:
        break
      if "summary" in r:
        finished = finished or bool(
          r["summary"].get("finished") or r["summary"].get("early_stopped")
        )
        break
    out.update(
      epoch=epoch,
      best_val=float(best["val_loss"]),
      best_epoch=int(best["epoch"]),
      bad_epochs=bad,
      s_per_epoch=spe,
      stop_by_epoch=stop,
      finished=finished,
      stop_in_s=None if spe is None or finished else (stop - epoch) * spe,
    )
  else:
    out.update(epoch=0, finished=False)
  out.update(_eval_state(workdir, config, now))
  return out


def _hours(s: float) -> str:
  return f"{s / 3600:.1f} h"


def format_line(st: dict) -> str:
  """One line for a human: the run's state, then its figures, separated by ``; ``."""
  if st["writer"] is not None:
    state = f"training (pid {st['writer']['pid']} on {st['writer']['host']})"
  elif st.get("eval") in ("running", "stopped"):
    state = f"evaluation {st['eval']}"
  elif st["finished"]:
    state = "trained" + (", evaluated" if st.get("eval") == "done" else ", not evaluated")
  else:
    state = "stopped" if st["epoch"] else "stopped before its first validation"
  parts = [f"{st['name']}: {state}"]
  if st["epoch"]:
    parts.append(f"epoch {st['epoch']} of {st['num_epochs']}")
    parts.append(f"best validation {st['best_val']:.3f} at epoch {st['best_epoch']}")
    if not st["finished"]:
      parts.append(f"{st['bad_epochs']} of {st['patience'] + 1} bad epochs to the early stop")
    if st["s_per_epoch"] is not None:
      parts.append(f"{st['s_per_epoch']:.1f} s/epoch")
    trained = f"{_hours(st['trained_s'])} trained"
    if st["paused_s"] > 0:
      trained += f" ({_hours(st['paused_s'])} paused)"
    parts.append(trained)
    if not st["finished"]:
      eta = f" (in {_hours(st['stop_in_s'])} or more)" if st["stop_in_s"] is not None else ""
      parts.append(f"ends at epoch {st['stop_by_epoch']} at the earliest{eta}")
  if st.get("eval") in ("running", "stopped"):
    parts.append(
      f"{st['eval_done']} of {st['eval_total']} test images scored "
      f"(saved {st['eval_saved_s_ago']} s ago)"
    )
  elif st.get("eval") == "done":
    nll = st.get("test_nll")
    parts.append(
      "test NLL "
      + (
        f"{nll:.2f} +- {st['test_nll_se']:.2f}"
        if isinstance(nll, (int, float)) and isinstance(st.get("test_nll_se"), (int, float))
        else str(nll)
      )
    )
  elif st.get("eval"):
    parts.append(st["eval"])
  return "; ".join(parts)


def _workdirs(runs: str, names: list[str]) -> list[str]:
  if names:
    return [n if os.path.isdir(n) and os.sep in n else os.path.join(runs, n) for n in names]
  if not os.path.isdir(runs):
    return []
  return sorted(
    os.path.join(runs, d)
    for d in os.listdir(runs)
    if os.path.isfile(os.path.join(runs, d, "config.json"))
  )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "runs_or_names",
    nargs="*",
    metavar="NAME_OR_WORKDIR",
    help="run names under --runs, or run directories (default: every run there)",
  )
  ap.add_argument(
    "--runs",
    default=os.path.expanduser("~/exvae-runs"),
    help="the folder that holds the run directories",
  )
  ap.add_argument("--json", action="store_true", help="one JSON object per run")
  args = ap.parse_args(argv)
  wds = _workdirs(args.runs, args.runs_or_names)
  if not wds:
    print(f"run_status: no run directories (config.json) under {args.runs}", file=sys.stderr)
    return 2
  code = 0
  for wd in wds:
    try:
      st = status(wd)
    except (OSError, ValueError) as e:
      print(f"run_status: {wd}: cannot be read ({type(e).__name__}: {e})", file=sys.stderr)
      code = 1
      continue
    print(json.dumps(st, sort_keys=True) if args.json else format_line(st), flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
