"""scripts/carry_runs.py: a stopped run travels through the repository and resumes."""

import json
import os
import subprocess
import sys
import tarfile
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_script
from exvae import checkpoints, rundir


def _carry():
  return load_script("scripts/carry_runs.py")


def _run_dir(runs):
  """A run directory with two checkpoint steps, a log, a lock file and a set-aside step."""
  wd = runs / "cfg"
  m = checkpoints.Manager(os.path.join(wd, "checkpoints"), max_to_keep=3, create=True)
  for step in (500, 1000):
    state = {"w": jnp.arange(6.0).reshape(2, 3) + step, "step": jnp.int32(step)}
    m.save(
      step,
      state,
      {"w": jnp.full((2, 3), float(step))},
      {"epochs_validated": step // 500, "best_val": 300.0 - step / 1000},
    )
  m.close()
  (wd / "metrics.jsonl").write_text(
    json.dumps({"epoch": 1, "step": 500, "val_loss": 300.0, "best_val": 300.0})
    + "\n"
    + json.dumps({"epoch": 2, "step": 1000, "val_loss": 299.0, "best_val": 299.0})
    + "\n"
  )
  (wd / "provenance.json").write_text(json.dumps({"commit": "abc1234"}))
  (wd / rundir.LOCK_FILE).write_text("{}")
  (wd / "unreadable_checkpoints").mkdir()
  (wd / "unreadable_checkpoints" / "junk").write_text("x")
  (wd / "pictures").mkdir()
  (wd / "pictures" / "epoch_00001.png").write_bytes(b"png")
  (wd / "events.out.tfevents.1.vm").write_bytes(b"tb")
  (wd / "eval_partial.npz").write_bytes(b"scores of a stopped evaluation")
  return wd


def test_pack_carries_the_newest_step_and_unpack_resumes_from_it(tmp_path, capsys):
  carry = _carry()
  wd = _run_dir(tmp_path / "runs")
  assert (
    carry.main(
      [
        "pack",
        "--runs",
        str(tmp_path / "runs"),  # the documented order
        "--carry",
        str(tmp_path / "carry"),
        "cfg",
      ]
    )
    == 0
  )
  assert "packed cfg: step 1000, epoch 2" in capsys.readouterr().out
  with tarfile.open(tmp_path / "carry" / "cfg.tar.gz") as tar:
    names = tar.getnames()
  assert "checkpoints/1000" in names and "metrics.jsonl" in names
  assert not any(
    n.startswith(("checkpoints/500", rundir.LOCK_FILE, "unreadable", "pictures", "events.out"))
    for n in names
  )
  manifest = json.loads((tmp_path / "carry" / "cfg.json").read_text())
  assert manifest["step"] == 1000 and manifest["source"]["commit"] == "abc1234"

  # A new machine: the run directory is recreated and restores the carried state.
  new_runs = tmp_path / "new_runs"
  assert carry.main(["unpack", "--runs", str(new_runs), "--carry", str(tmp_path / "carry")]) == 0
  assert "unpacked" in capsys.readouterr().out
  template = {"w": jnp.zeros((2, 3)), "step": jnp.int32(0)}
  state, best, meta = checkpoints.Manager(
    os.path.join(new_runs, "cfg", "checkpoints"), read_only=True
  ).restore_latest(template, {"w": jnp.zeros((2, 3))})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(6.0).reshape(2, 3) + 1000)
  np.testing.assert_array_equal(np.asarray(best["w"]), np.full((2, 3), 1000.0))
  assert meta["epochs_validated"] == 2
  assert (new_runs / "cfg" / "metrics.jsonl").read_text() == (wd / "metrics.jsonl").read_text()
  # A stopped evaluation goes with the run, so eval.py continues it on the new machine.
  assert (new_runs / "cfg" / "eval_partial.npz").read_bytes() == (
    wd / "eval_partial.npz"
  ).read_bytes()
  assert not any(p.name.startswith(".cfg.unpack") for p in new_runs.iterdir())


def test_unpack_never_replaces_an_existing_run_dir(tmp_path, capsys):
  carry = _carry()
  _run_dir(tmp_path / "runs")
  assert (
    carry.main(
      ["pack", "cfg", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
    )
    == 0
  )
  (tmp_path / "runs" / "cfg" / "metrics.jsonl").write_text("newer work\n")
  assert (
    carry.main(
      ["unpack", "cfg", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
    )
    == 0
  )
  assert "kept" in capsys.readouterr().out
  assert (tmp_path / "runs" / "cfg" / "metrics.jsonl").read_text() == "newer work\n"
  # A name without an archive is no error: that run starts or resumes as it is.
  assert (
    carry.main(
      ["unpack", "other", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
    )
    == 0
  )


def test_pack_refuses_a_running_or_empty_run_in_one_line(tmp_path, capsys):
  carry = _carry()
  wd = _run_dir(tmp_path / "runs")
  args = ["pack", "cfg", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
  with rundir.WorkdirLock(str(wd)):
    assert carry.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert "SIGTERM" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "carry" / "cfg.tar.gz").exists()
  (tmp_path / "runs" / "empty").mkdir()
  assert (
    carry.main(
      ["pack", "empty", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
    )
    == 2
  )
  assert "no complete checkpoint" in capsys.readouterr().err
  with pytest.raises(carry.CarryError, match="no run directory"):
    carry.pack(str(tmp_path / "runs" / "missing"), str(tmp_path / "x.tar.gz"))


_WRITER = """
import signal, sys, time
sys.path.insert(0, sys.argv[2])
from exvae import rundir
lock = rundir.WorkdirLock(sys.argv[1]).acquire()
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
print("locked", flush=True)
while not stopped:
  time.sleep(0.05)
open(sys.argv[1] + "/stopped_by_sigterm", "w").write("yes")   # a checkpoint, as train.py saves
lock.release()
"""


def test_pack_stop_stops_the_writer_then_packs(tmp_path, capsys):
  carry = _carry()
  wd = _run_dir(tmp_path / "runs")
  writer = subprocess.Popen(
    [sys.executable, "-c", _WRITER, str(wd), ROOT], stdout=subprocess.PIPE, text=True
  )
  try:
    assert writer.stdout.readline().strip() == "locked"
    args = ["pack", "cfg", "--runs", str(tmp_path / "runs"), "--carry", str(tmp_path / "carry")]
    assert carry.main(args) == 2  # without --stop: refused, and says how
    assert "--stop" in capsys.readouterr().err
    assert carry.main(args + ["--stop", "--wait", "30"]) == 0
    assert writer.wait(timeout=30) == 0
    out = capsys.readouterr().out
    assert f"stopped its writer (pid {writer.pid}" in out and "packed cfg: step 1000" in out
    with tarfile.open(tmp_path / "carry" / "cfg.tar.gz") as tar:
      assert "stopped_by_sigterm" in tar.getnames()  # packed after the writer had stopped
  finally:
    writer.kill()
  # No writer: nothing to stop, and pack goes on.
  assert carry.main(args + ["--stop"]) == 0
  assert "no writer running" in capsys.readouterr().out


def test_pack_stop_refuses_a_writer_on_another_host_or_one_that_will_not_stop(tmp_path, capsys):
  carry = _carry()
  wd = _run_dir(tmp_path / "runs")
  args = [
    "pack",
    "cfg",
    "--runs",
    str(tmp_path / "runs"),
    "--carry",
    str(tmp_path / "carry"),
    "--stop",
  ]
  with rundir.WorkdirLock(str(wd)):  # held by this very process
    info = json.loads((wd / rundir.LOCK_FILE).read_text())
    (wd / rundir.LOCK_FILE).write_text(json.dumps({**info, "host": "elsewhere"}))
    assert carry.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "on host elsewhere" in err and len(err.splitlines()) == 1
    # A writer that ignores SIGTERM: a stand-in pid that exists and is ours (a sleeper).
    sleeper = subprocess.Popen(
      [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); print(1, flush=True); time.sleep(60)",
      ],
      stdout=subprocess.PIPE,
      text=True,
    )
    try:
      sleeper.stdout.readline()
      (wd / rundir.LOCK_FILE).write_text(json.dumps({**info, "pid": sleeper.pid}))
      t = time.monotonic()
      with pytest.raises(carry.CarryError, match="did not stop within 1 s"):
        carry.stop_writer(str(wd), wait_s=1.0, poll_s=0.1)
      assert time.monotonic() - t < 10
    finally:
      sleeper.kill()
  assert not (tmp_path / "carry" / "cfg.tar.gz").exists()
