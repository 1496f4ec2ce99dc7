"""Fault injection on a run directory: readers during a save, a second writer, corrupt
steps, divergence between log steps, a full disk, corrupt banks, config drift, SIGTERM,
and the one-line errors of the command-line programs (see README, "What a run
directory guarantees")."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import chex
import numpy as np
import pytest

from conftest import ROOT, load_config
from exvae import bank as bank_lib
from exvae import checkpoints, config_checks, errors, eval_lib, evaluation, rundir, train_lib
from exvae.uses import commands

PY = sys.executable


def _copy(src, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _template(c):
  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  return train_lib.init_state(c, setup, splits.train_x.shape[0])


def _read(wd, c=None):
  """(state, best, meta) of the newest step, read-only; it must be good (no fallback)."""
  t = _template(c or load_config("test"))
  mngr = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)
  out = mngr.restore_latest(t, t.params)
  assert mngr.fallbacks == [], mngr.fallbacks
  return out


def _steps(wd):
  d = os.path.join(wd, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _snapshot(root, skip=()):
  """{relative path: (size, mtime_ns)} of every file and directory under root but the lock file."""
  skip = tuple(skip) + (rundir.LOCK_FILE,)
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(dirpath, name)
      rel = os.path.relpath(p, root)
      if rel.split(os.sep)[0] in skip:
        continue
      st = os.stat(p)
      out[rel] = (st.st_size if name in files else 0, st.st_mtime_ns)
  return out


def _cli(script, *args, env=None, timeout=300):
  cmd = [PY, os.path.join(ROOT, script), *args]
  return subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=timeout,
    env=dict(os.environ, **(env or {})),
  )


def _one_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING:absl")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------
# Readers never modify a run directory
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_readers_leave_an_in_progress_save_and_the_run_directory_untouched(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  c = load_config("test")
  # A writer in the middle of saving step 129: Orbax's temporary directory.
  tmp = os.path.join(wd, "checkpoints", "129.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(tmp, "state"))
  with open(os.path.join(tmp, "state", "partial"), "wb") as f:
    f.write(b"half a checkpoint")
  outputs = (
    "eval_metrics.json",
    "eval_samples.png",
    "per_example.npz",
    "uses",
  )  # readers write these
  before = _snapshot(wd, skip=outputs)
  eval_lib.evaluate(c, wd)
  bank_lib.restore_trained(c, wd)
  commands.run("knn", c, wd, ks=(3,))
  assert os.path.isdir(tmp), "a reader deleted the writer's in-progress save"
  assert _snapshot(wd, skip=outputs) == before


@pytest.mark.slow
def test_eval_with_an_out_dir_writes_nothing_into_the_run_directory(trained_dir, tmp_path):
  """eval.out_dir: a second evaluation keeps the first one's files (and the run dir) as they were."""
  wd = _copy(trained_dir, tmp_path)
  c = load_config("test")
  first = eval_lib.evaluate(c, wd)  # default: into the run directory
  before = _snapshot(wd)
  out = str(tmp_path / "elsewhere" / "eval")
  c.eval.out_dir = out
  second = eval_lib.evaluate(c, wd)
  assert _snapshot(wd) == before
  assert sorted(os.listdir(out)) == ["eval_metrics.json", "eval_samples.png", "per_example.npz"]
  assert second["per_example"] == os.path.join(out, "per_example.npz")
  assert json.load(open(os.path.join(out, "eval_metrics.json")))["test_nll"] == second["test_nll"]
  # Same checkpoint, same seeds: the same scores, wherever they are written.
  np.testing.assert_array_equal(
    np.load(first["per_example"])["log_px"], np.load(second["per_example"])["log_px"]
  )


@pytest.mark.parametrize("race", [FileNotFoundError, NotADirectoryError])
def test_a_reader_lists_again_when_a_step_is_rotated_away(trained_dir, tmp_path, monkeypatch, race):
  """Orbax lists the steps with exists() then is_dir(): a step a running writer
  deletes in between fails the listing with either error. The reader lists again."""
  wd = _copy(trained_dir, tmp_path)
  real = checkpoints.ocp.CheckpointManager
  calls = []

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) <= 2:
      raise race(f"Path is not a directory: {wd}/checkpoints/102")
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", flaky)
  m = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)
  assert len(calls) == 3 and m.all_steps() == _steps(wd)
  # A restore that finds every listed step gone lists again (reload) and races the same way.
  reloads, restores = [], []
  real_reload, real_newest = m._mngr.reload, m._restore_newest

  def flaky_reload():
    reloads.append(1)
    if len(reloads) <= 2:
      raise race("a step rotated away")
    return real_reload()

  def newest_gone_once(steps, *args):
    restores.append(steps)
    if len(restores) == 1:  # the writer rotates the newest step away
      shutil.rmtree(os.path.join(wd, "checkpoints", str(steps[-1])))
      raise checkpoints.CheckpointNotFoundError("every listed step was rotated away")
    return real_newest(steps, *args)

  monkeypatch.setattr(m._mngr, "reload", flaky_reload)
  monkeypatch.setattr(m, "_restore_newest", newest_gone_once)
  listed = m.all_steps()
  assert len(listed) >= 2, listed
  _, best, _ = m.restore_latest(None, _template(load_config("test")).params, need_state=False)
  assert len(reloads) == 3 and restores == [listed, listed[:-1]] and best is not None
  calls.clear()
  monkeypatch.setattr(checkpoints, "_LIST_ATTEMPTS", 2)  # a directory that never settles
  with pytest.raises(race):
    checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)
  assert len(calls) == 2


@pytest.mark.slow
def test_a_reader_while_training_saves_does_not_kill_the_run(tmp_path):
  wd = str(tmp_path / "live")
  p = subprocess.Popen(
    [
      PY,
      os.path.join(ROOT, "train.py"),
      f"--config={ROOT}/configs/test.py",
      f"--workdir={wd}",
      "--config.checkpoint_every_steps=2",
      "--config.keep_checkpoints=2",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  c = load_config("test")
  reads = 0
  deadline = time.time() + 240
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a step rotated away while being read
    while p.poll() is None and time.time() < deadline:
      if rundir.has_checkpoint(wd):
        bank_lib.restore_trained(c, wd)  # what uses.py does
        reads += 1
      time.sleep(0.1)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 0, err[-3000:]
  assert reads >= 3, reads


# ----------------------------------------------------------------------------
# One writer
# ----------------------------------------------------------------------------


def test_a_second_writer_gets_one_clear_line_and_changes_nothing(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  before = _snapshot(wd)
  with rundir.WorkdirLock(wd):
    with pytest.raises(errors.WorkdirLockedError, match="being written by another"):
      train_lib.train_and_evaluate(load_config("test", num_epochs=3, seed=5), wd)
    r = _cli(
      "train.py", f"--config={ROOT}/configs/test.py", f"--workdir={wd}", "--config.num_epochs=3"
    )
  assert r.returncode == 1
  line = _one_line(r.stderr)
  assert line.startswith("exvae-train: error:") and wd in line and f"pid {os.getpid()}" in line
  assert _snapshot(wd) == before


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
  wd = str(tmp_path / "w")
  code = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); from exvae import rundir; "
    "rundir.WorkdirLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"
  )
  p = subprocess.Popen([PY, "-c", code, ROOT, wd], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "locked"
  with pytest.raises(errors.WorkdirLockedError):
    rundir.WorkdirLock(wd).acquire()
  p.send_signal(signal.SIGKILL)
  p.wait()
  rundir.WorkdirLock(wd).acquire().release()  # not stale


# ----------------------------------------------------------------------------
# Config values and config drift
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "key,value",
  [
    ("keep_checkpoints", 0),
    ("checkpoint_every_steps", 0),
    ("log_every_steps", -1),
    ("val_every_epochs", 0),
    ("eval.max_queries", 0),
    ("early_stopping_patience", 0),
    ("learning_rate", float("nan")),
    ("learning_rate", float("inf")),
  ],
)
def test_bad_config_values_are_errors_naming_the_key(key, value):
  with pytest.raises(errors.ConfigError, match=key.replace(".", r"\.")):
    config_checks.check_values(load_config("test", **{key: value}))


def test_num_exemplars_and_rat_k_beyond_the_training_set_are_errors():
  c = load_config("test", **{"exemplar.num_exemplars": 5000})
  with pytest.raises(errors.ConfigError, match="num_exemplars=5000 exceeds the 1297"):
    train_lib.make_setup(c, train_lib.load_data(c))
  c = load_config("test", **{"exemplar.rat": True, "exemplar.rat_k": 65})
  with pytest.raises(errors.ConfigError, match="rat_k=65 exceeds the 64"):
    train_lib.make_setup(c, train_lib.load_data(c))


@pytest.mark.slow
def test_keep_checkpoints_zero_keeps_every_checkpoint(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  steps = _steps(wd)
  with pytest.raises(errors.ConfigError, match="keep_checkpoints"):
    train_lib.train_and_evaluate(load_config("test", num_epochs=3, keep_checkpoints=0), wd)
  assert _steps(wd) == steps


def test_resume_with_a_changed_model_or_data_is_an_error_naming_the_keys(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  stored = open(os.path.join(wd, "config.json")).read()
  before = _snapshot(wd)
  with pytest.raises(errors.ConfigDriftError, match=r"max_train 0 -> 500.*seed 0 -> 3"):
    train_lib.train_and_evaluate(load_config("test", num_epochs=3, max_train=500, seed=3), wd)
  assert _snapshot(wd) == before and open(os.path.join(wd, "config.json")).read() == stored
  # Readers too: another latent size or data set is not this run.
  with pytest.raises(errors.ConfigDriftError, match="latent_dim 4 -> 5"):
    eval_lib.evaluate(load_config("test", latent_dim=5), wd)


@pytest.mark.slow
def test_resume_with_allowed_changes_and_an_explicit_override_are_recorded(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  stored = open(os.path.join(wd, "config.json")).read()
  c = load_config(
    "test", num_epochs=3, max_steps=136, log_every_steps=7, **{"eval.num_importance_samples": 4}
  )
  s = train_lib.train_and_evaluate(c, wd)
  assert s["step"] == 136
  assert open(os.path.join(wd, "config.json")).read() == stored  # the config it started with
  rec = [json.loads(l) for l in open(os.path.join(wd, rundir.CHANGES_FILE))]
  assert rec[-1]["override"] is False
  assert rec[-1]["changes"]["num_epochs"] == [2, 3] and "log_every_steps" in rec[-1]["changes"]
  # An explicit override continues with new optimisation settings and records them.
  c = load_config("test", num_epochs=3, max_steps=140, learning_rate=1e-4)
  train_lib.train_and_evaluate(c, wd, allow_config_change=True)
  rec = json.loads(open(os.path.join(wd, rundir.CHANGES_FILE)).read().splitlines()[-1])
  assert rec["override"] is True and rec["changes"]["learning_rate"] == [5e-4, 1e-4]
  assert json.load(open(os.path.join(wd, "config.json")))["learning_rate"] == 1e-4


def test_keys_an_older_config_json_lacks_are_accepted_with_a_warning(
  trained_dir, tmp_path, monkeypatch
):
  wd = _copy(trained_dir, tmp_path)
  path = os.path.join(wd, "config.json")
  stored = json.load(open(path))
  del stored["exemplar"]["loo"], stored["pool_sharding"]  # "written by an older version"
  json.dump(stored, open(path, "w"))
  # An older version's checkpoints record no config either (the same deletion in a run
  # whose checkpoints record its config.json is an edit: tests/test_integrity.py).
  monkeypatch.setattr(checkpoints, "recorded_config", lambda directory: None)
  with pytest.warns(UserWarning, match="exemplar.loo"):
    assert train_lib.train_and_evaluate(load_config("test"), wd)["finished"]
  allowed, forbidden, unknown = rundir.diff_configs(
    {"a": 1, "eval": {"seed": 0}, "z": 1, "progress": True},
    {"a": 2, "eval": {"seed": 1, "reuse": True}, "new": 3},
  )
  assert forbidden == {"a": (1, 2)} and allowed == {"eval.seed": (0, 1)}
  # Keys only one side has are said, unless they may change anyway (eval.reuse, progress).
  assert unknown == ["new", "z"]


# ----------------------------------------------------------------------------
# Corrupt steps, divergence, a full disk, SIGTERM, metrics.jsonl
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_corrupt_newest_step_is_replaced_when_training_writes_it_again(
  trained_dir, tmp_path, capfd
):
  wd = _copy(trained_dir, tmp_path)
  ref_state, ref_best, _ = _read(trained_dir)
  newest = _steps(wd)[-1]
  for root, _, files in os.walk(os.path.join(wd, "checkpoints", str(newest), "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  capfd.readouterr()
  train_lib.train_and_evaluate(load_config("test"), wd)  # retrains the last steps
  err = [l for l in capfd.readouterr().err.splitlines() if "failed to restore" in l]
  assert len(err) == 1 and "unreadable_checkpoints" in err[0]
  state, best, meta = _read(wd)  # no fallback warning: the newest step is readable
  assert int(state.step) == newest and _steps(wd)[-1] == newest
  chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(best, ref_best, rtol=1e-5, atol=1e-6)
  assert os.listdir(os.path.join(wd, "unreadable_checkpoints"))  # set aside, not deleted


@pytest.mark.slow
def test_divergence_between_log_steps_is_never_saved_as_good(tmp_path):
  wd = str(tmp_path / "div")
  c = load_config("test", log_every_steps=7, checkpoint_every_steps=3, learning_rate=1e6)
  with pytest.raises(train_lib.NonFiniteLossError) as e:
    train_lib.train_and_evaluate(c, wd)
  steps = _steps(wd)
  if not steps:
    assert "No checkpoint was written" in str(e.value) and "intact" not in str(e.value)
    with pytest.raises(checkpoints.CheckpointNotFoundError):
      eval_lib.evaluate(c, wd)
    return
  assert f"(step {steps[-1]}) is intact" in str(e.value)
  t = _template(c)
  for step in steps:  # every saved step is a good one
    out = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)._restore(
      step, t, t.params
    )
    assert int(out["state"].nonfinite) == 0


def test_eval_refuses_to_write_non_finite_metrics(trained_dir, tmp_path, monkeypatch):
  wd = _copy(trained_dir, tmp_path)
  real = evaluation.evaluate_split

  def diverged(*args, **kwargs):
    out = real(*args, **kwargs)
    return dict(out, log_px_iwae=np.full_like(out["log_px_iwae"], np.nan))

  monkeypatch.setattr(evaluation, "evaluate_split", diverged)
  with pytest.raises(errors.NonFiniteMetricsError, match="test_nll=nan.*not written"):
    eval_lib.evaluate(load_config("test"), wd)
  assert not os.path.exists(os.path.join(wd, "eval_metrics.json"))


@pytest.mark.slow
def test_a_full_disk_stops_training_at_the_first_failed_save(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  wd = str(tmp_path / "full")
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if f"{os.sep}checkpoints{os.sep}30." in str(self.get()):  # the third save: disk full
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  with pytest.raises(errors.DiskFullError) as e:
    train_lib.train_and_evaluate(load_config("test", max_steps=40), wd)
  msg = str(e.value)
  assert os.path.join(wd, "checkpoints") in msg and "free" in msg and "needs about" in msg
  assert _steps(wd) == [10, 20]  # the good ones, nothing after the failed save
  logged = [json.loads(l).get("step", 0) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(logged) <= 30  # stopped at the failed save
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", real)
  assert train_lib.train_and_evaluate(load_config("test", max_steps=40), wd)["step"] == 40


@pytest.mark.slow
def test_metrics_have_no_duplicate_or_missing_steps_after_a_resume(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  newest = _steps(wd)[-1]
  # A run killed after logging past its last save: drop the newest step.
  shutil.rmtree(os.path.join(wd, "checkpoints", str(newest)))
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"loss": 1.0, "step": 1')  # a torn last line
  train_lib.train_and_evaluate(load_config("test", num_epochs=3), wd)
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train_steps = [r["step"] for r in recs if "loss" in r]
  assert train_steps == sorted(set(train_steps)), "duplicate steps"
  assert train_steps == [s for s in range(1, 193) if s % 5 == 0 or s % 64 == 0]
  epochs = [r["epoch"] for r in recs if "val_loss" in r]
  assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_one_line(tmp_path):
  wd = str(tmp_path / "term")
  p = subprocess.Popen(
    [
      PY,
      os.path.join(ROOT, "train.py"),
      f"--config={ROOT}/configs/test.py",
      f"--workdir={wd}",
      "--config.num_epochs=1000",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  deadline = time.time() + 240
  while not rundir.has_checkpoint(wd) and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  line = _one_line(err)
  assert line.startswith("exvae-train: stopped: SIGTERM at step ") and "Traceback" not in err
  step = int(line.split("step ")[1].split(":")[0])
  assert _steps(wd)[-1] == step


# ----------------------------------------------------------------------------
# Banks: provenance and corrupt files
# ----------------------------------------------------------------------------


def test_a_bank_of_another_model_is_refused_unless_allowed(trained_dir, tmp_path):
  wd = _copy(trained_dir, tmp_path)
  c = load_config("test")
  own = commands.run("bank", c, wd, str(tmp_path / "own"))["path"]
  assert commands.run("knn", c, wd, str(tmp_path / "o"), bank_path=own, ks=(3,))
  bank = bank_lib.ExemplarBank.load(own)
  other = str(tmp_path / "other.npz")  # same d, built by another run's encoder
  dataclasses.replace(
    bank, metadata=dict(bank.metadata, model_fingerprint="0123456789abcdef", workdir="/elsewhere")
  ).save(other)
  for cmd in ("knn", "grow", "generate"):
    with pytest.raises(bank_lib.BankMismatchError, match=f"{other} was built from another"):
      commands.run(cmd, c, wd, str(tmp_path / cmd), bank_path=other, ks=(3,))
  with pytest.warns(UserWarning, match="another model .* Used anyway"):  # allowed, but said
    r = commands.run("grow", c, wd, str(tmp_path / "g"), bank_path=other, allow_bank_mismatch=True)
  grown = bank_lib.ExemplarBank.load(r["path"])
  assert grown.metadata["model_fingerprint"].startswith("mixed:")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_bank", "nan"])
def test_corrupt_bank_files_name_the_file_and_the_problem(tmp_path, damage):
  path = str(tmp_path / "bank.npz")
  bank = bank_lib.ExemplarBank(
    codes=np.ones((50, 4), np.float32),
    ids=np.arange(50),
    labels=None,
    log_var=0.0,
    metadata={"image_shape": [8, 8, 1]},
  )
  bank.save(path)
  data = open(path, "rb").read()
  if damage == "truncate":
    open(path, "wb").write(data[: len(data) // 2])
  elif damage == "garbage":
    open(path, "wb").write(b"\x13\x37" * 100)
  elif damage == "empty":
    open(path, "wb").close()
  elif damage == "not_a_bank":
    with open(path, "wb") as f:
      np.savez(f, x=np.zeros(3))
  else:
    dataclasses.replace(bank, codes=np.full((50, 4), np.nan, np.float32)).save(path)
  with pytest.raises(bank_lib.BankFileError) as e:
    bank_lib.ExemplarBank.load(path)
  msg = str(e.value)
  assert path in msg and "uses.py bank" in msg and "allow_pickle" not in msg
  assert isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------
# The command-line programs: one line, non-zero exit, traceback on request
# ----------------------------------------------------------------------------


def test_cli_errors_are_one_line_with_the_traceback_on_request(tmp_path):
  wd = str(tmp_path / "none")
  r = _cli("eval.py", f"--config={ROOT}/configs/test.py", f"--workdir={wd}")
  assert r.returncode == 1 and "Train first" in _one_line(r.stderr)
  r = _cli(
    "train.py",
    f"--config={ROOT}/configs/test.py",
    f"--workdir={wd}",
    "--config.checkpoint_every_steps=0",
  )
  assert r.returncode == 1 and "checkpoint_every_steps must be >= 1" in _one_line(r.stderr)
  assert not os.path.exists(os.path.join(wd, "config.json"))
  r = _cli(
    "uses.py",
    "knn",
    f"--config={ROOT}/configs/test.py",
    f"--workdir={wd}",
    env={"EXVAE_TRACEBACK": "1"},
  )
  assert r.returncode != 0 and "Traceback" in r.stderr and "Train first" in r.stderr


def test_a_command_reports_expected_errors_in_one_line(capsys, monkeypatch):
  monkeypatch.delenv("EXVAE_TRACEBACK", raising=False)
  from exvae.cli import exits

  # fail() ends a process and ignores SIGINT/SIGTERM for its teardown; not this one's.
  monkeypatch.setattr(exits, "settle", lambda: None)

  def fails(exc):
    def main(argv):  # as command.run ends a command that raised
      try:
        raise exc
      except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        exits.fail("exvae-test", e)

    return main

  cases = [
    (errors.DiskFullError("Disk full while saving checkpoint step 3 in /x"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (errors.Interrupted("SIGTERM at step 3"), 143),
    (bank_lib.BankFileError("b.npz is corrupt"), 1),
  ]
  for exc, code in cases:
    with pytest.raises(SystemExit) as e:
      fails(exc)([])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
  with pytest.raises(KeyError):  # a bug keeps its traceback
    fails(KeyError("internal"))([])


def test_the_typed_errors_have_one_import_path():
  """The run directory's errors are imported from exvae.errors: exvae.rundir, which raises
  most of them, does not also hand them out as names of its own."""
  own = [
    n
    for n, v in vars(errors).items()
    if not n.startswith("_") and getattr(v, "__module__", None) == errors.__name__
  ]
  assert {"RunDirError", "ConfigDriftError", "WorkdirLockedError", "is_disk_full"} <= set(own)
  assert [n for n in own if hasattr(rundir, n)] == []


_TEARDOWN_SCRIPT = r"""
import atexit, sys, time
from exvae.cli import command

def main(inv):
  # Stands in for the second of teardown that JAX, XLA and Orbax take at exit.
  atexit.register(time.sleep, 1.5)
  print("decided", flush=True)
  if inv.args == ["fail"]:
    raise FileNotFoundError("no such thing")

command.run(command.Spec(name="probe", module="__main__", summary="", usage="",
                         config="none", positional=(0, 1)), main, ["exvae-probe", *sys.argv[1:]])
"""


@pytest.mark.parametrize("how,code", [("ok", 0), ("fail", 1)])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_teardown_keeps_the_decided_exit(how, code, sig):
  """A Ctrl-C or SIGTERM after a command has finished (or said why it failed) arrives
  while the interpreter tears down; the command's exit code and its lines stand (with
  the default handlers: exit -2 / -15 with no line, or an exit hook's traceback)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("EXVAE_TRACEBACK", None)
  p = subprocess.Popen(
    [PY, "-c", _TEARDOWN_SCRIPT] + ([how] if how == "fail" else []),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  assert p.stdout.readline().strip() == "decided"
  if how == "fail":
    first = p.stderr.readline()
  time.sleep(0.5)  # past the one line, inside the 1.5 s exit hook
  assert p.poll() is None
  p.send_signal(getattr(signal, sig))
  out, err = p.communicate(timeout=60)
  assert p.returncode == code, (p.returncode, err)
  lines = ([first] if how == "fail" else []) + err.splitlines()
  lines = [l.strip() for l in lines if l.strip()]
  assert lines == ([] if how == "ok" else ["exvae-probe: error: no such thing"]), lines
