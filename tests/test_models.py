"""Models (VAE, HVAE, ConvHVAE): parameter counts, shapes, clipping, training under every prior, log w."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from exvae import evaluation, train_lib
from exvae.likelihoods import diag_gaussian_log_prob, get_likelihood
from exvae.models import MODELS, make_model
from exvae.models.hvae import hierarchical_noise
from exvae.objectives import elbo_loss, log_importance_weights

MODEL_NAMES = ("vae", "hvae", "convhvae")
LIKELIHOODS = ("bernoulli", "logistic")


# ----------------------------------------------------------------------------
# Parameter counts from the architecture formulas (paper sizes, 28x28x1)
# ----------------------------------------------------------------------------


def lin(i, o):  # Linear(i, o) with bias
  return i * o + o


def gd(i, o):  # GatedDense: two Linear(i, o)
  return 2 * lin(i, o)


def gc(k, i, o):  # GatedConv2d(k x k): two Conv(i, o) with bias
  return 2 * (k * k * i * o + o)


def expected_params(model: str, likelihood: str, d=784, c=1, z2=40, z1=40, h=300) -> int:
  heads = 2 if likelihood == "logistic" else 1  # mean (+ log-scale) output layers
  if model == "vae":
    enc = gd(d, h) + gd(h, h) + 2 * lin(h, z2)
    dec = gd(z2, h) + gd(h, h) + heads * lin(h, d)
    return enc + dec
  p_z1 = gd(z2, h) + gd(h, h) + 2 * lin(h, z1)
  if model == "hvae":
    q_z2 = gd(d, h) + gd(h, h) + 2 * lin(h, z2)
    q_z1 = gd(d, h) + gd(z2, h) + gd(2 * h, h) + 2 * lin(h, z1)
    p_x = gd(z1, h) + gd(z2, h) + gd(2 * h, h) + heads * lin(h, d)
    return q_z2 + q_z1 + p_z1 + p_x
  assert model == "convhvae"
  hs = 6 * 7 * 7  # 294 encoder features for 28x28
  assert hs == 294
  q_z2 = (
    gc(7, c, 32) + gc(3, 32, 32) + gc(5, 32, 64) + gc(3, 64, 64) + gc(3, 64, 6) + 2 * lin(hs, z2)
  )
  q_z1 = (
    gc(3, c, 32)
    + gc(3, 32, 32)
    + gc(3, 32, 64)
    + gc(3, 64, 64)
    + gc(3, 64, 6)
    + gd(z2, hs)
    + gd(2 * hs, h)
    + 2 * lin(h, z1)
  )
  p_x = (
    gd(z1, h) + gd(z2, h) + gd(2 * h, d) + gc(3, c, 64) + 3 * gc(3, 64, 64) + heads * lin(64, c)
  )  # 1x1 conv head(s)
  return q_z2 + q_z1 + p_z1 + p_x


def _paper_config(model, likelihood="bernoulli", **kw):
  return load_config(
    "test",
    model=model,
    likelihood=likelihood,
    latent_dim=40,
    hidden=(300, 300),
    **{"hvae.z1_dim": 40},
    **kw,
  )


def _count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_parameter_count_matches_architecture(model, likelihood):
  m = make_model(_paper_config(model, likelihood), (28, 28, 1))
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0))  # shapes only: no compute
  assert _count(params) == expected_params(model, likelihood)


def test_reference_sizes():
  # The ConvHVAE encoders end in 6 x 7 x 7 = 294 features for 28x28 (the paper's number).
  m = make_model(_paper_config("convhvae"), (28, 28, 1))
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0))
  assert p["q_z2_head"]["mu"]["kernel"].shape == (294, 40)
  joint = p["q_z1_joint"]
  assert joint["h"]["kernel"].shape == joint["g"]["kernel"].shape == (2 * 294, 300)
  assert p["p_x_pre"]["h"]["kernel"].shape == (600, 784)
  # The Bernoulli VAE is unchanged: exactly vae.make_vae's parameters.
  from exvae.models import vae

  a = jax.eval_shape(make_model(_paper_config("vae"), (28, 28, 1)).init, jax.random.PRNGKey(0))
  b = jax.eval_shape(vae.make_vae(_paper_config("vae"), (28, 28, 1)).init, jax.random.PRNGKey(0))
  assert jax.tree.structure(a) == jax.tree.structure(b)


# ----------------------------------------------------------------------------
# Shapes and clipping (small widths, real and odd image shapes)
# ----------------------------------------------------------------------------


def _small_config(model, likelihood="bernoulli", **kw):
  return load_config(
    "test",
    model=model,
    likelihood=likelihood,
    latent_dim=3,
    hidden=(8, 8),
    **{"hvae.z1_dim": 2, "hvae.conv_channels": (4, 4, 8, 8, 2), "hvae.dec_channels": (4, 4)},
    **kw,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "model,likelihood,shape",
  [(m, lik, (28, 28, 1)) for m in MODEL_NAMES for lik in LIKELIHOODS]
  + [("convhvae", lik, (7, 9, 3)) for lik in LIKELIHOODS],  # odd sizes, colour: 'SAME' padding
  ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_shapes_and_log_variance_clip(model, likelihood, shape):
  m = make_model(_small_config(model, likelihood), shape)
  p = m.init(jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3,) + shape), jnp.float32)
  mu, logvar = m.encode(p, x * 1e4)  # extreme inputs hit the clip
  chex.assert_shape([mu, logvar], (3, 3))
  assert float(logvar.min()) >= -6.0 and float(logvar.max()) <= 2.0
  np.testing.assert_allclose(
    np.asarray(m.encode_mean(p, x)), np.asarray(m.encode(p, x)[0]), rtol=1e-5, atol=1e-6
  )
  out = m.decode(p, mu * 1e3)
  if likelihood == "bernoulli":
    chex.assert_shape(out, (3,) + shape)
  else:
    mean, log_scale = out
    chex.assert_shape([mean, log_scale], (3,) + shape)
    assert float(mean.min()) >= 0.0 and float(mean.max()) <= 1.0
    assert float(log_scale.min()) >= -4.5 and float(log_scale.max()) <= 0.0
  log_lik, mean_fn = get_likelihood(likelihood)
  chex.assert_shape(mean_fn(out), (3,) + shape)
  xq = jnp.round(x * 255) / 255 if likelihood == "logistic" else jnp.round(x)
  sc = m.score(p, xq, jax.random.PRNGKey(1), 5, log_lik)
  chex.assert_shape(sc.z, (3, 5, 3))
  chex.assert_shape(sc.mu, (3, 3))
  chex.assert_shape([sc.log_px, sc.log_p_rest, sc.log_q], (3, 5))
  chex.assert_tree_all_finite([sc.z, sc.mu, sc.log_px, sc.log_p_rest, sc.log_q])
  if model == "vae":
    np.testing.assert_array_equal(np.asarray(sc.log_p_rest), 0.0)
  else:  # z1 heads clip too
    big = jnp.full((3, 3), 1e4)
    for method, args in (
      ("p_z1", (big,)),
      ("q_z1", (m.module.apply({"params": p}, x * 1e4, method="q_z1_features"), big)),
    ):
      mu1, lv1 = m.module.apply({"params": p}, *args, method=method)
      chex.assert_shape([mu1, lv1], (3, 2))
      assert float(lv1.min()) >= -6.0 and float(lv1.max()) <= 2.0


def test_unknown_model_and_likelihood_are_errors():
  with pytest.raises(ValueError, match="Unknown model"):
    make_model(load_config("test", model="pixelsnail"), (8, 8, 1))
  with pytest.raises(ValueError, match="Unknown likelihood"):
    make_model(load_config("test", model="hvae", likelihood="gaussian"), (8, 8, 1))
  assert set(MODELS) == set(MODEL_NAMES) | {"pixelcnn"}  # pixelcnn: tests/test_pixelcnn.py


# ----------------------------------------------------------------------------
# Training on the tiny digits config under every prior
# ----------------------------------------------------------------------------


def _setup(model, **overrides):
  c = load_config(
    "test",
    model=model,
    **{"hvae.z1_dim": 4, "hvae.conv_channels": (8, 8, 16, 16, 4), "hvae.dec_channels": (8, 8)},
    **overrides,
  )
  splits = train_lib.load_data(c)
  return c, splits, train_lib.make_setup(c, splits)


@pytest.mark.parametrize(
  "prior,rat", [("gaussian", False), ("vampprior", False), ("exemplar", False), ("exemplar", True)]
)
@pytest.mark.parametrize(
  "model", [m if m == "vae" else pytest.param(m, marks=pytest.mark.slow) for m in MODEL_NAMES]
)  # the MLP VAE in the fast tier
def test_trains_under_every_prior(model, prior, rat):
  c, splits, setup = _setup(model, prior=prior, **{"exemplar.rat": rat})
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  state = train_lib.refresh_step(state, pool, setup=setup)
  losses = []
  for _ in range(30):
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-8:]) < np.mean(losses[:8]), losses
  assert int(state.nonfinite) == 0


# ----------------------------------------------------------------------------
# The HVAE's log w: every term, and the IWAE bound with S = 1
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hvae", "convhvae"])
def test_hierarchical_log_w_terms_and_iwae_s1(model):
  c, splits, setup = _setup(model, prior="gaussian")
  state = train_lib.init_state(c, setup, splits.train_x.shape[0])
  params = state.params
  x = jnp.asarray(splits.test_x[:16])
  key = jax.random.PRNGKey(5)
  mp, mod = params["model"], setup.model.module
  apply = lambda method, *a: mod.apply({"params": mp}, *a, method=method)  # noqa: E731

  # log w recomputed by hand from the four densities, with the score's own noise.
  eps2, eps1 = hierarchical_noise(key, 16, 1, c.latent_dim, c.hvae.z1_dim)
  mu2, lv2 = apply("encode", x)
  z2 = mu2 + jnp.exp(0.5 * lv2) * eps2[:, 0]
  mu1, lv1 = apply("q_z1", apply("q_z1_features", x), z2)
  z1 = mu1 + jnp.exp(0.5 * lv1) * eps1[:, 0]
  pm1, plv1 = apply("p_z1", z2)
  log_px = setup.log_lik(x, apply("p_x", z1, z2))
  log_pz2 = -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + z2**2, -1)
  log_q = diag_gaussian_log_prob(z2, mu2, lv2) + diag_gaussian_log_prob(z1, mu1, lv1)
  want = log_px + log_pz2 + diag_gaussian_log_prob(z1, pm1, plv1) - log_q

  log_w, lpx, lpz, lqz = log_importance_weights(params, setup, None, x, key, 1)
  np.testing.assert_allclose(np.asarray(log_w[:, 0]), np.asarray(want), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(log_w), np.asarray(lpx + lpz - lqz), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lpx[:, 0]), np.asarray(log_px), rtol=1e-5, atol=1e-3)

  # The training loss at beta = 1 is -mean log w of the same sample.
  _, k_z = jax.random.split(key)
  loss, _ = elbo_loss(
    params, state.prior_state, setup, x, jnp.full((16,), -1, jnp.int32), key, jnp.float32(1.0), None
  )
  lw_kz = log_importance_weights(params, setup, None, x, k_z, 1)[0]
  np.testing.assert_allclose(float(loss), -float(lw_kz.mean()), rtol=1e-5)

  # The IWAE bound with S = 1 is log w itself (same key schedule as evaluate_split).
  r = evaluation.evaluate_split(params, setup, None, np.asarray(x), key, num_samples=1)
  kb = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
  lw1 = log_importance_weights(params, setup, None, x, kb, 1)[0][:, 0]
  np.testing.assert_allclose(r["log_px_iwae"], np.asarray(lw1), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(r["elbo"], np.asarray(lw1), rtol=1e-5, atol=1e-3)
  # More samples tighten the bound (on average).
  r64 = evaluation.evaluate_split(params, setup, None, np.asarray(x), key, num_samples=64)
  assert r64["log_px_iwae"].mean() > r64["elbo"].mean()


# ----------------------------------------------------------------------------
# Every config builds its model and prior at the data set's real image shape
# ----------------------------------------------------------------------------

_SHAPES = {
  "mnist": (28, 28, 1),
  "fashion_mnist": (28, 28, 1),
  "omniglot": (28, 28, 1),
  "digits": (8, 8, 1),
  "celeba": (64, 64, 3),
}


def _config_names():
  import glob
  import os
  from conftest import ROOT

  return sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", _config_names())
def test_every_config_builds(name):
  from exvae.priors import make_prior

  c = load_config(name)
  m = make_model(c, _SHAPES[c.dataset])
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0))
  prior = make_prior(c.prior, c)
  jax.eval_shape(lambda k: prior.init(k, m, 50000), jax.random.PRNGKey(0))
  assert _count(params) > 0
  if name.split("_")[0] in ("mnist", "fashion", "omniglot") and c.model != "vae":
    assert c.latent_dim == 40 and c.hvae.z1_dim == 40 and tuple(c.hidden) == (300, 300)
    if c.model == "pixelcnn":
      from test_pixelcnn import expected_params as pixelcnn_params

      assert _count(params) == pixelcnn_params(likelihood=c.likelihood)
    else:
      assert _count(params) == expected_params(c.model, c.likelihood)


def test_paper_config_rejects_unknown_rows():
  from exvae.config_base import paper_config

  c = paper_config("omniglot", "hvae", "exemplar", rat=True)
  assert c.exemplar.num_exemplars == 11500 and c.exemplar.rat and c.exemplar.rat_k == 10
  with pytest.raises(ValueError, match="No paper config"):
    paper_config("cifar10", "vae", "gaussian")
  with pytest.raises(ValueError, match="rat=True needs the exemplar prior"):
    paper_config("mnist", "vae", "vampprior", rat=True)
  with pytest.raises(AttributeError):
    c.not_a_key = 1  # locked, like every config


@pytest.mark.slow
def test_celeba_logistic_convhvae_trains_on_mock_tfds_data():
  """The CelebA path end to end on tfds mock data (random pixels): loader, logistic, RAT."""
  tfds = pytest.importorskip("tensorflow_datasets")
  c = load_config(
    "celeba_convhvae_exemplar",
    batch_size=8,
    latent_dim=4,
    hidden=(16, 16),
    **{
      "hvae.z1_dim": 4,
      "hvae.conv_channels": (4, 4, 8, 8, 2),
      "hvae.dec_channels": (4, 4),
      "exemplar.num_exemplars": 16,
      "exemplar.rat_k": 2,
      "exemplar.chunk_size": 16,
    },
  )
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    splits = train_lib.load_data(c)
  assert splits.name == "celeba" and not splits.binary
  assert splits.train_x.shape == (24, 64, 64, 3) and splits.val_x.shape == (24, 64, 64, 3)
  np.testing.assert_allclose(splits.test_x * 255, np.round(splits.test_x * 255), atol=1e-4)
  setup = train_lib.make_setup(c, splits)
  state = train_lib.init_state(c, setup, 24)
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, 24))
  state = train_lib.refresh_step(state, pool, setup=setup)
  losses = []
  for _ in range(12):
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and int(state.nonfinite) == 0
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
