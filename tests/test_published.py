"""Published models: save/load round trip, corruption refused, and a paper row's scores
reproduced from its published parameters without training."""

import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, load_config
from exvae import bank as bank_lib
from exvae import errors, eval_lib, published, rundir, train_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained run (configs/test.py) and its restored best parameters."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config("test", num_epochs=1)
  train_lib.train_and_evaluate(config, workdir)
  return config, workdir, bank_lib.restore_trained(config, workdir)


def _leaves(tree):
  import jax

  return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_round_trip_and_reader_paths(run, tmp_path):
  config, workdir, trained = run
  out = str(tmp_path / "model")
  published.save(out, trained.params, rundir.read_stored_config(workdir), {"best_epoch": 1})
  assert published.is_published(out) and not published.is_published(workdir)
  again = bank_lib.restore_trained(config, out)
  a, b = _leaves(trained.params), _leaves(again.params)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # eval.py scores the published model exactly like the run it came from.
  ev = lambda wd, d: eval_lib.evaluate(  # noqa: E731
    load_config("test", num_epochs=1, **{"eval.out_dir": str(tmp_path / d)}), wd
  )
  m_run, m_pub = ev(workdir, "e_run"), ev(out, "e_pub")
  assert m_pub["test_nll"] == pytest.approx(m_run["test_nll"], abs=1e-4)
  assert sorted(os.listdir(out)) == ["config.json", "model.json", "params.npz"]  # untouched


def test_corrupt_or_foreign_parameters_are_refused(run, tmp_path):
  config, workdir, trained = run
  out = str(tmp_path / "model")
  path = published.save(out, trained.params, rundir.read_stored_config(workdir), {})
  template = trained.params
  with open(path, "r+b") as f:  # one flipped byte inside the archive
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(published.PublishedModelError, match="SHA-256"):
    published.load(out, template)
  published.save(out, trained.params, rundir.read_stored_config(workdir), {})
  # A recorded digest edited in its last characters: the error shows two digests that differ.
  meta_path = os.path.join(out, published.META_FILE)
  meta = json.load(open(meta_path))
  good = meta["params_sha256"]
  json.dump(
    dict(meta, params_sha256=good[:-4] + ("0000" if good[-4:] != "0000" else "1111")),
    open(meta_path, "w"),
  )
  with pytest.raises(published.PublishedModelError) as e:
    published.load(out, template)
  digests = re.findall(r"\b[0-9a-f]{12,}\b", str(e.value))
  assert len(digests) == 2 and digests[0] != digests[1], str(e.value)
  published.save(out, trained.params, rundir.read_stored_config(workdir), {})
  wrong = {"model": {"other": np.zeros(3, np.float32)}, "prior": {}}
  with pytest.raises(published.PublishedModelError, match="does not fit"):
    published.load(out, wrong)


ROW = os.path.join(ROOT, "results", "fashion_vae_vampprior")


@pytest.mark.slow
@pytest.mark.skipif(
  not os.path.isfile(os.path.join(ROW, "model", "params.npz")),
  reason="no published VampPrior model",
)
def test_the_vampprior_row_is_reproduced_from_its_published_model(tmp_path):
  from exvae import data

  if not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"):
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
  del data
  with open(os.path.join(ROW, "model", "model.json")) as f:
    record = json.load(f)
  with open(os.path.join(ROW, "metrics.json")) as f:
    row = json.load(f)
  assert record["best_epoch"] == row["best_epoch"]  # the parameters the row scored
  from exvae import config_registry

  config = config_registry.get_config(os.path.join(ROOT, "configs", "fashion_vae_vampprior.py"))
  with config.unlocked():
    config.eval.max_test_examples = 3
    config.eval.out_dir = str(tmp_path)
    config.progress = False
  m = eval_lib.evaluate(config, os.path.join(ROW, "model"))
  with np.load(os.path.join(tmp_path, "per_example.npz")) as z:
    got = z["log_px"]
  with np.load(os.path.join(ROW, "per_example.npz")) as z:
    want = z["log_px"][:3]
    assert int(z["num_importance_samples"]) == m["num_importance_samples"] == 5000
  # Same parameters, images, S and per-image keys: the same estimates up to float32
  # summation order.
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_a_published_config_json_is_checked_against_model_json(run, tmp_path, capfd):
  """model.json records the digest of config.json: an edit that changes the model or the
  data is refused in one line; a model published before the record is accepted; without
  config.json, a given --config is used with one line saying it could not be checked."""
  from exvae import config_registry

  config, workdir, trained = run
  out = str(tmp_path / "model")
  published.save(out, trained.params, rundir.read_stored_config(workdir), {"best_epoch": 1})
  meta = published.read_meta(out)
  assert meta["config_sha256"] == __import__("exvae.atomic").atomic.json_digest(
    json.load(open(os.path.join(out, "config.json")))
  )
  bank_lib.restore_trained(config_registry.from_json(os.path.join(out, "config.json")), out)
  stored = json.load(open(os.path.join(out, "config.json")))
  stored["exemplar"]["binarize_exemplars"] = not stored["exemplar"]["binarize_exemplars"]
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(stored, f)
  edited = config_registry.from_json(os.path.join(out, "config.json"))
  with pytest.raises(errors.ConfigDriftError, match="model.json records: it was edited"):
    bank_lib.restore_trained(edited, out)
  with pytest.raises(errors.ConfigDriftError, match="model.json records"):
    eval_lib.evaluate(edited, out)
  # Published before model.json recorded the digest: accepted as it is.
  del meta["config_sha256"]
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(meta, f)
  bank_lib.restore_trained(edited, out)
  os.remove(os.path.join(out, "config.json"))
  capfd.readouterr()
  bank_lib.restore_trained(config, out)
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "could not be checked" in err[0], err


def test_an_incomplete_or_unreadable_published_model_is_named_as_such(run, tmp_path):
  from exvae.cli import command
  from exvae.cli import exits
  from exvae.cli import eval as eval_cli

  config, workdir, trained = run
  out = str(tmp_path / "model")
  published.save(out, trained.params, rundir.read_stored_config(workdir), {"best_epoch": 1})
  os.remove(os.path.join(out, "model.json"))
  with pytest.raises(published.PublishedModelError, match="no model.json: an incomplete"):
    eval_lib.evaluate(config, out)
  with pytest.raises(published.PublishedModelError, match="incomplete"):
    bank_lib.restore_trained(config, out)
  # A truncated config.json of the model (no --config given) is the model's file at fault.
  text = open(os.path.join(out, "config.json")).read()
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(text[:200])
  with pytest.raises(exits.RunConfigError) as e:
    command.resolve_config(eval_cli.SPEC, None, [], out)
  assert "--config=" not in str(e.value).split(":")[0] and e.value.exit_code == 1
  assert "the config of the run in" in str(e.value)


def test_publish_model_records_the_config_digest_of_an_older_model(run, tmp_path):
  """Models published before model.json recorded config_sha256 get it without their
  parameters changing; a model whose parameters fail their digest is refused."""
  from conftest import load_script
  from exvae import atomic

  _, workdir, trained = run
  out = str(tmp_path / "model")
  published.save(out, trained.params, rundir.read_stored_config(workdir), {"best_epoch": 1})
  meta = published.read_meta(out)
  want = meta.pop("config_sha256")
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(meta, f)
  params = atomic.sha256_file(os.path.join(out, "params.npz"))
  pm = load_script("scripts/publish_model.py")
  assert pm.main(["--record_config_digest", out]) == 0
  assert published.read_meta(out) == dict(meta, config_sha256=want)
  assert atomic.sha256_file(os.path.join(out, "params.npz")) == params
  with open(os.path.join(out, "params.npz"), "ab") as f:
    f.write(b"x")
  assert pm.main(["--record_config_digest", out]) == 1
