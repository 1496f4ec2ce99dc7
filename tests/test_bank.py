"""ExemplarBank: persistence, incremental growth, density / sampling / retrieval."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import load_config
from exvae import train_lib
from exvae.bank import ExemplarBank, encode_images
from exvae.models import make_model
from exvae.priors.exemplar import encode_pool

LOG_VAR = -3.0


@pytest.fixture(scope="module")
def env():
  c = load_config("test")
  splits = train_lib.load_data(c)
  model = make_model(c, splits.image_shape)
  params = model.init(jax.random.PRNGKey(0))
  return model, params, splits


def _build(env, lo=0, hi=None, **kw):
  model, params, splits = env
  x, y = splits.train_x, splits.train_y
  hi = x.shape[0] if hi is None else hi
  return ExemplarBank.build(
    model,
    params,
    x[lo:hi],
    ids=np.arange(lo, hi),
    labels=y[lo:hi],
    log_var=LOG_VAR,
    binary=True,
    key=jax.random.PRNGKey(5),
    batch_size=256,
    metadata={"dataset": "digits", "source": "train"},
    **kw,
  )


def test_save_load_round_trip_and_size(env, tmp_path):
  bank = _build(env)
  path = str(tmp_path / "sub" / "bank.npz")
  nbytes = bank.save(path)
  assert os.path.getsize(path) == nbytes == bank.nbytes_on_disk()
  assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]  # atomic: no leftovers
  loaded = ExemplarBank.load(path)
  np.testing.assert_array_equal(loaded.codes, bank.codes)
  np.testing.assert_array_equal(loaded.ids, bank.ids)
  np.testing.assert_array_equal(loaded.labels, bank.labels)
  np.testing.assert_array_equal(loaded.key_data, bank.key_data)
  assert loaded.codes.dtype == np.float32 and loaded.ids.dtype == np.int64
  assert loaded.labels.dtype == np.int32
  assert loaded.log_var == pytest.approx(LOG_VAR)
  assert loaded.metadata == bank.metadata and loaded.metadata["image_shape"] == [8, 8, 1]
  raw = bank.size * 8 * 8 * 1
  assert bank.raw_images_nbytes == raw
  assert nbytes < raw, (nbytes, raw)
  rep = bank.size_report(path)
  assert rep["bank_bytes"] == nbytes and rep["ratio"] < 1
  # Overwriting in place works and unlabeled banks round-trip too.
  unl = dataclasses.replace(bank, labels=None)
  unl.save(path)
  assert ExemplarBank.load(path).labels is None


def test_codes_follow_the_evaluation_prior_convention(env):
  """Default ids = row index: the codes equal encode_pool's (eval prior) for the same key."""
  model, params, splits = env
  key = jax.random.PRNGKey(5)
  bank = ExemplarBank.build(
    model, params, splits.train_x, log_var=0.0, binary=True, key=key, batch_size=256
  )
  ref = encode_pool(model, params, jnp.asarray(splits.train_x), key, True)
  np.testing.assert_allclose(bank.codes, np.asarray(ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bank.ids, np.arange(splits.train_x.shape[0]))


def test_incremental_add_equals_union(env):
  model, params, splits = env
  whole = _build(env, 0, 300)
  part = _build(env, 0, 100)
  grown = part.add(
    model, params, splits.train_x[100:250], ids=np.arange(100, 250), labels=splits.train_y[100:250]
  )
  grown = grown.add(model, params, splits.train_x[250:300], labels=splits.train_y[250:300])
  assert part.size == 100  # the original is unchanged
  np.testing.assert_allclose(grown.codes, whole.codes, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(grown.ids, whole.ids)  # default new ids continue at 250
  np.testing.assert_array_equal(grown.labels, whole.labels)
  assert grown.log_var == whole.log_var
  with pytest.raises(ValueError, match="collide"):
    part.add(model, params, splits.train_x[:5], ids=np.arange(5), labels=splits.train_y[:5])


def test_log_prob_and_nearest_match_brute_force(env):
  bank = _build(env, 0, 200)
  z = np.random.default_rng(0).normal(size=(7, bank.latent_dim)).astype(np.float32) * 0.5
  z = np.concatenate([z, bank.codes[:3]])
  s2 = np.exp(LOG_VAR)
  d2 = ((z[:, None].astype(np.float64) - bank.codes[None]) ** 2).sum(-1)
  log_n = -0.5 * d2 / s2 - 0.5 * bank.latent_dim * np.log(2 * np.pi * s2)
  expect = logsumexp(log_n, axis=1) - np.log(bank.size)
  np.testing.assert_allclose(bank.log_prob(z), expect, rtol=1e-4, atol=1e-3)
  dist, rows = bank.nearest(z, 4)
  np.testing.assert_array_equal(rows, np.argsort(d2, axis=1, kind="stable")[:, :4])
  np.testing.assert_allclose(dist, np.sort(d2, axis=1)[:, :4], rtol=1e-4, atol=1e-4)


def test_adding_exemplars_changes_density_and_sampling_not_params(env):
  model, params, splits = env
  before_params = jax.tree.map(np.array, params)
  old = _build(env, 0, 200)
  new_x, new_y = splits.train_x[600:640], splits.train_y[600:640]
  new_codes = encode_images(model, params, new_x, np.arange(600, 640), old.key, binary=True)
  grown = old.add(model, params, new_x, ids=np.arange(600, 640), labels=new_y)
  # Parameters untouched (growing the model is not training).
  jax.tree.map(np.testing.assert_array_equal, before_params, jax.tree.map(np.array, params))
  assert grown.size == 240 and old.size == 200
  np.testing.assert_allclose(grown.codes[200:], new_codes, rtol=1e-6, atol=1e-6)
  # Adding ONE exemplar always raises log p at its own code: p_new = (N p_old + K(0)) / (N + 1)
  # and K(0) (the kernel's peak) exceeds p_old, an average of kernels that are all <= K(0).
  for i in range(5):
    one = old.add(model, params, new_x[i : i + 1], ids=[600 + i], labels=new_y[i : i + 1])
    assert one.log_prob(new_codes[i : i + 1])[0] > old.log_prob(new_codes[i : i + 1])[0]
    # The un-normalised kernel sum rises everywhere; the density drops far from the new code.
    far = new_codes[i : i + 1] + 50.0
    assert one.log_prob(far)[0] < old.log_prob(far)[0]
  # Sampling from a bank of only the new exemplars lands near them.
  only_new = ExemplarBank.build(
    model,
    params,
    new_x,
    ids=np.arange(600, 640),
    labels=new_y,
    log_var=LOG_VAR,
    binary=True,
    key=old.key,
  )
  np.testing.assert_allclose(only_new.codes, new_codes, rtol=1e-6, atol=1e-6)
  z, rows = only_new.sample(jax.random.PRNGKey(1), 500)
  assert z.shape == (500, old.latent_dim) and rows.min() >= 0 and rows.max() < 40
  d_src = np.linalg.norm(z - only_new.codes[rows], axis=1)
  assert np.sqrt(np.mean(d_src**2)) == pytest.approx(
    np.exp(0.5 * LOG_VAR) * np.sqrt(old.latent_dim), rel=0.15
  )
  # With a narrow kernel, a sample's nearest exemplar in the grown bank is (nearly always)
  # one of the new exemplars, and the samples score higher under the grown bank.
  tight = dataclasses.replace(only_new, log_var=-9.0)
  z, rows = tight.sample(jax.random.PRNGKey(2), 500)
  _, nn_rows = dataclasses.replace(grown, log_var=-9.0).nearest(z, 1)
  assert np.mean(nn_rows[:, 0] >= 200) > 0.9
  assert np.mean(grown.log_prob(z)) > np.mean(old.log_prob(z))


def test_bad_inputs(env, tmp_path):
  model, params, splits = env
  with pytest.raises(ValueError, match="shape"):
    ExemplarBank.build(
      model,
      params,
      np.zeros((3, 28, 28, 1), np.float32),
      log_var=0.0,
      binary=True,
      key=jax.random.PRNGKey(0),
    )
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    ExemplarBank.build(
      model,
      params,
      np.full((3, 8, 8, 1), 255.0, np.float32),
      log_var=0.0,
      binary=True,
      key=jax.random.PRNGKey(0),
    )
  bad = tmp_path / "x.npz"
  np.savez(bad, a=np.zeros(3))
  with pytest.raises(ValueError, match="not an exemplar bank"):
    ExemplarBank.load(str(bad))
