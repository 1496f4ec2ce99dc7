"""Priors and models from files outside exvae/, selected as MODULE:ATTR (no library edit)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config
from exvae import plugins, train_lib
from exvae.priors import make_prior, registered_priors

EXAMPLES = os.path.join(ROOT, "examples")


def _cli(script, *args, cwd):
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, script), "--config=test", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  return r.stdout


@pytest.mark.slow
def test_example_prior_trains_resumes_and_evaluates_through_the_cli(tmp_path):
  spec = "learned_gaussian:LearnedGaussian"  # a module in the current directory
  wd = str(tmp_path / "run")
  small = [
    f"--workdir={wd}",
    f"--config.prior={spec}",
    "--config.max_train=200",
    "--config.warmup_epochs=1",
    "--config.progress=False",
  ]
  out = _cli("train.py", "--config.num_epochs=1", *small, cwd=EXAMPLES)
  assert out.strip().splitlines()[-1].startswith("finished: step 10")
  assert json.load(open(os.path.join(wd, "config.json")))["prior"] == spec
  out = _cli("train.py", "--config.num_epochs=2", *small, cwd=EXAMPLES)
  assert "Resumed from checkpoint at step 10" in out and "finished: step 20" in out
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  log_var = [l["prior_log_var"] for l in lines if "prior_log_var" in l]
  assert len(log_var) >= 4 and log_var[-1] != log_var[0]  # the prior's parameter learns
  assert [l["epoch"] for l in lines if "val_loss" in l] == [1, 2]
  _cli("eval.py", *small, cwd=EXAMPLES)
  m = json.load(open(os.path.join(wd, "eval_metrics.json")))
  assert m["prior"] == spec and np.isfinite(m["test_nll"]) and m["checkpoint_step"] == 20
  assert "prior_log_var" in m


@pytest.mark.slow
def test_plugin_by_file_path_from_any_directory_and_a_model_plugin(tmp_path):
  c = load_config(
    "test",
    prior=os.path.join(EXAMPLES, "learned_gaussian.py") + ":LearnedGaussian",
    model=os.path.join(EXAMPLES, "plain_mlp_vae.py") + ":make_model",
  )
  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  assert c.prior in registered_priors()
  assert type(setup.prior).__name__ == "LearnedGaussian"
  assert setup.model.module.__class__.__name__ == "PlainVAE"
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  assert set(state.params["prior"]) == {"mean", "log_var"}
  pool = jax.numpy.asarray(splits.train_x)
  perm = jax.numpy.asarray(train_lib.epoch_permutation(0, 0, n))
  losses = []
  for _ in range(30):
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
  # Loading the same file again (another spelling of its path) reuses the module.
  again = plugins.load(os.path.join(EXAMPLES, ".", "learned_gaussian.py") + ":LearnedGaussian")
  assert again is type(setup.prior)


def test_plugin_errors_say_what_is_wrong():
  with pytest.raises(ValueError, match="cannot import 'no_such_pkg.mod'.*PYTHONPATH"):
    make_prior("no_such_pkg.mod:Prior", None)
  with pytest.raises(ValueError, match="has no attribute 'Nope'"):
    make_prior("exvae.priors.gaussian:Nope", None)
  with pytest.raises(ValueError, match="not a subclass of exvae.priors.Prior"):
    make_prior("exvae.priors.base:register", None)
  with pytest.raises(ValueError, match="Unknown prior 'nospec'"):
    make_prior("nospec", None)
  assert plugins.is_spec("a.b:C") and not plugins.is_spec("exemplar") and not plugins.is_spec(":C")
