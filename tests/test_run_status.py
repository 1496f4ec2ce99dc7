"""scripts/run_status.py: where a long run stands, read without changing its directory."""

import json
import os

import numpy as np
import pytest

from conftest import load_script
from exvae import resumable, rundir, train_lib


def _status():
  return load_script("scripts/run_status.py")


def _snapshot(wd):
  """Every file under ``wd`` with its bytes and modification time."""
  out = {}
  for root, _, files in os.walk(wd):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, wd)] = (fh.read(), os.stat(p).st_mtime_ns)
  return out


def _run_dir(
  tmp_path, val_losses, *, warmup=3, patience=2, num_epochs=40, times=None, summary=None
):
  """A run directory whose metrics.jsonl holds the validations train_lib would log."""
  wd = tmp_path / "runs" / "cfg"
  wd.mkdir(parents=True)
  (wd / "config.json").write_text(
    json.dumps(
      {
        "num_epochs": num_epochs,
        "warmup_epochs": warmup,
        "early_stopping_patience": patience,
        "eval": {"out_dir": ""},
      }
    )
  )
  meta = {"best_val": None, "best_epoch": 0, "bad_epochs": 0}
  lines = []
  for e, v in enumerate(val_losses):
    train_lib.early_stopping_update(meta, v, e, warmup)
    t = times[e] if times is not None else 10.0 * (e + 1)
    lines.append({"loss": v, "step": 5 * e + 3, "epoch": e + 0.6, "time": t - 4.0})
    lines.append(
      {
        "val_loss": v,
        "epoch": e + 1,
        "step": 5 * (e + 1),
        "best_val": meta["best_val"],
        "bad_epochs": meta["bad_epochs"],
        "time": t,
      }
    )
  if summary is not None:
    lines.append({"summary": summary})
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return wd


@pytest.mark.parametrize("seed", range(6))
def test_earliest_stop_is_where_the_training_loop_would_stop(seed):
  """From any point of a random validation curve, feeding train_lib's own early-stopping rule
  epochs that never improve ends the run exactly at earliest_stop."""
  rs = _status()
  rng = np.random.default_rng(seed)
  warmup, patience, num_epochs = int(rng.integers(1, 8)), int(rng.integers(0, 6)), 40
  losses = list(np.cumsum(rng.normal(-0.2, 1.0, size=30)))
  for k in range(1, 30):
    meta = {"best_val": None, "best_epoch": 0, "bad_epochs": 0}
    stopped, predicted = num_epochs, None
    for e in range(num_epochs):
      train_lib.early_stopping_update(meta, losses[e] if e < k else float("inf"), e, warmup)
      if e + 1 == k:
        predicted = rs.earliest_stop(k, meta["bad_epochs"], warmup, patience, num_epochs)
      if train_lib.should_stop_early(meta, patience):
        stopped = e + 1
        break
    if stopped < k:
      break  # the run never gets past epoch k
    assert predicted == stopped, (k, warmup, patience)


def test_status_of_a_resumed_paused_run_and_its_writer(tmp_path):
  rs = _status()
  # Epochs 1-6 in a first segment, 7-12 after a resume (the clock restarts), with a 20-minute
  # pause (SIGSTOP) between epochs 9 and 10; the best epoch is 8, then four bad epochs.
  losses = [9, 8, 7, 6, 5, 4, 3, 2, 2.5, 2.4, 2.6, 2.2]
  times = [10, 20, 30, 40, 50, 60, 12, 22, 32, 1232, 1242, 1252]
  wd = _run_dir(tmp_path, losses, warmup=3, patience=5, times=times)
  before = _snapshot(wd)
  st = rs.status(str(wd))
  assert _snapshot(wd) == before and not (wd / rundir.LOCK_FILE).exists()  # read only
  assert st["writer"] is None and st["epoch"] == 12 and st["best_epoch"] == 8
  assert st["best_val"] == 2 and st["bad_epochs"] == 4 and not st["finished"]
  assert st["s_per_epoch"] == pytest.approx(10.0)
  assert st["paused_s"] == pytest.approx(1232 - 4 - 32)  # the gap between two records
  assert st["trained_s"] == pytest.approx(60 + 1252 - st["paused_s"])
  assert st["stop_by_epoch"] == 14 and st["stop_in_s"] == pytest.approx(20.0)
  line = rs.format_line(st)
  assert line.startswith("cfg: stopped; epoch 12 of 40; best validation 2.000 at epoch 8")
  assert "4 of 6 bad epochs" in line and "ends at epoch 14 at the earliest" in line
  # A writer holds the lock: its pid is named, and probing changes nothing.
  with rundir.WorkdirLock(str(wd)):
    before = _snapshot(wd)
    st = rs.status(str(wd))
    assert _snapshot(wd) == before
  assert st["writer"]["pid"] == os.getpid()
  assert rs.format_line(st).startswith(f"cfg: training (pid {os.getpid()} on ")
  assert rs.status(str(wd))["writer"] is None  # released


def test_status_of_a_finished_and_evaluated_run_and_the_command(tmp_path, capsys):
  rs = _status()
  wd = _run_dir(
    tmp_path,
    [5, 4, 4.5, 4.6],
    warmup=1,
    patience=2,
    summary={"early_stopped": True, "finished": True},
  )
  (wd / "eval_metrics.json").write_text(
    json.dumps({"test_nll": 227.2218, "test_nll_se": 0.7612, "checkpoint_step": 20})
  )
  st = rs.status(str(wd))
  assert st["finished"] and st["stop_in_s"] is None and st["test_nll"] == 227.2218
  assert rs.format_line(st) == (
    "cfg: trained, evaluated; epoch 4 of 40; best validation 4.000 "
    "at epoch 2; 10.0 s/epoch; 0.0 h trained; test NLL 227.22 +- 0.76"
  )
  # An evaluation under way: its partial scores say how far it is.
  (wd / "eval_metrics.json").unlink()
  resumable.save(
    str(wd / "eval_partial.npz"),
    json.dumps({"m": 10000, "batch": 1, "chunk": 5000}),
    {"log_px_iwae": np.zeros(10000), "done_batches": np.int64(2500)},
  )
  assert "evaluation running; epoch 4" in rs.format_line(rs.status(str(wd)))
  assert "2500 of 10000 test images scored" in rs.format_line(rs.status(str(wd)))
  assert (
    rs.status(str(wd), now=os.path.getmtime(wd / "eval_partial.npz") + 600)["eval"] == "stopped"
  )
  # The command: one line per run under --runs (directories without config.json skipped).
  (tmp_path / "runs" / "not_a_run").mkdir()
  assert rs.main(["--runs", str(tmp_path / "runs")]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and out[0].startswith("cfg: evaluation running")
  assert rs.main(["--runs", str(tmp_path / "runs"), "--json", "cfg"]) == 0
  assert json.loads(capsys.readouterr().out)["eval_done"] == 2500
  assert rs.main(["--runs", str(tmp_path / "nothing")]) == 2
  assert "no run directories" in capsys.readouterr().err
  assert rs.main(["--runs", str(tmp_path / "runs"), "missing"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "missing: cannot be read" in err


def test_finished_follows_the_last_summary_unless_training_went_on(tmp_path):
  rs = _status()
  wd = _run_dir(tmp_path, [5, 4, 3], summary={"finished": True, "early_stopped": False})
  assert rs.status(str(wd))["finished"]  # a max_steps budget spent
  with open(wd / "metrics.jsonl", "a") as f:  # resumed with a larger budget
    f.write(
      json.dumps({"val_loss": 2.5, "epoch": 4, "step": 20, "bad_epochs": 0, "time": 5.0}) + "\n"
    )
  st = rs.status(str(wd))
  assert not st["finished"] and st["epoch"] == 4 and st["stop_by_epoch"] == 4 + 3 + 0


def test_a_run_without_a_validation_yet(tmp_path):
  rs = _status()
  wd = _run_dir(tmp_path, [])
  st = rs.status(str(wd))
  assert (st["epoch"], st["finished"]) == (0, False)
  assert rs.format_line(st) == "cfg: stopped before its first validation"
  with rundir.WorkdirLock(str(wd)):
    assert rs.format_line(rs.status(str(wd))).startswith("cfg: training (pid ")
