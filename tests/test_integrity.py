"""Nothing silently wrong: checksummed checkpoints, config.json that cannot be read, a
non-finite validation loss, a history that never shrinks, evaluation outputs written
as one unit, strict JSON and one-line errors (see README, "What a run directory
guarantees")."""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, leftover_temporaries, load_config, load_script
from exvae import atomic, checkpoints, errors, eval_lib, evaluation, rundir, train_lib, writers
from test_faults import _copy, _steps, _template

PY = sys.executable
SMALL = dict(max_steps=40)  # configs/test.py: checkpoints at 10, 20, 30, 40 (keeps 3)


@pytest.fixture(scope="module")
def run40(tmp_path_factory):
  """40 steps of configs/test.py (inside its first epoch): steps 20, 30, 40 kept."""
  wd = str(tmp_path_factory.mktemp("integrity") / "run")
  train_lib.train_and_evaluate(load_config("test", **SMALL), wd)
  return wd


def _flip(path, n=16):
  data = bytearray(open(path, "rb").read())
  lo = max(0, min(len(data) // 2, len(data) - n))
  for i in range(lo, min(lo + n, len(data))):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _step_files(wd, step):
  root = os.path.join(wd, "checkpoints", str(step))
  return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def _strict_json(text):
  def refuse(name):
    raise ValueError(f"bare {name} in JSON")

  return json.loads(text, parse_constant=refuse)


def _cli(script, *args, timeout=300):
  return subprocess.run(
    [PY, os.path.join(ROOT, script), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=timeout,
  )


def _one_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING:absl")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------
# Checkpoint digests
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_flipped_byte_in_any_file_of_the_newest_step_is_detected(run40, tmp_path, capfd):
  """16 flipped bytes in each file of the newest step in turn: a reader falls back, one line."""
  c = load_config("test", **SMALL)
  t = _template(c)
  newest, previous = _steps(run40)[-1], _steps(run40)[-2]
  files = _step_files(run40, newest)
  assert any("ocdbt.process_0" in f for f in files) and checkpoints.FILES_DIGEST in files
  capfd.readouterr()
  for rel in files:
    wd = _copy(run40, tmp_path, "f" + str(abs(hash(rel))))
    _flip(os.path.join(wd, "checkpoints", str(newest), rel))
    m = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)
    state, _, _ = m.restore_latest(t, t.params)
    assert (int(state.step), m.fallbacks) == (previous, [newest]), rel
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"using step {previous}" in err, (rel, err)
    assert _steps(wd)[-1] == newest  # a reader changes nothing
    shutil.rmtree(wd)


@pytest.mark.slow
def test_eval_and_resume_detect_a_corrupt_array_file(run40, tmp_path, capfd):
  c = load_config("test", **SMALL)
  newest, previous = _steps(run40)[-1], _steps(run40)[-2]
  # The largest data file of the train state: parameter and optimiser values.
  data = [f for f in _step_files(run40, newest) if f.startswith("state/ocdbt.process_0/d/")]
  rel = max(data, key=lambda f: os.path.getsize(os.path.join(run40, "checkpoints", str(newest), f)))
  wd = _copy(run40, tmp_path)
  _flip(os.path.join(wd, "checkpoints", str(newest), rel))
  capfd.readouterr()
  metrics = eval_lib.evaluate(c, wd)
  assert metrics["checkpoint_step"] == previous
  assert "failed to restore or verify" in capfd.readouterr().err
  # Resume: the bad step is set aside (not deleted) and trained again from the previous one.
  train_lib.train_and_evaluate(load_config("test", max_steps=newest), wd)
  assert _steps(wd)[-1] == newest
  aside = os.listdir(os.path.join(wd, "unreadable_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith(f"{newest}-")
  ref = checkpoints.Manager(os.path.join(run40, "checkpoints"), read_only=True)
  got = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True)
  t = _template(c)
  a, b = ref.restore_latest(t, t.params), got.restore_latest(t, t.params)
  assert got.fallbacks == [] and got.verified
  assert checkpoints.tree_digest(a[0]) == checkpoints.tree_digest(b[0])  # bit-identical


def test_a_checkpoint_without_digests_restores_unverified(tmp_path):
  """Steps written before digests existed (no ``digest`` item, no file record) still restore."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  d = str(tmp_path / "checkpoints")
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  best = {"w": jnp.ones((2, 3))}
  old = ocp.CheckpointManager(
    d,
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
    item_names=("state", "best", "meta"),
  )
  old.save(
    3,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      best=ocp.args.StandardSave(best),
      meta=ocp.args.JsonSave({"epoch": 1}),
    ),
  )
  old.wait_until_finished()
  old.close()
  r = checkpoints.Manager(d, read_only=True)
  s, b, meta = r.restore_latest(state, best)
  assert r.verified is False and r.fallbacks == [] and meta == {"epoch": 1}
  np.testing.assert_array_equal(np.asarray(s["w"]), np.asarray(state["w"]))


def test_no_good_step_left_is_refused_in_one_line(run40, tmp_path):
  c = load_config("test", **SMALL)
  t = _template(c)
  wd = _copy(run40, tmp_path)
  for step in _steps(wd):
    _flip(os.path.join(wd, "checkpoints", str(step), "meta", "metadata"))
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="can be used") as e:
    checkpoints.Manager(os.path.join(wd, "checkpoints")).restore_latest(t, t.params)
  assert "\n" not in str(e.value)
  assert not os.path.exists(os.path.join(wd, "unreadable_checkpoints"))  # nothing moved


def test_a_resume_that_changes_shapes_is_one_clear_error(run40, tmp_path, capfd):
  """An allowed latent-size change cannot load the run's arrays: an error naming the shapes,
  and nothing claims that the refused change was recorded."""
  wd = _copy(run40, tmp_path)
  capfd.readouterr()
  with pytest.raises(errors.CheckpointMismatchError, match=r"another model .* there and"):
    train_lib.train_and_evaluate(
      load_config("test", max_steps=50, latent_dim=5), wd, allow_config_change=True
    )
  assert not os.path.exists(os.path.join(wd, "unreadable_checkpoints"))
  assert _steps(wd) == _steps(run40)
  assert not os.path.exists(os.path.join(wd, rundir.CHANGES_FILE))
  said = capfd.readouterr().out
  assert "latent_dim" in said and "(recorded in config_changes.jsonl)" not in said
  assert "once this run saves a checkpoint" in said


# ----------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_an_unreadable_or_missing_config_json_counts_as_drift(run40, tmp_path, damage):
  wd = _copy(run40, tmp_path)
  path = os.path.join(wd, rundir.CONFIG_FILE)
  if damage == "garbage":
    open(path, "wb").write(b"\x00{not json")
  else:
    os.remove(path)
  before = open(path, "rb").read() if damage == "garbage" else None
  c = load_config("test", max_steps=50, learning_rate=1e-4)
  problem = {"garbage": "unreadable", "missing": "missing"}[damage]
  with pytest.raises(errors.ConfigDriftError, match=f"config.json is {problem}"):
    train_lib.train_and_evaluate(c, wd)
  assert (open(path, "rb").read() if os.path.exists(path) else None) == before
  assert not os.path.exists(os.path.join(wd, rundir.CHANGES_FILE))
  train_lib.train_and_evaluate(c, wd, allow_config_change=True)
  assert json.load(open(path))["learning_rate"] == 1e-4
  rec = json.loads(open(os.path.join(wd, rundir.CHANGES_FILE)).read().splitlines()[-1])
  assert rec["override"] is True and rec["stored_config"].startswith(problem)
  if damage == "garbage":
    kept = glob.glob(path + ".unreadable-*")
    assert len(kept) == 1 and open(kept[0], "rb").read() == before


# ----------------------------------------------------------------------------
# A non-finite validation loss; strict JSON
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_non_finite_validation_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path / "nan")
  c = load_config("test", max_train=200, num_epochs=3)  # 10 steps per epoch
  real = train_lib.validate

  def nan_at_epoch_2(state, setup, pool, splits, config, workdir, epoch):
    out = real(state, setup, pool, splits, config, workdir, epoch)
    return dict(out, val_loss=float("nan")) if epoch == 1 else out

  monkeypatch.setattr(train_lib, "validate", nan_at_epoch_2)
  with pytest.raises(
    train_lib.NonFiniteValidationError, match=r"epoch 2 \(step 20.*last good checkpoint \(step 10\)"
  ) as e:
    train_lib.train_and_evaluate(c, wd)
  assert isinstance(e.value, FloatingPointError) and "\n" not in str(e.value)
  assert _steps(wd) == [10]
  t = _template(c)
  _, _, meta = checkpoints.Manager(os.path.join(wd, "checkpoints"), read_only=True).restore_latest(
    t, t.params
  )
  assert meta["best_epoch"] == 0 and np.isfinite(meta["best_val"])
  for line in open(os.path.join(wd, "metrics.jsonl")):
    rec = _strict_json(line)
    assert rec["step"] <= 20 and "val_loss" not in rec or rec["epoch"] == 1


def test_every_json_exvae_writes_is_strict(tmp_path):
  with pytest.raises(ValueError):
    atomic.write_json(str(tmp_path / "x.json"), {"a": float("nan")})
  assert not os.listdir(tmp_path)  # nothing, not even a temp
  line = atomic.dumps(atomic.finite_or_none({"a": float("inf"), "b": [1.0, float("nan")]}))
  assert _strict_json(line) == {"a": None, "b": [1.0, None]}
  path = str(tmp_path / "m.jsonl")
  train_lib._append_jsonl(path, {"step": 5, "loss": float("nan"), "kl": 1.5})
  assert _strict_json(open(path).read()) == {"step": 5, "loss": None, "kl": 1.5}


# ----------------------------------------------------------------------------
# History is append-only
# ----------------------------------------------------------------------------


def test_a_fresh_start_over_an_earlier_history_is_refused_unless_overwrite(run40, tmp_path):
  wd = _copy(run40, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  metrics = open(os.path.join(wd, "metrics.jsonl")).read()
  config = open(os.path.join(wd, "config.json")).read()
  c = load_config("test", max_steps=10, learning_rate=1e-3)
  with pytest.raises(errors.HistoryError, match="--overwrite") as e:
    train_lib.train_and_evaluate(c, wd)
  assert "\n" not in str(e.value)
  assert open(os.path.join(wd, "metrics.jsonl")).read() == metrics
  assert open(os.path.join(wd, "config.json")).read() == config
  train_lib.train_and_evaluate(c, wd, overwrite=True)
  prev = glob.glob(os.path.join(wd, rundir.PREVIOUS_DIR, "*"))
  assert len(prev) == 1
  assert open(os.path.join(prev[0], "metrics.jsonl")).read() == metrics
  assert open(os.path.join(prev[0], "config.json")).read() == config
  assert glob.glob(os.path.join(prev[0], "events.out.tfevents.*"))  # not mixed with the new
  assert json.load(open(os.path.join(wd, "config.json")))["learning_rate"] == 1e-3


def test_a_run_killed_before_its_first_save_starts_again(tmp_path):
  """Records up to the first save and an empty checkpoints/ are that run's own: no refusal."""
  wd = str(tmp_path / "early")
  os.makedirs(os.path.join(wd, "checkpoints"))
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"loss": 50.0, "step": 5, "epoch": 5 / 64, "time": 1.0}) + "\n")
  assert train_lib.train_and_evaluate(load_config("test", max_steps=10), wd)["step"] == 10
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in recs if "loss" in r] == [5, 10]


@pytest.mark.slow
def test_a_torn_metrics_file_is_reported_in_one_line(run40, tmp_path, capfd):
  wd = _copy(run40, tmp_path)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"loss": 1.0, "st')
  capfd.readouterr()
  train_lib.train_and_evaluate(load_config("test", max_steps=45), wd)
  err = [l for l in capfd.readouterr().err.splitlines() if "metrics.jsonl" in l]
  assert len(err) == 1 and "torn" in err[0]
  # A metrics file cut short (an older copy) is reported too.
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).readlines()
  open(path, "w").writelines(lines[:3])
  capfd.readouterr()
  train_lib.train_and_evaluate(load_config("test", max_steps=50), wd)
  err = [l for l in capfd.readouterr().err.splitlines() if "metrics.jsonl" in l]
  assert len(err) == 1 and "are lost" in err[0]


def test_tensorboard_agrees_with_metrics_after_a_resume(run40, tmp_path):
  pytest.importorskip("tensorboard")
  wd = _copy(run40, tmp_path)
  # A stop after logging past the last save (steps 35, 40 are trained and logged again),
  # and an event file that lost its tail (a kill before TensorBoard flushed).
  shutil.rmtree(os.path.join(wd, "checkpoints", "40"))
  for p in glob.glob(os.path.join(wd, "events.out.tfevents.*")):
    os.truncate(p, os.path.getsize(p) // 2)
  train_lib.train_and_evaluate(load_config("test", max_steps=50), wd)
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  steps = [r["step"] for r in recs if "loss" in r]
  assert steps == list(range(5, 55, 5))
  assert [s for s, _ in writers.read_scalars(wd)["train/loss"]] == steps
  assert len(glob.glob(os.path.join(wd, "events.out.tfevents.*"))) == 1


# ----------------------------------------------------------------------------
# Evaluation outputs are one unit
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_outputs_are_one_unit_and_a_failed_write_leaves_the_old_ones(
  run40, tmp_path, monkeypatch
):
  wd = _copy(run40, tmp_path)
  c = load_config("test", **SMALL)
  first = eval_lib.evaluate(c, wd)
  assert eval_lib.check_outputs(wd)["test_nll"] == first["test_nll"]
  names = sorted(eval_lib.OUTPUTS)
  before = {n: open(os.path.join(wd, n), "rb").read() for n in names}
  real = atomic.sha256_file
  calls = []

  def disk_full_at_the_second_file(path):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(path)

  monkeypatch.setattr(atomic, "sha256_file", disk_full_at_the_second_file)
  c.eval.seed = 5  # other numbers than the first evaluation
  with pytest.raises(errors.DiskFullError, match="Disk full while writing"):
    eval_lib.evaluate(c, wd)
  assert {n: open(os.path.join(wd, n), "rb").read() for n in names} == before
  assert not leftover_temporaries(wd) and not glob.glob(os.path.join(wd, "*.tmp*"))
  monkeypatch.setattr(atomic, "sha256_file", real)
  # A torn set (per_example.npz of another evaluation) is detected.
  other = str(tmp_path / "other")
  c.eval.out_dir = other
  eval_lib.evaluate(c, wd)
  shutil.copy(os.path.join(other, "per_example.npz"), os.path.join(wd, "per_example.npz"))
  with pytest.raises(ValueError, match="per_example.npz is not the file"):
    eval_lib.check_outputs(wd)


def test_a_stopped_evaluation_resumes_where_it_stopped(run40, tmp_path, monkeypatch, capfd):
  """eval_partial.npz keeps the finished batches of an evaluation: started again, it scores
  only the rest and ends with the per-example scores of an uninterrupted evaluation; saved
  scores of another seed or a torn file are not reused; the file goes once the outputs are
  written."""
  import functools

  c = load_config("test", **SMALL)
  c.eval.max_queries = 32  # S = 16: 2 images per batch, 20 batches
  c.eval.out_dir = str(tmp_path / "whole")
  eval_lib.evaluate(c, run40)
  whole = dict(np.load(tmp_path / "whole" / "per_example.npz"))
  monkeypatch.setattr(
    evaluation, "evaluate_split", functools.partial(evaluation.evaluate_split, save_every_s=0.0)
  )
  real, calls, stop_at = evaluation.eval_batch, [], [8]

  def counting(*a, **k):
    calls.append(1)
    if len(calls) == stop_at[0]:
      raise KeyboardInterrupt  # stopped in the 8th batch
    return real(*a, **k)

  monkeypatch.setattr(evaluation, "eval_batch", counting)
  out = tmp_path / "stopped"
  c.eval.out_dir = str(out)
  with pytest.raises(KeyboardInterrupt):
    eval_lib.evaluate(c, run40)
  partial = out / eval_lib.PARTIAL
  assert int(np.load(partial)["done_batches"]) == 7 and not (out / "per_example.npz").exists()
  # scripts/run_status.py reads how far the stopped evaluation got from the same file.
  st = load_script("scripts/run_status.py")._eval_state(
    run40, {"eval": {"out_dir": str(out)}}, time.time()
  )
  assert (st["eval"], st["eval_done"], st["eval_total"]) == ("running", 14, 40)
  kept = partial.read_bytes()
  calls.clear()
  stop_at[0] = 0
  eval_lib.evaluate(c, run40)
  assert len(calls) == 13 and "resuming after 14 of 40 examples" in capfd.readouterr().out
  got = dict(np.load(out / "per_example.npz"))
  for k in ("log_px", "elbo", "recon", "kl"):
    np.testing.assert_array_equal(got[k], whole[k], err_msg=k)
  assert not partial.exists() and not os.listdir(run40).count(eval_lib.PARTIAL)
  # Saved scores of another evaluation seed, or a torn file: every batch again.
  for damage, seed in (("other seed", 7), ("torn", c.eval.seed)):
    partial.write_bytes(kept if damage == "other seed" else kept[:100])
    c.eval.seed = seed
    calls.clear()
    eval_lib.evaluate(c, run40)
    said = capfd.readouterr().out
    assert (
      len(calls) == 20
      and (
        "other parameters or settings"
        if damage == "other seed"
        else "unreadable partial evaluation"
      )
      in said
    ), damage


def test_a_finished_evaluation_is_reused_only_when_nothing_it_depends_on_changed(
  run40, tmp_path, monkeypatch, capfd
):
  """Evaluating again with the same parameters, test images and settings returns the
  outputs already there without scoring an image; another seed, eval.reuse=False or outputs
  that fail their digests are scored again."""
  c = load_config("test", **SMALL)
  out = tmp_path / "e"
  c.eval.out_dir = str(out)
  first = eval_lib.evaluate(c, run40)
  files = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in eval_lib.OUTPUTS}
  real, calls = evaluation.eval_batch, []
  monkeypatch.setattr(evaluation, "eval_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
  capfd.readouterr()

  again = eval_lib.evaluate(c, run40)
  assert calls == [] and again["reused"] and "already done" in capfd.readouterr().out
  assert again["test_nll"] == first["test_nll"]
  assert again["identity_sha256"] == first["identity_sha256"]
  assert {
    n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in eval_lib.OUTPUTS
  } == files  # nothing rewritten
  # Settings that only say how to show or where to write are not part of the identity.
  c.progress = not c.progress
  assert eval_lib.evaluate(c, run40)["reused"] and calls == []
  # A finished evaluation moved elsewhere is reused there, and what it returns points there.
  moved = tmp_path / "moved"
  shutil.copytree(out, moved)
  c.eval.out_dir = str(moved)
  there = eval_lib.evaluate(c, run40)
  assert there["reused"] and calls == []
  assert there["samples_png"] == str(moved / "eval_samples.png")
  assert there["per_example"] == str(moved / "per_example.npz")
  c.eval.out_dir = str(out)

  c.eval.reuse = False
  assert "reused" not in eval_lib.evaluate(c, run40) and calls
  c.eval.reuse = True
  calls.clear()
  c.eval.seed = 3
  other = eval_lib.evaluate(c, run40)
  assert calls and "not this evaluation" in capfd.readouterr().out
  assert other["identity_sha256"] != first["identity_sha256"]
  assert other["test_nll"] != first["test_nll"]
  # Outputs that fail their digests are scored again and replaced.
  _flip(str(out / "per_example.npz"))
  calls.clear()
  redone = eval_lib.evaluate(c, run40)
  assert calls and "do not check" in capfd.readouterr().out and "reused" not in redone
  assert eval_lib.check_outputs(str(out))["test_nll"] == other["test_nll"] == redone["test_nll"]


@pytest.mark.slow
def test_exvae_eval_run_twice_writes_its_tensorboard_scalars_once(run40, tmp_path):
  out = str(tmp_path / "e")
  args = (
    f"--config={ROOT}/configs/test.py",
    f"--workdir={run40}",
    "--config.max_steps=40",
    f"--config.eval.out_dir={out}",
  )
  r1, r2 = _cli("eval.py", *args), _cli("eval.py", *args)
  assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
  assert "already done" in r2.stdout and "already done" not in r1.stdout
  assert r1.stdout.splitlines()[-1] == r2.stdout.splitlines()[-1]  # the same test NLL line
  assert len(glob.glob(os.path.join(out, "events.out.tfevents.*"))) == 1


# ----------------------------------------------------------------------------
# One line on every expected failure
# ----------------------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory and a read-only bind mount of it (needs root; skipped otherwise)."""
  src, ro = tmp_path / "rw", tmp_path / "ro"
  src.mkdir()
  ro.mkdir()
  ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
  if ok:
    ok = (
      subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode
      == 0
    )
    if not ok:
      subprocess.run(["umount", str(ro)], capture_output=True)
  if not ok:
    pytest.skip("a read-only bind mount needs root")
  yield str(src), str(ro)
  subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line(run40, read_only_dir, tmp_path):
  src, ro = read_only_dir
  shutil.copytree(run40, os.path.join(src, "run"))
  wd = os.path.join(ro, "run")
  with pytest.raises(errors.ReadOnlyError, match="Read-only file system"):
    train_lib.train_and_evaluate(load_config("test", max_steps=50), wd)  # resume
  with pytest.raises(errors.ReadOnlyError):
    train_lib.train_and_evaluate(load_config("test"), os.path.join(ro, "new"))  # a new run
  with pytest.raises(errors.ReadOnlyError, match="out_dir"):
    eval_lib.evaluate(load_config("test", **SMALL), wd)  # in place
  r = _cli(
    "train.py", f"--config={ROOT}/configs/test.py", f"--workdir={wd}", "--config.max_steps=50"
  )
  assert r.returncode == 1 and _one_line(r.stderr).startswith("exvae-train: error: Cannot write")


# ----------------------------------------------------------------------------
# metrics.jsonl on resume: one strict record per step, the rest set aside
# ----------------------------------------------------------------------------


def test_a_resume_sets_damaged_non_finite_and_duplicated_metric_lines_aside(tmp_path, capfd):
  path = tmp_path / "metrics.jsonl"
  good = [{"loss": 1.0 * s, "step": s, "epoch": s / 10} for s in (5, 10, 15, 20)]
  lines = [
    json.dumps(good[0]),
    json.dumps(good[1]),
    '{"loss": 2.0, "st',  # damaged
    '{"loss": NaN, "step": 12}',
    json.dumps(good[1]),  # NaN, dup
    json.dumps({"val_loss": 3.0, "step": 10, "epoch": 1}),
    json.dumps(good[2]),
    json.dumps(good[3]),
    json.dumps({"loss": 9.0, "step": 25}),
  ]  # after
  path.write_text("\n".join(lines) + "\n")
  capfd.readouterr()
  assert rundir.trim_metrics(str(path), 20) == 4
  kept = [_strict_json(l) for l in path.read_text().splitlines()]
  assert kept == good[:2] + [{"val_loss": 3.0, "step": 10, "epoch": 1}] + good[2:]
  aside = [_strict_json(l) for l in (tmp_path / rundir.REJECTED_FILE).read_text().splitlines()]
  assert [(r["line"], r["reason"], r["text"]) for r in aside] == [
    (3, "torn", lines[2]),
    (4, "non-finite", lines[3]),
    (5, "duplicate", lines[4]),
    (9, "after_checkpoint", lines[8]),
  ]
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "1 torn, 1 non-finite, 1 duplicate" in err[0], err
  assert rundir.trim_metrics(str(path), 20) == 0  # nothing more to set aside


# ----------------------------------------------------------------------------
# A run's config.json is the one its checkpoints were saved with
# ----------------------------------------------------------------------------


def _edit_config(wd, **changes):
  path = os.path.join(wd, "config.json")
  c = json.load(open(path))
  for key, value in changes.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  atomic.write_json(path, c)


def test_an_edited_config_json_is_refused_by_readers_and_by_a_resume(run40, tmp_path):
  from exvae import config_registry

  wd = _copy(run40, tmp_path)
  rec = checkpoints.recorded_config(os.path.join(wd, "checkpoints"))
  assert rec["step"] == 40 and rec["config"] == json.load(open(os.path.join(wd, "config.json")))
  flipped = not rec["config"]["exemplar"]["binarize_exemplars"]
  _edit_config(wd, **{"exemplar.binarize_exemplars": flipped})
  edited = config_registry.from_json(os.path.join(wd, "config.json"))  # no --config given
  with pytest.raises(errors.ConfigDriftError, match="edited since .*binarize_exemplars"):
    eval_lib.evaluate(edited, wd)
  before = {n: open(os.path.join(wd, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
  edited.max_steps = 50
  with pytest.raises(errors.ConfigDriftError, match="checkpoint step 40 was saved with"):
    train_lib.train_and_evaluate(edited, wd)
  assert _steps(wd)[-1] == 40 and not os.path.exists(os.path.join(wd, rundir.CHANGES_FILE))
  assert {n: open(os.path.join(wd, n), "rb").read() for n in before} == before
  # A deliberate change goes through --allow_config_change and is recorded.
  train_lib.train_and_evaluate(edited, wd, allow_config_change=True)
  changes = [json.loads(l) for l in open(os.path.join(wd, rundir.CHANGES_FILE))]
  assert changes[0]["edited_config_json"] and changes[0]["changes"] == {
    "exemplar.binarize_exemplars": [not flipped, flipped]
  }
  after = checkpoints.recorded_config(os.path.join(wd, "checkpoints"))
  assert after["step"] == 50 and after["config"]["exemplar"]["binarize_exemplars"] == flipped


def test_an_edit_readers_may_differ_in_is_accepted_and_a_missing_record_too(
  run40, tmp_path, monkeypatch
):
  c = load_config("test", **SMALL)
  wd = _copy(run40, tmp_path)
  _edit_config(wd, seed=123)  # the seed only initialises a reader's template
  rundir.check_reader_config(wd, c)
  _edit_config(wd, max_train=7)  # data: refused
  with pytest.raises(errors.ConfigDriftError, match="max_train"):
    rundir.check_reader_config(wd, c)
  # Checkpoints saved before the record existed: nothing to check against, accepted.
  monkeypatch.setattr(checkpoints, "recorded_config", lambda d: None)
  rundir.check_reader_config(wd, load_config("test", **SMALL, max_train=7))


def test_a_reader_without_config_json_checks_the_recorded_config_or_says_it_cannot(
  run40, tmp_path, monkeypatch, capfd
):
  wd = _copy(run40, tmp_path)
  os.remove(os.path.join(wd, "config.json"))
  capfd.readouterr()
  rundir.check_reader_config(wd, load_config("test", **SMALL))
  with pytest.raises(errors.ConfigDriftError, match="max_train"):
    rundir.check_reader_config(wd, load_config("test", **SMALL, max_train=7))
  assert capfd.readouterr().err == ""
  monkeypatch.setattr(checkpoints, "recorded_config", lambda d: None)
  rundir.check_reader_config(wd, load_config("test", **SMALL))
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "could not be checked" in err[0], err


# ----------------------------------------------------------------------------
# A reused evaluation is checked; its TensorBoard scalars are written when missing
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_finished_evaluation_whose_numbers_were_changed_is_scored_again(run40, tmp_path, capfd):
  c = load_config("test", **SMALL)
  out = tmp_path / "e"
  c.eval.out_dir = str(out)
  first = eval_lib.evaluate(c, run40)
  path = out / "eval_metrics.json"
  text = path.read_text()
  digit = repr(first["test_nll"])[:5]
  changed = digit[:-1] + str((int(digit[-1]) + 1) % 10)
  assert digit != changed and digit in text
  for keep_digest in (True, False):
    rec = json.loads(text.replace(digit, changed, 1))
    if not keep_digest:  # as written before records carried digests
      del rec[atomic.SELF_DIGEST]
    path.write_text(json.dumps(rec, indent=2))
    capfd.readouterr()
    again = eval_lib.evaluate(c, run40)
    said = capfd.readouterr().out
    assert "reused" not in again and "do not check" in said, (keep_digest, said)
    assert (
      again["test_nll"] == first["test_nll"]
      and json.loads(path.read_text())["test_nll"] == first["test_nll"]
    )
  assert eval_lib.evaluate(c, run40)["reused"]


def test_eval_scalars_are_written_once_and_again_when_missing(tmp_path, monkeypatch):
  pytest.importorskip("tensorboard")
  from exvae.cli import eval_events

  c = load_config("test", **{"eval.out_dir": str(tmp_path)})
  m = {
    "test_nll": 91.5,
    "test_elbo": 95.0,
    "test_recon": 80.0,
    "test_kl": 15.0,
    "num_importance_samples": 16,
    "checkpoint_step": 40,
    "identity_sha256": "ab" * 32,
  }
  first = eval_events.write(m, c, "unused")
  assert eval_events.write(m, c, "unused") == first  # a reuse: nothing new
  assert writers.event_files(str(tmp_path)) == [first]
  assert writers.read_scalars(str(tmp_path))["eval/test_nll"] == [(40, 91.5)]
  os.remove(first)  # e.g. killed right after eval_metrics.json
  real = os.fsync

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(errors.DiskFullError):
    eval_events.write(m, c, "unused")
  assert os.listdir(tmp_path) == []  # no empty events file
  monkeypatch.setattr(os, "fsync", real)
  again = eval_events.write(m, c, "unused")
  assert writers.read_scalars(str(tmp_path))["eval/test_nll"] == [(40, 91.5)] and again


def test_sigterm_stops_an_evaluation_with_its_scores_kept(run40, tmp_path, monkeypatch):
  import signal

  c = load_config("test", **SMALL)
  c.eval.max_queries = 32  # S = 16: 2 images per batch, 20 batches
  c.eval.out_dir = str(tmp_path / "e")
  real, calls = evaluation.eval_batch, []

  def term_at_third(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)

  monkeypatch.setattr(evaluation, "eval_batch", term_at_third)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(errors.Interrupted, match="SIGTERM after 6 of 40 examples") as e:
    eval_lib.evaluate(c, run40)
  assert e.value.exit_code == 143
  assert int(np.load(tmp_path / "e" / eval_lib.PARTIAL)["done_batches"]) == 3
  assert signal.getsignal(signal.SIGTERM) == before  # the handler restored


def test_a_second_evaluation_into_one_out_dir_is_refused(run40, tmp_path):
  out = str(tmp_path / "e")
  held = eval_lib.lock_out_dir(out)
  try:
    c = load_config("test", **SMALL, **{"eval.out_dir": out})
    with pytest.raises(errors.WorkdirLockedError, match="another evaluation"):
      eval_lib.evaluate(c, run40)
  finally:
    os.close(held)
  assert os.listdir(out) == []


def test_uses_on_a_read_only_run_directory_is_one_line(run40, read_only_dir):
  src, ro = read_only_dir
  shutil.copytree(run40, os.path.join(src, "run"))
  r = _cli("uses.py", "knn", f"--workdir={os.path.join(ro, 'run')}")
  assert r.returncode == 1, r.stderr[-3000:]
  line = _one_line(r.stderr)
  assert line.startswith("exvae-uses: error: Cannot write the outputs in") and "--out" in line
