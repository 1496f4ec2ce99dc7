"""Training/evaluation end to end on the tiny config: tracing, IWAE, resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config, train_traced_once
from exvae import checkpoints, errors, eval_lib, evaluation, rundir, train_lib
from exvae.objectives import elbo_loss, log_importance_weights


def _setup(**overrides):
  c = load_config("test", **overrides)
  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  return c, splits, setup


@pytest.mark.parametrize(
  "prior,rat",
  [
    pytest.param("exemplar", False, marks=pytest.mark.slow),
    pytest.param("exemplar", True, marks=pytest.mark.slow),
    pytest.param("vampprior", False, marks=pytest.mark.slow),
    ("gaussian", False),
  ],
)
def test_train_step_traces_once_and_loss_decreases(prior, rat):
  c = load_config("test", prior=prior, **{"exemplar.rat": rat})
  _, state, _, losses = train_traced_once(c, 40)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert int(state.step) == 40 and int(state.nonfinite) == 0


def test_a_nonfinite_step_keeps_the_state_and_a_finite_one_updates_in_place():
  """The update runs under a cond on its finiteness: a NaN step leaves the parameters
  and the optimiser moments exactly as they were, a finite one equals the optimiser's
  own update, and the compiled step copies none of the donated parameters or moments."""
  import optax
  from conftest import fresh_run

  setup, state, pool, perm = fresh_run(load_config("test"))
  np_tree = lambda t: jax.tree.map(np.asarray, t)
  # A finite step: the optimiser's update of the step's own gradients.
  x, ids, k_loss = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  beta = train_lib.kl_beta(state.step, setup.steps_per_epoch, setup.warmup_epochs)
  grads = jax.grad(lambda p: elbo_loss(p, state.prior_state, setup, x, ids, k_loss, beta, pool)[0])(
    state.params
  )
  updates, want_opt = setup.optimizer.update(grads, state.opt_state, state.params)
  want = np_tree((optax.apply_updates(state.params, updates), want_opt))
  new, _ = train_lib.train_step(jax.tree.map(jnp.copy, state), pool, perm, setup=setup)
  chex.assert_trees_all_close((new.params, new.opt_state), want, rtol=1e-5, atol=1e-6)
  assert int(new.nonfinite) == 0
  # A NaN in a parameter: the loss is NaN, and nothing of the state moves.
  bad = new.replace(
    params=jax.tree.map(
      lambda a: a.at[(0,) * a.ndim].set(jnp.nan) if a.ndim == 1 else a, new.params
    )
  )
  before = np_tree((bad.params, bad.opt_state))
  after, m = train_lib.train_step(bad, pool, perm, setup=setup)
  assert not np.isfinite(float(m["loss"])) and int(after.nonfinite) == 1
  chex.assert_trees_all_equal(np_tree((after.params, after.opt_state)), before)
  # In place: no copy of a donated weight matrix or moment in the compiled step (a
  # select between old and new values copied all 44 of them; a bias or the prior's
  # scalar read again for the step's metrics may still be copied).
  hlo = train_lib.train_step.lower(after, pool, perm, setup=setup).compile().as_text()
  copies = re.findall(r"f32\[([0-9,]*)\]\S* copy\((%state_(?:params|opt_state)\S*)\)", hlo)
  big = [
    (shape, what)
    for shape, what in copies
    if "opt_state" in what or np.prod([int(d) for d in shape.split(",") if d]) > 1024
  ]
  assert not big, big[:5]


def test_training_binarisation_is_fresh_each_epoch_and_eval_is_fixed():
  c, splits, setup = _setup()
  assert setup.binary
  n = splits.train_x.shape[0]
  pool = jnp.asarray(splits.train_x)
  spe = setup.steps_per_epoch
  batch = jax.jit(train_lib.train_batch, static_argnames=("setup",))
  key = jax.random.PRNGKey(0)
  perm = jnp.arange(n, dtype=jnp.int32)  # same rows at step 0 of every epoch
  draws = [batch(key, jnp.int32(e * spe), pool, perm, setup=setup) for e in range(200)]
  xs = np.stack([np.asarray(x) for x, _, _ in draws])  # (epochs, B, H, W, 1)
  ids = np.asarray(draws[0][1])
  assert all(np.array_equal(np.asarray(i), ids) for _, i, _ in draws)
  assert set(np.unique(xs).tolist()) == {0.0, 1.0}
  # Another epoch, another binarisation of the same images ...
  assert (xs[0] != xs[1]).mean() > 0.05
  # ... each a Bernoulli draw of the grey levels: the mean over 200 epochs
  # matches them (binomial sd <= 0.035 per pixel).
  grey = np.asarray(pool[ids])
  assert np.abs(xs.mean(0) - grey).max() < 0.2
  assert abs(float(xs.mean() - grey.mean())) < 0.01
  # The same step (a resumed run) redraws exactly the same bits.
  again, _, _ = batch(key, jnp.int32(3 * spe), pool, perm, setup=setup)
  np.testing.assert_array_equal(np.asarray(again), xs[3])
  # Validation and test images are binarised once, identically on every load.
  again_splits = train_lib.load_data(c)
  for a, b in ((splits.val_x, again_splits.val_x), (splits.test_x, again_splits.test_x)):
    assert set(np.unique(a).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_iwae_s1_equals_elbo_and_bound_tightens():
  c, splits, setup = _setup()
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  for _ in range(30):  # a not-quite-random fixed model
    state, _ = train_lib.train_step(state, pool, perm, setup=setup)
  params = state.params
  ctx = evaluation.eval_context(params, pool, jax.random.PRNGKey(3), setup=setup)
  x = jnp.asarray(splits.test_x[:64])
  key = jax.random.PRNGKey(5)
  # S = 1: the IWAE bound is exactly the one-sample ELBO estimate log w.
  log_w, log_px, log_pz, log_qz = log_importance_weights(params, setup, ctx, x, key, 1)
  r = evaluation.evaluate_split(params, setup, ctx, np.asarray(x), key, num_samples=1)
  # evaluate_split folds the key per batch/chunk; recompute with the same key schedule.
  kb = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
  lw1 = log_importance_weights(params, setup, ctx, x, kb, 1)[0][:, 0]
  np.testing.assert_allclose(r["log_px_iwae"], np.asarray(lw1), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(r["elbo"], np.asarray(lw1), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(log_w[:, 0]), np.asarray(log_px + log_pz - log_qz)[:, 0], rtol=1e-6
  )
  # The bound tightens with S (on average over test points; fixed model).
  bounds = [
    evaluation.evaluate_split(
      params, setup, ctx, np.asarray(x), jax.random.PRNGKey(s), num_samples=s, max_queries=512
    )["log_px_iwae"].mean()
    for s in (1, 8, 64, 512)
  ]
  assert bounds[0] < bounds[1] < bounds[2] < bounds[3], bounds
  # Chunking S across calls (max_queries < S) gives the same estimator.
  a = evaluation.evaluate_split(params, setup, ctx, np.asarray(x[:4]), key, 64, max_queries=64)
  assert np.all(np.isfinite(a["log_px_iwae"])) and np.all(a["log_px_iwae"] >= a["elbo"] - 1e-6)


@pytest.mark.slow
def test_train_and_eval_end_to_end(tmp_path):
  c = load_config("test")
  wd = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(c, wd)
  assert summary["finished"] and summary["step"] == 2 * summary["steps_per_epoch"]
  assert os.path.exists(os.path.join(wd, "pictures", "epoch_00002.png"))
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("val_loss" in l for l in lines)
  m = eval_lib.evaluate(c, wd)
  saved = json.load(open(os.path.join(wd, "eval_metrics.json")))
  for k in ("test_nll", "test_elbo", "num_importance_samples", "num_test_examples"):
    assert k in saved
  assert saved["num_importance_samples"] == 16 and saved["num_test_examples"] == 40
  assert np.isfinite(m["test_nll"]) and m["test_nll"] <= m["test_elbo"] + 1e-6
  assert os.path.exists(m["samples_png"])
  # Running again is a no-op: training already finished.
  again = train_lib.train_and_evaluate(c, wd)
  assert again["step"] == summary["step"]


def _run_train(wd, *extra, wait=True):
  cmd = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={ROOT}/configs/test.py",
    f"--workdir={wd}",
    "--config.num_epochs=3",
    "--config.checkpoint_every_steps=7",
    *extra,
  ]
  if wait:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)


def _final_params(wd):
  c = load_config("test", num_epochs=3)
  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  t = train_lib.init_state(c, setup, splits.train_x.shape[0])
  state, best, meta = checkpoints.Manager(os.path.join(wd, "checkpoints")).restore_latest(
    t, t.params
  )
  return state, best, meta


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  r = _run_train(ref)
  assert r.returncode == 0, r.stderr[-2000:]
  p = _run_train(killed, wait=False)
  ckpt = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  # Kill as soon as a mid-epoch checkpoint (not a multiple of 64 steps) exists.
  while time.time() < deadline:
    steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    if any(s > 64 and s % 64 for s in steps):
      break
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL, "run finished before it could be killed"
  r = _run_train(killed)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Resumed from checkpoint" in r.stdout
  s_ref, b_ref, m_ref = _final_params(ref)
  s_k, b_k, m_k = _final_params(killed)
  assert int(s_ref.step) == int(s_k.step) == 192
  chex.assert_trees_all_close(s_ref.params, s_k.params, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(b_ref, b_k, rtol=1e-6, atol=1e-6)
  assert m_ref["best_epoch"] == m_k["best_epoch"]


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = load_config("test", max_steps=20)
  wd = str(tmp_path / "nan")
  train_lib.train_and_evaluate(c, wd)
  c2 = load_config("test", max_steps=60, learning_rate=1e30)  # explodes immediately
  with pytest.raises(train_lib.NonFiniteLossError, match="last good checkpoint"):
    train_lib.train_and_evaluate(c2, wd, allow_config_change=True)  # a new learning rate
  mngr = checkpoints.Manager(os.path.join(wd, "checkpoints"))
  assert mngr.all_steps()[-1] == 20
  s, _, _ = _final_params(wd)
  assert int(s.step) == 20
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(s.params))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  c = load_config("test")
  wd = str(tmp_path / "corrupt")
  train_lib.train_and_evaluate(c, wd)
  ckpt = os.path.join(wd, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  latest = os.path.join(ckpt, str(steps[-1]), "state")
  for root, _, files in os.walk(latest):  # scramble every file of the latest state
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  state, _, _ = _final_params(wd)
  assert int(state.step) == steps[-2]
  assert "failed to restore or verify" in capsys.readouterr().err


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="Train first"):
    eval_lib.evaluate(load_config("test"), str(tmp_path / "empty"))


def test_unknown_config_key_is_an_error(tmp_path):
  r = _run_train(str(tmp_path / "x"), "--config.no_such_key=3")
  assert r.returncode != 0
  assert "no_such_key" in r.stderr


def test_bad_images_are_rejected():
  from exvae import data

  with pytest.raises(ValueError):
    data.validate_images(np.full((2, 8, 8, 1), 2.0, np.float32))
  with pytest.raises(ValueError):
    data.validate_images(np.zeros((2, 8, 8, 1), np.float32), image_shape=(28, 28, 1))


@pytest.mark.slow
@pytest.mark.parametrize("keep", [16, 200])
def test_pruned_evaluation_is_within_its_certified_gap(keep):
  """eval.prune_keep: the exact IWAE estimate lies in [pruned, pruned + max_err]."""
  c, splits, setup = _setup()
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  for _ in range(30):
    state, _ = train_lib.train_step(state, pool, perm, setup=setup)
  ctx = evaluation.eval_context(state.params, pool, jax.random.PRNGKey(3), setup=setup)
  x = np.asarray(splits.test_x[:12])
  exact = evaluation.evaluate_split(state.params, setup, ctx, x, jax.random.PRNGKey(4), 32)
  c2, splits2, setup2 = _setup(**{"eval.prune_keep": keep})
  pruned = evaluation.evaluate_split(state.params, setup2, ctx, x, jax.random.PRNGKey(4), 32)
  assert np.all(exact["max_err"] == 0)
  lo, gap = pruned["log_px_iwae"], pruned["max_err"]
  assert np.all(lo <= exact["log_px_iwae"] + 1e-4)
  assert np.all(exact["log_px_iwae"] <= lo + gap + 1e-4)
  assert np.any(gap > 0)  # something was really pruned


@pytest.mark.slow
def test_resume_with_a_different_config_is_a_clear_error(tmp_path):
  wd = str(tmp_path / "mismatch")
  train_lib.train_and_evaluate(load_config("test", max_steps=10), wd)
  stored = open(os.path.join(wd, "config.json")).read()
  with pytest.raises(errors.ConfigDriftError, match="latent_dim 4 -> 5"):
    train_lib.train_and_evaluate(load_config("test", max_steps=20, latent_dim=5), wd)
  # Forced past the config check, the checkpoints themselves do not fit: one typed
  # error naming an array and both shapes; the failed invocation leaves config.json
  # as it was.
  with pytest.raises(
    errors.CheckpointMismatchError,
    match=r"holds another model.*is \(4, 16\) there and \(5, 16\) here",
  ):
    train_lib.train_and_evaluate(
      load_config("test", max_steps=20, latent_dim=5), wd, allow_config_change=True
    )
  assert open(os.path.join(wd, "config.json")).read() == stored
  assert not os.path.exists(os.path.join(wd, rundir.CHANGES_FILE))
