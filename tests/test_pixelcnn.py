"""PixelCNN-decoder VAE: causality, teacher-forced scores, mean-field decoding, sampling, training."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, train_traced_once
from exvae import evaluation
from exvae.likelihoods import (
  bernoulli_log_prob,
  diag_gaussian_log_prob,
  discretized_logistic_log_prob,
  get_likelihood,
)
from exvae.models import MODELS, make_model
from exvae.models import pixelcnn

TINY = {"pixelcnn.channels": 8, "pixelcnn.num_layers": 2, "pixelcnn.kernel_size": 3}


def _config(**overrides):
  return load_config("test", model="pixelcnn", **dict(TINY, **overrides))


def _model(shape=(8, 8, 1), **overrides):
  m = make_model(_config(**overrides), shape)
  return m, m.init(jax.random.PRNGKey(0))


def _binary(key, shape):
  return (jax.random.uniform(key, shape) > 0.5).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(m, params, x, z):
  """Teacher-forced decoder output (jitted: eager convolutions compile op by op)."""
  return m.module.apply({"params": params}, x, z, method="logits")


# ----------------------------------------------------------------------------
# Causality: output (i, j) depends exactly on the pixels before (i, j)
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_output_depends_only_on_earlier_pixels(kernel_size):
  h, w = 8, 8
  m, params = _model(**{"pixelcnn.kernel_size": kernel_size})
  x = _binary(jax.random.PRNGKey(1), (1, h, w, 1))
  z = jax.random.normal(jax.random.PRNGKey(2), (1, m.latent_dim))
  jac = jax.jit(jax.jacrev(lambda x: _logits(m, params, x, z)))(x)
  jac = np.asarray(jac).reshape(h * w, h * w)  # [output pixel, input pixel], raster
  out_idx, in_idx = np.meshgrid(np.arange(h * w), np.arange(h * w), indexing="ij")
  # No output sees itself or any later pixel: exactly zero (no path at all).
  assert np.all(jac[in_idx >= out_idx] == 0.0)
  # ... and the network is alive: the left, upper and upper-right neighbours
  # (the last is the classic PixelCNN blind spot) always reach the output.
  for i in range(h):
    for j in range(w):
      o = i * w + j
      for di, dj in ((0, -1), (-1, 0), (-1, 1), (-1, -1)):
        if 0 <= i + di < h and 0 <= j + dj < w:
          assert jac[o, (i + di) * w + j + dj] != 0.0, (i, j, di, dj)
  # The vertical receptive field is what the architecture says: p + 1 rows
  # for the 'A' layer, p more per 'B' layer (3 layers in all).
  p = kernel_size // 2
  reach = 3 * p + 1
  below = (h - 1) * w  # output (h-1, 0)
  assert jac[below, (h - 1 - min(reach, h - 1)) * w] != 0.0
  if reach < h - 1:
    assert np.all(jac[below, : (h - 2 - reach) * w + w] == 0.0)


# ----------------------------------------------------------------------------
# Scores: teacher-forced log p(x|z) with the posterior samples
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_score_is_teacher_forced_log_likelihood(likelihood):
  m, params = _model(likelihood=likelihood)
  b, s, d = 4, 3, m.latent_dim
  u = jax.random.uniform(jax.random.PRNGKey(1), (b, 8, 8, 1))
  x = jnp.round(u) if likelihood == "bernoulli" else jnp.round(u * 255) / 255
  log_lik, _ = get_likelihood(likelihood)
  key = jax.random.PRNGKey(3)
  sc = jax.jit(lambda p, x, k: vars(m.score(p, x, k, s, log_lik)))(params, x, key)
  sc = type("Scores", (), sc)  # attribute access, as Scores
  chex.assert_shape(sc.z, (b, s, d))
  chex.assert_shape(sc.mu, (b, d))
  chex.assert_shape([sc.log_px, sc.log_p_rest, sc.log_q], (b, s))
  chex.assert_tree_all_finite([sc.z, sc.mu, sc.log_px, sc.log_q])
  np.testing.assert_array_equal(np.asarray(sc.log_p_rest), 0.0)
  # By hand, with the score's own noise convention (vae.gaussian_score's).
  mu, logvar = m.encode(params, x)
  z = mu[:, None] + jnp.exp(0.5 * logvar)[:, None] * jax.random.normal(key, (b, s, d))
  np.testing.assert_allclose(np.asarray(sc.z), np.asarray(z), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(sc.log_q),
    np.asarray(diag_gaussian_log_prob(z, mu[:, None], logvar[:, None])),
    rtol=1e-5,
    atol=1e-4,
  )
  lp = bernoulli_log_prob if likelihood == "bernoulli" else discretized_logistic_log_prob
  for k in range(s):
    want = lp(x, _logits(m, params, x, z[:, k]))
    np.testing.assert_allclose(np.asarray(sc.log_px[:, k]), np.asarray(want), rtol=1e-5, atol=1e-3)
  # The decoder reads x: a different image under the same z scores differently.
  x2 = 1.0 - x if likelihood == "bernoulli" else jnp.round((1.0 - x) * 255) / 255
  assert not np.allclose(
    np.asarray(lp(x2, _logits(m, params, x2, z[:, 0]))),
    np.asarray(lp(x2, _logits(m, params, x, z[:, 0]))),
  )


# ----------------------------------------------------------------------------
# Sequential decoding
# ----------------------------------------------------------------------------


def _naive_mean_field(m, params, z):
  """Reference: the whole network run on the canvas once per pixel, raster order."""
  h, w, _ = m.image_shape
  _, mean_fn = get_likelihood(m.module.likelihood)

  def body(t, canvas):
    mean = mean_fn(_logits(m, params, canvas, z))
    i, j = t // w, t % w
    return canvas.at[:, i, j].set(mean[:, i, j])

  return jax.lax.fori_loop(0, h * w, body, jnp.zeros((z.shape[0],) + m.image_shape))


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_mean_field_decode_is_a_fixed_point(likelihood):
  m, params = _model(likelihood=likelihood, **{"pixelcnn.kernel_size": 5})
  _, mean_fn = get_likelihood(likelihood)
  z = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (5, m.latent_dim))
  canvas = jax.jit(lambda p, z: pixelcnn.mean_field_canvas(m.module, p, z))(params, z)
  chex.assert_shape(canvas, (5, 8, 8, 1))
  # Teacher-forced means on the canvas reproduce it.
  np.testing.assert_allclose(
    np.asarray(mean_fn(_logits(m, params, canvas, z))), np.asarray(canvas), atol=1e-5
  )
  # The incremental (cached) decoder equals the naive one pixel at a time.
  np.testing.assert_allclose(
    np.asarray(canvas), np.asarray(_naive_mean_field(m, params, z)), atol=1e-5
  )
  assert float(jnp.std(canvas)) > 1e-3  # not a constant picture
  # (Model.decode, the decoder output on this canvas, is checked through the
  # validation pictures in test_trains_under_every_prior.)


def _naive_bernoulli_samples(m, params, z, key):
  """Reference sampler: the whole network once per pixel, pixel t drawn with fold_in(key, t)."""
  h, w, _ = m.image_shape

  def body(t, canvas):
    i, j = t // w, t % w
    logit = _logits(m, params, canvas, z)[:, i, j]  # (N, C)
    noise = jax.random.logistic(jax.random.fold_in(key, t), logit.shape)
    return canvas.at[:, i, j].set((noise < logit).astype(jnp.float32))

  return jax.lax.fori_loop(0, h * w, body, jnp.zeros((z.shape[0],) + m.image_shape))


def test_sample_images_are_binary_draws_of_the_decoder():
  m, params = _model()
  key = jax.random.PRNGKey(0)
  z = jax.random.normal(jax.random.PRNGKey(5), (16, m.latent_dim))
  a = pixelcnn.sample_images(m, params, z, key)
  chex.assert_shape(a, (16, 8, 8, 1))
  assert set(np.unique(np.asarray(a))) <= {0.0, 1.0}
  assert not np.array_equal(
    np.asarray(a), np.asarray(pixelcnn.sample_images(m, params, z, jax.random.PRNGKey(1)))
  )
  # The incremental sampler draws what the naive one does with the same noise.
  np.testing.assert_array_equal(
    np.asarray(a), np.asarray(_naive_bernoulli_samples(m, params, z, key))
  )
  # Pixel (0, 0) has no context: its frequency over n draws is sigmoid(logit).
  n = 400
  zz = jnp.tile(z[:1], (n, 1))
  b = pixelcnn.sample_images(m, params, zz, key)
  p0 = float(jax.nn.sigmoid(_logits(m, params, b[:1], zz[:1])[0, 0, 0, 0]))
  assert abs(float(b[:, 0, 0, 0].mean()) - p0) < 4 * np.sqrt(p0 * (1 - p0) / n) + 1e-3


def test_logistic_samples_lie_on_the_256_level_grid():
  m, params = _model(likelihood="logistic")
  z = jax.random.normal(jax.random.PRNGKey(6), (3, m.latent_dim))
  x = np.asarray(pixelcnn.sample_images(m, params, z, jax.random.PRNGKey(0)))
  assert x.shape == (3, 8, 8, 1) and x.min() >= 0.0 and x.max() <= 1.0
  np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-4)
  assert len(np.unique(x)) > 10


# ----------------------------------------------------------------------------
# Training under every prior (and the train step traces once)
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
  "prior,rat", [("gaussian", False), ("vampprior", False), ("exemplar", False), ("exemplar", True)]
)
def test_trains_under_every_prior(prior, rat):
  setup, state, pool, losses = train_traced_once(_config(prior=prior, **{"exemplar.rat": rat}), 30)
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-8:]) < np.mean(losses[:8]), losses
  assert int(state.nonfinite) == 0
  if prior == "exemplar" and rat:
    # Validation pictures: mean(Model.decode(z)) is the mean-field canvas of
    # prior samples and of the posterior means, a fixed point of the
    # teacher-forced means.
    ctx = evaluation.eval_context(state.params, pool, jax.random.PRNGKey(0), setup=setup)
    x = pool[:4]
    samples, recons = evaluation.picture_batch(
      state.params, ctx, x, jax.random.PRNGKey(1), setup=setup, num_samples=6
    )
    chex.assert_shape(samples, (6, 8, 8, 1))
    chex.assert_shape(recons, (4, 8, 8, 1))
    chex.assert_tree_all_finite([samples, recons])
    mp = state.params["model"]
    mu = setup.model.encode_mean(mp, x)
    np.testing.assert_allclose(
      np.asarray(setup.mean_fn(_logits(setup.model, mp, recons, mu))), np.asarray(recons), atol=1e-5
    )


# ----------------------------------------------------------------------------
# Architecture: parameter count, registry, unsupported inputs
# ----------------------------------------------------------------------------


def lin(i, o):  # Linear / 1x1 conv (i -> o) with bias
  return i * o + o


def expected_params(
  hw=(28, 28), d=40, hidden=(300, 300), f=64, layers=6, k=5, likelihood="bernoulli"
) -> int:
  npx = hw[0] * hw[1]
  p = k // 2
  enc = 2 * lin(npx, hidden[0]) + 2 * lin(hidden[0], hidden[1]) + 2 * lin(hidden[1], d)
  cond = (
    2 * lin(d, hidden[-1])
    + lin(hidden[-1], npx * f)  # GatedDense, Linear(H*W*F)
    + lin(f, (layers + 1) * 4 * f)
  )  # 1x1 to every layer's biases
  layer_a = lin((p + 1) * k * 1, 2 * f) + lin((p + 1) * 1, 2 * f) + lin(2 * f, 2 * f)
  layer_b = (
    lin((p + 1) * k * f, 2 * f)
    + lin((p + 1) * f, 2 * f)  # vertical, horizontal
    + lin(2 * f, 2 * f)
    + lin(f, f)
  )  # link v -> h, residual 1x1
  heads = (2 if likelihood == "logistic" else 1) * lin(f, 1)
  return enc + cond + layer_a + layers * layer_b + heads


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_parameter_count_matches_architecture(likelihood):
  c = load_config("test", model="pixelcnn", likelihood=likelihood, latent_dim=40, hidden=(300, 300))
  params = jax.eval_shape(make_model(c, (28, 28, 1)).init, jax.random.PRNGKey(0))
  count = sum(int(x.size) for x in jax.tree.leaves(params))
  assert count == expected_params(likelihood=likelihood)
  m, params = _model()  # tiny: 8x8, d 4, hidden 16, F 8, L 2, k 3
  count = sum(int(x.size) for x in jax.tree.leaves(params))
  assert count == expected_params((8, 8), 4, (16, 16), 8, 2, 3)


def test_registered_and_rejects_unsupported_inputs():
  assert MODELS["pixelcnn"] is pixelcnn.make_pixelvae
  with pytest.raises(ValueError, match="single-channel"):
    make_model(_config(), (8, 8, 3))
  with pytest.raises(ValueError, match="Unknown likelihood"):
    make_model(_config(likelihood="gaussian"), (8, 8, 1))
  with pytest.raises(ValueError, match="odd"):
    _model(**{"pixelcnn.kernel_size": 4})
  with pytest.raises(ValueError, match="PixelCNN model"):
    vae = make_model(load_config("test"), (8, 8, 1))
    pixelcnn.sample_images(
      vae, vae.init(jax.random.PRNGKey(0)), jnp.zeros((1, 4)), jax.random.PRNGKey(0)
    )
