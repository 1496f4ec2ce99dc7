"""Downstream uses: generation, kNN, augmentation, plots and the uses.py CLI end to end."""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, leftover_temporaries, load_config
from exvae import atomic
from exvae import bank as bank_lib
from exvae import checkpoints
from exvae.likelihoods import bernoulli_mean
from exvae.uses import augment, classifier, commands, generation, knn


@pytest.fixture(scope="module")
def run(trained_dir):
  """The shared tiny trained workdir (2 epochs on digits) and its restored state and bank."""
  config = load_config("test")
  trained = bank_lib.restore_trained(config, trained_dir)
  bank = bank_lib.from_checkpoint(config, trained_dir, trained=trained)
  return config, trained_dir, trained, bank


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_conditional_samples_stay_near_their_exemplar(run):
  _, _, t, bank = run
  model, mp = t.setup.model, t.params["model"]
  x = jnp.asarray(t.splits.test_x[:32])
  imgs, z, mu = generation.conditional_samples(
    model, mp, x, jnp.float32(bank.log_var), jax.random.PRNGKey(0), 6
  )
  assert imgs.shape == (32, 6, 8, 8, 1) and z.shape == (32, 6, 4)
  assert float(imgs.min()) >= 0 and float(imgs.max()) <= 1
  np.testing.assert_allclose(mu, model.encode_mean(mp, x), rtol=1e-5, atol=1e-5)
  z, mu = np.asarray(z), np.asarray(mu)
  own = np.linalg.norm(z - mu[:, None], axis=-1).mean()
  other_idx = (np.arange(32) + 1 + np.random.default_rng(0).integers(0, 31, 32)) % 32
  assert np.all(other_idx != np.arange(32))
  other = np.linalg.norm(z - mu[other_idx][:, None], axis=-1).mean()
  assert own < other, (own, other)
  # The spread matches s2 of the bank: E|z - mu|^2 = d s2.
  np.testing.assert_allclose(
    np.mean(np.sum((z - mu[:, None]) ** 2, -1)), 4 * np.exp(bank.log_var), rtol=0.25
  )


def test_unconditional_cyclic_interpolation(run, tmp_path):
  _, _, t, bank = run
  model, mp = t.setup.model, t.params["model"]
  lv = jnp.float32(bank.log_var)
  u, rows = generation.unconditional_samples(
    model, mp, jnp.asarray(bank.codes), lv, jax.random.PRNGKey(1), 16
  )
  assert u.shape == (16, 8, 8, 1) and rows.shape == (16,) and int(rows.max()) < bank.size
  x0 = jnp.asarray(t.splits.test_x[:3])
  chains = generation.cyclic_chains(model, mp, x0, lv, jax.random.PRNGKey(2), 5)
  assert chains.shape == (3, 5, 8, 8, 1) and bool(jnp.all(jnp.isfinite(chains)))
  again = generation.cyclic_chains(model, mp, x0, lv, jax.random.PRNGKey(2), 5)
  np.testing.assert_array_equal(chains, again)  # explicit keys: deterministic
  za, zb = model.encode_mean(mp, x0[:2]), model.encode_mean(mp, x0[1:3])
  path = generation.interpolate(model, mp, za, zb, 7)
  assert path.shape == (2, 7, 8, 8, 1)
  np.testing.assert_allclose(path[:, 0], bernoulli_mean(model.decode(mp, za)), atol=1e-5)
  np.testing.assert_allclose(path[:, -1], bernoulli_mean(model.decode(mp, zb)), atol=1e-5)
  p = generation.save_interpolation(
    str(tmp_path / "i.png"), np.asarray(x0[:2]), np.asarray(x0[1:3]), np.asarray(path)
  )
  assert os.path.getsize(p) > 0


# ----------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------


def _brute_force_knn(q, ref, ref_y, k, tie_break="lowest_label"):
  preds = []
  for zq in q:
    d = np.sqrt(((ref.astype(np.float64) - zq) ** 2).sum(1))
    nn = np.argsort(d, kind="stable")[:k]
    votes = collections.Counter(ref_y[nn].tolist())
    best = max(votes.values())
    tied = [c for c, v in votes.items() if v == best]
    dsum = {c: sum(d[i] for i in nn if ref_y[i] == c) for c in tied}
    preds.append(
      min(tied) if tie_break == "lowest_label" else min(tied, key=lambda c: (dsum[c], c))
    )
  return np.asarray(preds)


@pytest.mark.parametrize("tie_break", knn.TIE_BREAKS)
def test_knn_matches_brute_force(tie_break):
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(150, 5)).astype(np.float32)
  ref_y = rng.integers(0, 4, 150).astype(np.int32)
  q = rng.normal(size=(40, 5)).astype(np.float32)
  preds = knn.knn_predict(q, ref, ref_y, knn.DEFAULT_KS, batch_size=16, tie_break=tie_break)
  assert sorted(preds) == list(knn.DEFAULT_KS)
  q_y = rng.integers(0, 4, 40)
  errs = knn.error_rates(preds, q_y)
  for k in knn.DEFAULT_KS:
    want = _brute_force_knn(q, ref, ref_y, k, tie_break)
    np.testing.assert_array_equal(preds[k], want, err_msg=f"k={k}")
    assert errs[k] == np.mean(want != q_y), k


def test_knn_tie_breaking():
  # 1-D points: query at 0. Labels 2 and 1 get 1 vote each (k=2) at distances 1 and 2.
  # The reference's rule (default) takes the lowest label; "distance" takes the smaller
  # summed distance (label 2), then the lowest label.
  ref = np.array([[1.0], [-2.0], [5.0]], np.float32)
  zero = np.zeros((1, 1), np.float32)
  assert knn.knn_predict(zero, ref, np.array([2, 1, 0]), (2,))[2][0] == 1
  assert knn.knn_predict(zero, ref, np.array([2, 1, 0]), (2,), tie_break="distance")[2][0] == 2
  ref = np.array([[1.0], [-1.0], [5.0]], np.float32)
  p = knn.knn_predict(zero, ref, np.array([3, 1, 0]), (2,), tie_break="distance")
  assert p[2][0] == 1
  with pytest.raises(ValueError, match="tie_break"):
    knn.knn_predict(zero, ref, np.array([3, 1, 0]), (2,), tie_break="nearest")


def test_knn_queries_are_grey_images_by_default(run):
  _, _, t, bank = run
  g = classifier.grey_splits(t.config, t.splits)
  assert not np.array_equal(g.test_x, t.splits.test_x)  # binarised differs from grey
  grey = knn.evaluate_knn(t, bank, (3,))
  binarised = knn.evaluate_knn(t, bank, (3,), query_images="binarised")
  assert grey["query_images"] == "grey" and grey["tie_break"] == "lowest_label"
  model, mp = t.setup.model, t.params["model"]
  codes = np.asarray(model.encode_mean(mp, jnp.asarray(g.test_x)))
  ref = np.concatenate([bank.codes, np.asarray(model.encode_mean(mp, jnp.asarray(g.val_x)))])
  ref_y = np.concatenate([bank.labels, g.val_y])
  want = np.mean(_brute_force_knn(codes, ref, ref_y, 3) != g.test_y)
  assert grey["test"]["3"] == pytest.approx(want, abs=1.5 / len(g.test_y))
  # The same test queries against the training references alone.
  want = _brute_force_knn(codes, bank.codes, bank.labels, 3)
  assert np.mean(grey["test_on_train_predictions"][3] != want) <= 1.5 / len(g.test_y)
  assert grey["test_on_train"]["3"] == pytest.approx(
    np.mean(want != g.test_y), abs=1.5 / len(g.test_y)
  )
  assert binarised["query_images"] == "binarised"


def test_downstream_results_record_the_model_and_the_code(run, tmp_path):
  """knn.json and augment.json say which parameters and which commit made them."""
  from exvae import published, rundir

  _, workdir, t, _ = run
  head = subprocess.run(
    ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  rec = commands.provenance(t, workdir)
  assert rec["commit"] == (head or "unknown") and rec["model"]["path"] == workdir
  # 1-based, as printed, as model.json and the tables count (the checkpoint counts from 0).
  assert rec["model"]["best_epoch"] == int(t.meta["best_epoch"]) >= 1
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  val = {r["epoch"]: r["val_loss"] for r in recs if "val_loss" in r}
  summary = [r["summary"] for r in recs if "summary" in r][-1]
  assert summary["best_epoch"] == min(val, key=val.get) == rec["model"]["best_epoch"]
  assert "params_sha256" not in rec["model"]  # a run directory: no digest
  out = str(tmp_path / "published")
  published.save(
    out,
    t.params,
    rundir.read_stored_config(workdir),
    {"best_epoch": 7, "source_run": "r", "source_commit": "abc"},
  )
  pub = commands.provenance(t, out)["model"]
  assert pub["params_sha256"] == published.read_meta(out)["params_sha256"]
  assert (pub["best_epoch"], pub["source_run"], pub["source_commit"]) == (7, "r", "abc")


def test_downstream_records_name_the_commit_they_started_from(run, tmp_path, monkeypatch):
  """A long augmentation outlives commits to its checkout: the record keeps the first."""
  config, workdir, _, _ = run
  commits = iter(["commit-at-start", "commit-later", "commit-later"])
  monkeypatch.setattr(commands.runinfo, "code_commit", lambda: next(commits))
  real = commands.augment_lib.run_augmentation

  def slow_run(*a, **k):  # the checkout moves on while the classifiers train
    commands.runinfo.code_commit()
    return real(*a, **k)

  monkeypatch.setattr(commands.augment_lib, "run_augmentation", slow_run)
  out = str(tmp_path / "aug")
  commands.run("augment", config, workdir, out, epochs=1, hidden=8, max_steps=1)
  with open(os.path.join(out, "augment.json")) as f:
    assert json.load(f)["commit"] == "commit-at-start"


# ----------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------


def test_classifier_starts_and_decays_as_the_authors_one():
  """PyTorch nn.Linear init (kernel and bias U(+-1/sqrt(fan_in))) and the per-epoch
  LambdaLR(1 - 0.99 * epoch / epochs) of the authors' classify_data."""
  params = classifier.MLP(hidden=64, num_classes=10).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 784))
  )["params"]
  for name, fan_in in (("Dense_0", 784), ("Dense_1", 64), ("Dense_2", 64)):
    k, b = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    bound = 1.0 / np.sqrt(fan_in)
    assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(b).max() > 0.5 * bound  # drawn, not zeros
    if k.size >= 4096:
      assert np.var(k) == pytest.approx(bound**2 / 3, rel=0.1)  # uniform: bound^2 / 3
  sched = classifier.lr_schedule(epochs=4, steps_per_epoch=3, learning_rate=0.1)
  got = [float(sched(jnp.int32(i))) for i in range(14)]
  want = [0.1 * (1 - 0.99 * min(i // 3, 3) / 4) for i in range(14)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(0.1) and got[-1] == pytest.approx(0.1 * (0.01 + 0.99 / 4))


def test_augmented_images_on_grey_grid(run):
  _, _, t, bank = run
  x = jnp.asarray(t.splits.train_x[:16])
  a = generation.augment_images(
    t.setup.model, t.params["model"], x, jnp.float32(bank.log_var), jax.random.PRNGKey(0), True
  )
  a = np.asarray(a)
  assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
  np.testing.assert_allclose(a * 255, np.round(a * 255), atol=1e-3)


@pytest.mark.slow
def test_augmentation_training_loss_decreases(run):
  _, _, t, bank = run
  x, y = t.splits.train_x[:400], t.splits.train_y[:400]
  r = classifier.train_classifier(
    x,
    y,
    t.splits.test_x[:100],
    t.splits.test_y[:100],
    hidden=32,
    epochs=16,
    augment=True,
    vae=t.setup.model,
    vae_params=t.params["model"],
    log_var=bank.log_var,
    batch_size=50,
    seed=0,
  )
  losses = np.asarray(r["losses"])
  assert r["steps"] == 128 and losses.shape == (128,)
  assert np.all(np.isfinite(losses))
  assert losses[-10:].mean() < losses[:10].mean() - 0.1, (losses[:10], losses[-10:])
  assert 0.0 <= r["test_error"] < 0.9
  r2 = classifier.train_classifier(
    x,
    y,
    t.splits.test_x[:100],
    t.splits.test_y[:100],
    hidden=32,
    epochs=8,
    augment=False,
    batch_size=50,
    seed=0,
    max_steps=5,
  )
  assert r2["steps"] == 5 and np.all(np.isfinite(r2["losses"]))


def test_a_stopped_classifier_continues_from_its_checkpoint(run, tmp_path, monkeypatch, capsys):
  """Stopped in its 5th epoch with a checkpoint every 2 epochs, the classifier started
  again continues after epoch 4 and ends with the parameters, losses and test error of an
  uninterrupted run; a checkpoint of another seed or a torn one is not used."""
  _, _, t, bank = run
  x, y = t.splits.train_x[:200], t.splits.train_y[:200]
  kw = dict(
    hidden=16,
    epochs=6,
    augment=True,
    vae=t.setup.model,
    vae_params=t.params["model"],
    log_var=bank.log_var,
    batch_size=50,
    seed=3,
  )
  whole = classifier.train_classifier(x, y, t.splits.test_x[:100], t.splits.test_y[:100], **kw)
  ckpt = str(tmp_path / "c.partial.npz")
  real, calls = classifier.train_step, []

  def stopping(*a, **k):
    calls.append(1)
    if stop[0] and len(calls) == 4 * 4 + 2:  # 4 steps per epoch: inside epoch 5
      raise KeyboardInterrupt
    return real(*a, **k)

  stop = [True]
  monkeypatch.setattr(classifier, "train_step", stopping)
  ck = dict(checkpoint_path=ckpt, checkpoint_identity={"model": "m"}, checkpoint_every=2)
  with pytest.raises(KeyboardInterrupt):
    classifier.train_classifier(x, y, t.splits.test_x[:100], t.splits.test_y[:100], **kw, **ck)
  saved = bytes(open(ckpt, "rb").read())
  calls.clear()
  stop[0] = False
  again = classifier.train_classifier(
    x, y, t.splits.test_x[:100], t.splits.test_y[:100], **kw, **ck
  )
  assert len(calls) == 8 and "continuing after epoch 4" in capsys.readouterr().out
  assert again["losses"] == whole["losses"] and again["test_error"] == whole["test_error"]
  for a, b in zip(
    jax.tree_util.tree_leaves(again["params"]), jax.tree_util.tree_leaves(whole["params"])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for damage, seed in (("other settings", 4), ("unreadable", 3)):
    open(ckpt, "wb").write(saved if damage == "other settings" else saved[:64])
    calls.clear()
    classifier.train_classifier(
      x, y, t.splits.test_x[:100], t.splits.test_y[:100], **dict(kw, seed=seed), **ck
    )
    assert len(calls) == 24 and damage in capsys.readouterr().out, damage


def test_classifier_prints_a_progress_line_every_log_every_epochs(run, capsys):
  _, _, t, _ = run
  x, y = t.splits.train_x[:60], t.splits.train_y[:60]
  classifier.train_classifier(
    x, y, x[:10], y[:10], hidden=8, epochs=5, augment=False, batch_size=20, log_every=2
  )
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("mlp h=8")]
  assert [l.split("epoch ")[1].split(",")[0] for l in lines] == ["2/5", "4/5", "5/5"]
  classifier.train_classifier(
    x, y, x[:10], y[:10], hidden=8, epochs=2, augment=False, batch_size=20
  )
  assert "mlp h=8" not in capsys.readouterr().out  # silent by default


def test_augmentation_encodes_the_grey_image_unless_asked_for_bernoulli(run):
  _, _, t, bank = run
  model, mp = t.setup.model, t.params["model"]
  x = jnp.asarray(t.splits.train_x[:32])
  assert len(np.unique(np.asarray(x))) > 2  # grey levels
  assert not augment.binarise_before_encoding("grey", True)
  assert augment.binarise_before_encoding("bernoulli", True)
  assert not augment.binarise_before_encoding("bernoulli", False)
  with pytest.raises(ValueError, match="encode_input"):
    augment.binarise_before_encoding("gray", True)
  no_noise = jnp.float32(-1e4)  # s2 -> 0: z = mu(input)
  # Grey input: the decoded mean of the encoder mean of x itself, whatever the key.
  want = (
    np.round(
      np.clip(np.asarray(jax.nn.sigmoid(model.decode(mp, model.encode_mean(mp, x)))), 0, 1) * 255
    )
    / 255
  )
  for k in (0, 1):
    got = generation.augment_images(model, mp, x, no_noise, jax.random.PRNGKey(k), False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  # Bernoulli input: the binarisation alone moves the images between keys.
  b0 = generation.augment_images(model, mp, x, no_noise, jax.random.PRNGKey(0), True)
  b1 = generation.augment_images(model, mp, x, no_noise, jax.random.PRNGKey(1), True)
  assert np.abs(np.asarray(b0) - np.asarray(b1)).mean() > 1e-3
  spread = augment.augmentation_spread(
    model, mp, np.asarray(x), float(bank.log_var), binary=False, batch_size=10
  )
  assert spread["aug_to_recon"] > 0
  np.testing.assert_allclose(spread["recon_to_x"], np.abs(want - np.asarray(x)).mean(), rtol=1e-5)


def test_augmented_set_is_augment_images_batch_by_batch(run):
  _, _, t, bank = run
  model, mp = t.setup.model, t.params["model"]
  x = np.asarray(t.splits.train_x[:25])
  got = augment.augmented_set(
    model, mp, x, float(bank.log_var), binary=False, seed=3, batch_size=10
  )
  key = jax.random.PRNGKey(3)
  want = np.concatenate(
    [
      np.asarray(
        generation.augment_images(
          model,
          mp,
          jnp.asarray(x[lo : lo + 10]),
          jnp.float32(bank.log_var),
          jax.random.fold_in(key, lo),
          False,
        )
      )
      for lo in (0, 10, 20)
    ]
  )
  np.testing.assert_array_equal(got, want)
  assert got.shape == x.shape and np.abs(got - x).mean() > 0
  again = augment.augmented_set(
    model, mp, x, float(bank.log_var), binary=False, seed=4, batch_size=10
  )
  assert np.abs(again - got).mean() > 0  # the seed moves the noise


@pytest.mark.slow
def test_augmentation_over_seeds_reports_mean_and_spread(run):
  _, _, t, _ = run
  r = augment.run_augmentation(t, epochs=1, hidden=16, seeds=(0, 1, 2), max_steps=2)
  assert [row["seed"] for row in r["runs"]] == [0, 1, 2] and r["encode_input"] == "grey"
  for tag in ("without", "with"):
    errs = np.array([row[f"test_error_{tag}"] for row in r["runs"]])
    assert r[f"test_error_{tag}"] == pytest.approx(errs.mean())
    assert r[f"test_error_{tag}_std"] == pytest.approx(errs.std(ddof=1))
  assert set(r["spread"]) == {"aug_to_x", "recon_to_x", "aug_to_recon"}
  for what in ("train_error", "aug_error"):
    for tag in ("without", "with"):
      errs = np.array([row[f"{what}_{tag}"] for row in r["runs"]])
      assert np.all((errs >= 0) & (errs <= 1))
      assert r[f"{what}_{tag}"] == pytest.approx(errs.mean())
  assert r["probe"] == min(10000, r["num_train"])
  with pytest.raises(ValueError, match="seed"):
    augment.run_augmentation(t, epochs=1, hidden=16, seeds=(), max_steps=1)


def test_augmentation_trains_only_the_arms_asked_for_with_the_given_noise(run):
  _, _, t, _ = run
  r = augment.run_augmentation(
    t, epochs=1, hidden=16, seeds=(0,), max_steps=2, arms=("with",), log_var=-1.5
  )
  assert r["arms"] == ["with"] and r["log_var"] == -1.5 and r["log_var_source"] == "given"
  assert set(r["runs"][0]) >= {"test_error_with", "aug_error_with", "train_error_with"}
  assert not any(k.endswith("_without") for k in r) and "test_error_without" not in r["runs"][0]
  for bad in ((), ("with", "mixup")):
    with pytest.raises(ValueError, match="arms"):
      augment.run_augmentation(t, epochs=1, hidden=16, max_steps=1, arms=bad)


def test_augmentation_resumes_from_the_classifiers_it_finished(run, tmp_path, monkeypatch):
  """A stopped augmentation, started again with the same done_dir, trains only the
  classifiers it had not finished, and reports what one uninterrupted run reports; a torn
  record or one made with another s2 is trained again."""
  _, _, t, _ = run
  done = tmp_path / "runs"
  real, calls, kill_at = classifier.train_classifier, [], [3]

  def counting(*a, **k):
    calls.append((k["seed"], k["augment"]))
    if len(calls) == kill_at[0]:
      raise KeyboardInterrupt  # stopped while training the third classifier
    return real(*a, **k)

  monkeypatch.setattr(classifier, "train_classifier", counting)
  kw = dict(epochs=1, hidden=16, seeds=(0, 1), max_steps=2)
  with pytest.raises(KeyboardInterrupt):
    augment.run_augmentation(t, **kw, done_dir=str(done))
  assert sorted(os.listdir(done)) == ["seed0_with.json", "seed0_without.json"]
  calls.clear()
  kill_at[0] = 0
  resumed = augment.run_augmentation(t, **kw, done_dir=str(done))
  assert calls == [(1, False), (1, True)]
  assert resumed["reused"] == ["seed0_without", "seed0_with"]
  calls.clear()
  whole = augment.run_augmentation(t, **kw)
  assert len(calls) == 4 and whole["reused"] == []
  for got, want in zip(resumed["runs"], whole["runs"]):
    for key in want:
      if not key.startswith("seconds"):
        assert got[key] == want[key], key
  assert resumed["test_error_with"] == whole["test_error_with"]
  calls.clear()
  (done / "seed0_with.json").write_text('{"version": 1, "sett')
  again = augment.run_augmentation(
    t, **kw, done_dir=str(done), arms=("with",), log_var=resumed["log_var"]
  )
  assert calls == [(0, True)] and again["reused"] == ["seed1_with"]
  calls.clear()
  augment.run_augmentation(t, **kw, done_dir=str(done), arms=("with",), log_var=-1.5)
  assert calls == [(0, True), (1, True)]


def test_an_edited_classifier_record_is_trained_again(run, tmp_path, capsys):
  """A finished classifier's record whose test error was changed is not read back: it
  fails the digest written with it and the classifier is trained again (one line)."""
  _, _, t, _ = run
  kw = dict(
    epochs=1,
    hidden=16,
    seeds=(0,),
    max_steps=2,
    arms=("with",),
    log_var=-1.5,
    done_dir=str(tmp_path / "runs"),
  )
  first = augment.run_augmentation(t, **kw)
  path = tmp_path / "runs" / "seed0_with.json"
  rec = json.loads(path.read_text())
  rec["result"]["test_error"] = 0.0123
  path.write_text(json.dumps(rec))
  capsys.readouterr()
  again = augment.run_augmentation(t, **kw)
  said = [l for l in capsys.readouterr().out.splitlines() if str(path) in l]
  assert again["reused"] == [] and len(said) == 1 and "digest" in said[0], said
  assert again["test_error_with"] == first["test_error_with"] != 0.0123
  assert json.loads(path.read_text())["result"]["test_error"] == first["test_error_with"]


def test_knn_records_are_one_unit_checked_by_the_downstream_table(run, tmp_path):
  """knn.json records the digest of knn_per_example.npz and its rates are the file's; the
  table generator refuses a summary beside scores it was not written with."""
  from conftest import load_script

  config, workdir, _, _ = run
  root = tmp_path / "results"
  out = root / "m"
  commands.run("knn", config, workdir, out=str(out), ks=(3, 5))
  rec = json.loads((out / "knn.json").read_text())
  assert rec["per_example_sha256"] == atomic.sha256_file(str(out / knn.PER_EXAMPLE))
  assert not leftover_temporaries(str(out))
  dt = load_script("scripts/downstream_table.py")
  (out / "config.json").write_text(json.dumps({"prior": "exemplar", "dataset": "d", "model": "m"}))
  assert dt.main(["--results", str(root)]) == 0
  # New scores beside an old summary (a kill between two separate writes).
  with np.load(out / knn.PER_EXAMPLE) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["pred_k3"] = (arrays["pred_k3"] + 1) % 10
  np.savez(out / knn.PER_EXAMPLE, **arrays)
  assert dt.main(["--results", str(root)]) == 1
  # A summary edited to fit the file's digest but not its predictions.
  rec["per_example_sha256"] = atomic.sha256_file(str(out / knn.PER_EXAMPLE))
  (out / "knn.json").write_text(json.dumps(rec))
  with pytest.raises(dt.RecordError, match="k=3"):
    dt.generate(str(root))


def test_grey_splits_recover_grey_levels(run):
  config, _, t, _ = run
  g = classifier.grey_splits(config, t.splits)
  assert g.grey_eval
  np.testing.assert_array_equal(g.train_x, t.splits.train_x)
  np.testing.assert_array_equal(g.test_y, t.splits.test_y)
  assert g.test_x.shape == t.splits.test_x.shape
  assert len(np.unique(g.test_x)) > 2  # grey, not binarised


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_commands_end_to_end(run, tmp_path):
  config, workdir, t, bank = run
  out = str(tmp_path / "out")
  r = commands.run("bank", config, workdir, out)
  assert r["bank_bytes"] < r["raw_images_bytes"]
  saved = bank_lib.ExemplarBank.load(os.path.join(out, "bank.npz"))
  np.testing.assert_array_equal(saved.codes, bank.codes)
  np.testing.assert_array_equal(saved.labels, t.splits.train_y)

  r = commands.run(
    "generate",
    config,
    workdir,
    out,
    bank_path=os.path.join(out, "bank.npz"),
    num_exemplars=4,
    num_samples=3,
    chain_steps=4,
    interp_steps=5,
  )
  for k in ("conditional_png", "unconditional_png", "cyclic_png", "interpolation_png"):
    assert os.path.getsize(r[k]) > 0

  r = commands.run("knn", config, workdir, out, ks=(3, 5))
  with open(os.path.join(out, "knn.json")) as f:
    saved = json.load(f)
  assert set(saved["val"]) == {"3", "5"} and set(saved["test"]) == {"3", "5"}
  assert all(0 <= v <= 1 for v in saved["val"].values())
  assert saved["num_train"] == t.splits.train_x.shape[0]
  # The per-image record reproduces the error rates and is the file its digest names.
  with np.load(os.path.join(out, saved["per_example"])) as z:
    np.testing.assert_array_equal(z["labels"], t.splits.test_y)
    np.testing.assert_array_equal(z["val_labels"], t.splits.val_y)
    for k in ("3", "5"):
      assert np.mean(z[f"pred_k{k}"] != z["labels"]) == pytest.approx(saved["test"][k])
      assert np.mean(z[f"val_pred_k{k}"] != z["val_labels"]) == pytest.approx(saved["val"][k])
      assert np.mean(z[f"test_on_train_pred_k{k}"] != z["test_on_train_labels"]) == pytest.approx(
        saved["test_on_train"][k]
      )
    np.testing.assert_array_equal(z["test_on_train_labels"], t.splits.test_y)
  assert atomic.sha256_file(os.path.join(out, saved["per_example"])) == saved["per_example_sha256"]
  assert saved["model"]["path"] == workdir and saved["commit"]

  r = commands.run("augment", config, workdir, out, epochs=1, hidden=16, max_steps=3)
  with open(os.path.join(out, "augment.json")) as f:
    saved = json.load(f)
  assert {"test_error_with", "test_error_without"} <= set(saved) and saved["steps"] == 3
  assert saved["model"]["path"] == workdir and saved["commit"]

  r = commands.run("plots", config, workdir, out, tsne_points=60)
  assert os.path.getsize(r["tsne_png"]) > 0 and os.path.getsize(r["curves_png"]) > 0

  r = commands.run("grow", config, workdir, out)
  grown = bank_lib.ExemplarBank.load(r["path"])
  assert grown.size == bank.size + t.splits.val_x.shape[0] == r["num_after"]
  np.testing.assert_array_equal(grown.codes[: bank.size], bank.codes)
  np.testing.assert_array_equal(grown.labels[bank.size :], t.splits.val_y)
  assert r["val_log_pz_after"] > r["val_log_pz_before"]

  with pytest.raises(checkpoints.CheckpointNotFoundError):
    commands.run("bank", config, str(tmp_path / "empty"), out)
  with pytest.raises(ValueError, match="Unknown command"):
    commands.run("nope", config, workdir, out)


@pytest.mark.slow
def test_cli_script(run, tmp_path):
  _, workdir, _, _ = run
  out = str(tmp_path / "cli")
  cmd = [
    sys.executable,
    os.path.join(ROOT, "uses.py"),
    "bank",
    f"--config={os.path.join(ROOT, 'configs', 'test.py')}",
    f"--workdir={workdir}",
    f"--out={out}",
    "--config.progress=False",
  ]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "bytes on disk vs" in p.stdout and os.path.exists(os.path.join(out, "bank.npz"))


@pytest.mark.slow
def test_downstream_script_writes_the_records_of_a_published_model(run, tmp_path):
  """scripts/downstream.sh on a published tiny model: knn.json and augment.json with their
  provenance, the pictures; a missing model or an unknown step is a one-line error."""
  from exvae import published, rundir

  config, workdir, t, _ = run
  model = tmp_path / "model"
  published.save(
    str(model),
    t.params,
    rundir.read_stored_config(workdir),
    {"best_epoch": int(t.meta["best_epoch"]), "source_run": "tiny"},
  )
  env = dict(
    os.environ,
    PY=sys.executable,
    MODEL=str(model),
    RESULTS=str(tmp_path / "res"),
    IMAGES=str(tmp_path / "img"),
    RUN=workdir,
    SEEDS="0",
    EPOCHS="1",
    MAX_STEPS="2",
    SCRATCH=str(tmp_path / "scratch"),
  )
  script = os.path.join(ROOT, "scripts", "downstream.sh")
  proc = subprocess.run(
    ["bash", script, "tiny", "knn", "augment", "pictures"],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  knn_rec = json.loads((tmp_path / "res" / "tiny" / "knn.json").read_text())
  aug = json.loads((tmp_path / "res" / "tiny" / "augment.json").read_text())
  assert set(knn_rec["test"]) == {"3", "5", "9", "15"} and knn_rec["model"]["source_run"] == "tiny"
  with np.load(tmp_path / "res" / "tiny" / "knn_per_example.npz") as z:
    assert np.mean(z["pred_k9"] != z["labels"]) == pytest.approx(knn_rec["test"]["9"])
  assert aug["steps"] == 2 and aug["model"]["params_sha256"] == knn_rec["model"]["params_sha256"]
  for name in ("conditional", "unconditional", "cyclic", "interpolation", "tsne", "curves"):
    assert (tmp_path / "img" / f"{name}.png").stat().st_size > 0
  # Started again, the augmentation reads its finished classifiers from the scratch folder.
  again = subprocess.run(
    ["bash", script, "tiny", "augment"], env=env, capture_output=True, text=True, timeout=900
  )
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  aug2 = json.loads((tmp_path / "res" / "tiny" / "augment.json").read_text())
  assert (
    aug2["reused"] == ["seed0_without", "seed0_with"]
    and aug2["runs"][0]["test_error_with"] == aug["runs"][0]["test_error_with"]
  )
  bad = subprocess.run(["bash", script, "tiny", "nope"], env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown step" in bad.stderr
  env["MODEL"] = str(tmp_path / "missing")
  gone = subprocess.run(["bash", script, "tiny"], env=env, capture_output=True, text=True)
  assert gone.returncode == 2 and "no published model" in gone.stderr
