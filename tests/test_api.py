"""exvae.load_run in a notebook: per-image log p(x) as exvae-eval scores it, and the same
``meta`` for a run directory and for the model published from it."""

import json
import os

import numpy as np
import pytest

from conftest import load_config
from exvae import bank as bank_lib
from exvae import eval_lib, per_example, published, rundir, train_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny 1-epoch run of configs/test.py and the model published from it."""
  root = tmp_path_factory.mktemp("api")
  workdir = str(root / "run")
  config = load_config("test", num_epochs=1)
  train_lib.train_and_evaluate(config, workdir)
  t = bank_lib.restore_trained(config, workdir)
  model = str(root / "model")
  published.save(
    model,
    t.params,
    rundir.read_stored_config(workdir),
    {"best_epoch": int(t.meta["best_epoch"]), "best_val_loss": t.meta["best_val"]},
  )
  return workdir, model


def _eval_per_example(workdir, out_dir, **overrides):
  config = load_config("test", num_epochs=1, **{"eval.out_dir": out_dir, **overrides})
  eval_lib.evaluate(config, workdir)
  with np.load(os.path.join(out_dir, per_example.FILENAME)) as z:
    return {k: z[k] for k in per_example.SCORES}


@pytest.mark.parametrize(
  "seed,num_samples", [(None, None), pytest.param(3, 5, marks=pytest.mark.slow)]
)
def test_log_px_is_what_exvae_eval_writes_per_image(trained, tmp_path, seed, num_samples):
  import exvae

  workdir, _ = trained
  overrides = (
    {} if seed is None else {"eval.seed": seed, "eval.num_importance_samples": num_samples}
  )
  want = _eval_per_example(workdir, str(tmp_path / "e"), **overrides)
  run = exvae.load_run(workdir, bank=False)
  x = run.splits.test_x[: int(run.config.eval.max_test_examples)]
  got = run.scores(x, num_samples=num_samples, seed=seed)
  assert set(got) == set(per_example.SCORES)
  for k in per_example.SCORES:  # the archive holds float32 copies
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(run.log_px(x, num_samples=num_samples, seed=seed), got["log_px"])
  # Another seed draws other samples: the seed is what selects them.
  other = run.log_px(x, num_samples=num_samples, seed=(seed or 0) + 1)
  assert np.max(np.abs(other - got["log_px"])) > 1e-4
  # An ELBO is a lower bound of the same samples' IWAE estimate.
  assert np.all(got["elbo"] <= got["log_px"] + 1e-9)


def test_log_px_refuses_grey_levels_and_wrong_shapes_in_one_line(trained):
  import exvae

  workdir, _ = trained
  run = exvae.load_run(workdir, bank=False)
  x = run.splits.test_x[:4]
  if run.splits.binary:
    with pytest.raises(ValueError, match="binary images"):
      run.log_px(np.full_like(x, 0.5))
  with pytest.raises(ValueError, match="shape"):
    run.log_px(x[:, :-1])


def test_meta_is_the_same_for_a_run_directory_and_its_published_model(trained):
  import exvae

  workdir, model = trained
  recs = [json.loads(line) for line in open(os.path.join(workdir, rundir.METRICS_FILE))]
  val = [r for r in recs if "val_loss" in r]
  assert [r["epoch"] for r in val] == [1]  # one validated epoch, printed as 1
  a = exvae.load_run(workdir, bank=False).meta
  b = exvae.load_run(model, bank=False).meta
  assert a["best_epoch"] == b["best_epoch"] == 1
  assert a["best_val"] == pytest.approx(val[0]["val_loss"], rel=1e-6)
  assert b["best_val"] == pytest.approx(a["best_val"], rel=1e-12)
  assert set(b) <= set(a)  # a run directory may add bookkeeping
  # The exemplar bank records the same epoch for both.
  t_run = bank_lib.restore_trained(load_config("test", num_epochs=1), workdir)
  t_pub = bank_lib.restore_trained(load_config("test", num_epochs=1), model)
  assert t_run.meta["best_epoch"] == t_pub.meta["best_epoch"] == 1
  for t, wd in ((t_run, workdir), (t_pub, model)):
    bank = bank_lib.from_checkpoint(t.config, wd, trained=t)
    assert bank.metadata["best_epoch"] == 1
