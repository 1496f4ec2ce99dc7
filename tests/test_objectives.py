"""Training objectives: the IWAE bound and its gradient estimators, against NumPy/SciPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from conftest import fresh_run, load_config, train_traced_once
from exvae import evaluation, train_lib
from exvae.models.base import Model
from exvae.models.vae import gaussian_score
from exvae.objectives import Setup, check_objective, elbo_loss, iwae_loss
from exvae.priors import make_prior

IWAE = {"objective": "iwae"}


def _batch(c):
  setup, state, pool, perm = fresh_run(c)
  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  return setup, state, pool, x, ids, key


def _value_and_grad(loss_fn, setup, state, pool, x, ids, key, beta=0.5):
  f = lambda p: loss_fn(p, state.prior_state, setup, x, ids, key, jnp.float32(beta), pool)
  (loss, (metrics, _)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
  return loss, metrics, grads


@pytest.mark.parametrize(
  "model,prior,rat",
  [
    ("vae", "exemplar", False),
    ("vae", "gaussian", False),
    pytest.param("vae", "exemplar", True, marks=pytest.mark.slow),
    pytest.param("hvae", "vampprior", False, marks=pytest.mark.slow),
  ],
)
def test_iwae_with_one_sample_is_the_elbo(model, prior, rat):
  """k = 1 with reparameterised gradients: the same seed gives the ELBO's loss and gradients."""
  c = load_config(
    "test", model=model, prior=prior, objective="iwae", objective_samples=1, **{"exemplar.rat": rat}
  )
  setup, state, pool, x, ids, key = _batch(c)
  want = _value_and_grad(elbo_loss, setup, state, pool, x, ids, key)
  got = _value_and_grad(iwae_loss, setup, state, pool, x, ids, key)
  assert float(got[0]) == float(want[0])
  chex.assert_trees_all_close(got[2], want[2], rtol=1e-6, atol=1e-7)
  for name in ("elbo", "recon", "kl"):
    np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-6)
  # ... and k = 5 is another loss (the test would pass trivially if k were ignored).
  c5 = load_config(
    "test", model=model, prior=prior, objective="iwae", objective_samples=5, **{"exemplar.rat": rat}
  )
  setup5 = fresh_run(c5)[0]
  assert float(_value_and_grad(iwae_loss, setup5, state, pool, x, ids, key)[0]) != float(want[0])


def test_iwae_loss_is_a_log_mean_exp_of_the_log_weights():
  """The loss equals -mean_b logmeanexp_s(log p(x|z) + beta (log p(z) - log q(z|x))),
  every term recomputed in SciPy from the encoder's outputs and the same noise."""
  k, beta = 7, 0.3
  c = load_config("test", prior="gaussian", objective="iwae", objective_samples=k)
  setup, state, pool, x, ids, key = _batch(c)
  loss, metrics, _ = _value_and_grad(iwae_loss, setup, state, pool, x, ids, key, beta)
  params = state.params["model"]
  mu, logvar = (np.asarray(a, np.float64) for a in setup.model.encode(params, x))
  _, k_z = jax.random.split(key)
  eps = np.asarray(jax.random.normal(k_z, (x.shape[0], k, mu.shape[1])), np.float64)
  z = mu[:, None] + np.exp(0.5 * logvar)[:, None] * eps
  logits = np.asarray(
    setup.model.decode(params, jnp.asarray(z.reshape(-1, mu.shape[1]), jnp.float32)), np.float64
  )
  xs = np.broadcast_to(np.asarray(x, np.float64)[:, None], (x.shape[0], k) + x.shape[1:])
  logits = logits.reshape(xs.shape)
  log_px = (
    (xs * -np.logaddexp(0, -logits) + (1 - xs) * -np.logaddexp(0, logits))
    .reshape(x.shape[0], k, -1)
    .sum(-1)
  )
  log_pz = scipy.stats.norm.logpdf(z).sum(-1)
  log_q = scipy.stats.norm.logpdf(z, mu[:, None], np.exp(0.5 * logvar)[:, None]).sum(-1)
  log_w = log_px + beta * (log_pz - log_q)
  want = -np.mean(scipy.special.logsumexp(log_w, axis=1) - np.log(k))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  log_w1 = log_px + log_pz - log_q
  np.testing.assert_allclose(
    metrics["iwae"], np.mean(scipy.special.logsumexp(log_w1, 1) - np.log(k)), rtol=1e-5
  )
  np.testing.assert_allclose(metrics["elbo"], log_w1.mean(), rtol=1e-5)


# -- DReG on a linear-Gaussian model ------------------------------------------------
# p(z) = N(0, 1), p(x|z) = N(theta z, 1), q(z|x) = N(a x + b, exp(c)): one latent, one pixel.


def _linear_gaussian(k: int, estimator: str):
  def encode(p, x):
    x = x.reshape(x.shape[0], 1)
    return p["a"] * x + p["b"], jnp.broadcast_to(p["c"], x.shape)

  def decode(p, z):
    return (p["theta"] * z).reshape(z.shape[0], 1, 1, 1)

  def score(p, x, key, s, log_lik, *, path_weight=None):
    return gaussian_score(encode, decode, p, x, key, s, log_lik, path_weight=path_weight)

  log_lik = lambda x, out: jnp.sum(jax.scipy.stats.norm.logpdf(x, out), axis=(1, 2, 3))
  model = Model(
    init=None,
    encode=encode,
    encode_mean=lambda p, x: encode(p, x)[0],
    decode=decode,
    score=score,
    latent_dim=1,
    image_shape=(1, 1, 1),
    module=None,
  )
  prior = make_prior("gaussian", load_config("test", latent_dim=1))
  return Setup(
    model=model,
    prior=prior,
    log_lik=log_lik,
    mean_fn=lambda o: o,
    optimizer=None,
    binary=False,
    batch_size=4,
    steps_per_epoch=1,
    warmup_epochs=0,
    objective="iwae",
    objective_samples=k,
    gradient_estimator=estimator,
  )


X = jnp.asarray([-1.5, -0.2, 0.7, 2.0]).reshape(4, 1, 1, 1)


def _grads(setup, params, n_draws: int, beta: float = 1.0):
  """(n_draws,) gradient draws of each parameter (the batch mean, one key per draw)."""
  ids = jnp.full((X.shape[0],), -1, jnp.int32)

  def one(key):
    f = lambda p: iwae_loss(
      {"model": p, "prior": {}}, {}, setup, X, ids, key, jnp.float32(beta), None
    )[0]
    return jax.grad(f)(params)

  keys = jax.random.split(jax.random.PRNGKey(0), n_draws)
  return {k: np.asarray(v, np.float64) for k, v in jax.jit(jax.vmap(one))(keys).items()}


def _elbo_grad(p):
  """The exact gradient of the batch-mean negative ELBO (closed form)."""
  x = np.asarray(X).ravel()
  a, b, c, th = (float(p[k]) for k in ("a", "b", "c", "theta"))
  m, s2 = a * x + b, np.exp(c)
  d_m = th * x - th**2 * m - m  # dELBO/dm
  return {
    "a": -np.mean(d_m * x),
    "b": -np.mean(d_m),
    "c": -np.mean(-0.5 * th**2 * s2 - 0.5 * s2 + 0.5),
    "theta": -np.mean(x * m - th * (m**2 + s2)),
  }


PARAMS = {
  "a": jnp.float32(0.3),
  "b": jnp.float32(0.2),
  "c": jnp.float32(-0.5),
  "theta": jnp.float32(1.3),
}


def _assert_unbiased(draws, want, sigmas=4.5):
  for k, v in want.items():
    se = draws[k].std() / np.sqrt(len(draws[k]))
    assert abs(draws[k].mean() - v) < sigmas * se + 1e-6, (k, draws[k].mean(), v, se)


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_one_sample_gradients_average_to_the_exact_elbo_gradient(estimator):
  """k = 1: both estimators are unbiased for the closed-form ELBO gradient (DReG at
  k = 1 is the path-derivative estimator)."""
  draws = _grads(_linear_gaussian(1, estimator), PARAMS, 20000)
  _assert_unbiased(draws, _elbo_grad(PARAMS))


def test_dreg_is_unbiased_and_has_lower_encoder_variance_at_k20():
  """k = 20: the means of DReG and plain IWAE gradients agree (both unbiased for the
  IWAE gradient), the decoder's draws are the same, and the encoder's variance is lower."""
  rep = _grads(_linear_gaussian(20, "reparam"), PARAMS, 20000)
  dreg = _grads(_linear_gaussian(20, "dreg"), PARAMS, 20000)
  np.testing.assert_allclose(dreg["theta"], rep["theta"], rtol=1e-5, atol=1e-6)
  for k in ("a", "b", "c"):
    se = np.sqrt(rep[k].var() / rep[k].size + dreg[k].var() / dreg[k].size)
    assert abs(rep[k].mean() - dreg[k].mean()) < 4.5 * se, (k, rep[k].mean(), dreg[k].mean())
    assert dreg[k].var() < 0.5 * rep[k].var(), (k, dreg[k].var(), rep[k].var())


def test_dreg_under_warm_up_is_unbiased():
  """beta = 0.4: DReG's (1 - beta) w + beta w^2 weights keep the warm-up bound's gradient."""
  rep = _grads(_linear_gaussian(5, "reparam"), PARAMS, 20000, beta=0.4)
  dreg = _grads(_linear_gaussian(5, "dreg"), PARAMS, 20000, beta=0.4)
  for k in ("a", "b", "c"):
    se = np.sqrt(rep[k].var() / rep[k].size + dreg[k].var() / dreg[k].size)
    assert abs(rep[k].mean() - dreg[k].mean()) < 4.5 * se, (k, rep[k].mean(), dreg[k].mean())


def test_dreg_encoder_gradient_vanishes_at_the_true_posterior():
  """q = p(z|x) makes every weight equal: the exact IWAE gradient of the encoder is 0,
  and every DReG draw is 0, while plain IWAE draws are not."""
  th = 1.3
  post = dict(
    PARAMS, a=jnp.float32(th / (1 + th**2)), b=jnp.float32(0.0), c=jnp.float32(-np.log(1 + th**2))
  )
  dreg = _grads(_linear_gaussian(20, "dreg"), post, 200)
  rep = _grads(_linear_gaussian(20, "reparam"), post, 200)
  for k in ("a", "b", "c"):
    assert np.abs(dreg[k]).max() < 1e-4, (k, np.abs(dreg[k]).max())
    assert rep[k].std() > 1e-2, (k, rep[k].std())


# -- configuration and the training loop ----------------------------------------------


@pytest.mark.parametrize(
  "over,match",
  [
    ({"objective": "vi"}, "objective must be one of"),
    ({"objective": "iwae", "gradient_estimator": "reinforce"}, "gradient_estimator must be"),
    ({"objective": "iwae", "objective_samples": 0}, "objective_samples must be"),
    ({"objective_samples": 5}, "objective='elbo' trains with one sample"),
    ({"gradient_estimator": "dreg"}, "objective='elbo' trains with one sample"),
  ],
)
def test_bad_objective_settings_are_one_line_errors(over, match):
  c = load_config("test", **over)
  with pytest.raises(ValueError, match=match) as e:
    check_objective(c.objective, c.objective_samples, c.gradient_estimator)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "model,prior,rat",
  [("vae", "exemplar", True), pytest.param("hvae", "exemplar", False, marks=pytest.mark.slow)],
)
def test_iwae_dreg_steps_never_retrace(model, prior, rat):
  c = load_config(
    "test",
    model=model,
    prior=prior,
    objective="iwae",
    objective_samples=4,
    gradient_estimator="dreg",
    **{"exemplar.rat": rat},
  )
  start = fresh_run(c)[1].params
  _, state, _, losses = train_traced_once(c, 6)
  assert np.all(np.isfinite(losses)) and int(state.nonfinite) == 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, start)
  assert min(jax.tree.leaves(moved["model"])) > 0


def test_validation_under_iwae_is_the_bound_at_k(tmp_path):
  """The validation loss is -mean IWAE bound with the training k (not the ELBO)."""
  c = load_config("test", objective="iwae", objective_samples=6, gradient_estimator="dreg")
  setup, state, pool, _ = fresh_run(c)
  splits = train_lib.load_data(c)
  vm = train_lib.validate(state, setup, pool, splits, c, str(tmp_path), 0)
  ctx = evaluation.eval_context(
    state.params, pool, jax.random.PRNGKey(c.eval.bank_seed), setup=setup
  )
  res = evaluation.evaluate_split(
    state.params,
    setup,
    ctx,
    splits.val_x,
    jax.random.PRNGKey(7),
    num_samples=6,
    max_queries=c.eval.max_queries,
  )
  assert vm["val_loss"] == pytest.approx(-res["log_px_iwae"].mean(), rel=1e-9)
  assert vm["val_loss"] < -res["elbo"].mean()  # the bound at k = 6 is tighter


def test_dreg_with_a_model_that_does_not_take_path_weights_is_one_line():
  from exvae import models

  c = load_config("test", objective="iwae", objective_samples=2, gradient_estimator="dreg")
  base = models.make_model(c, (8, 8, 1))
  plain = lambda params, x, key, s, log_lik: base.score(params, x, key, s, log_lik)
  import dataclasses
  import unittest.mock

  with unittest.mock.patch.object(
    train_lib, "make_model", lambda *a: dataclasses.replace(base, score=plain)
  ):
    with pytest.raises(ValueError, match="path_weight") as e:
      train_lib.make_setup(c, train_lib.load_data(c))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "model",
  [
    "vae",
    pytest.param("hvae", marks=pytest.mark.slow),
    pytest.param("convhvae", marks=pytest.mark.slow),
    pytest.param("pixelcnn", marks=pytest.mark.slow),
  ],
)
def test_path_weights_scale_the_encoder_gradient_once_and_leave_the_rest(model):
  """``score(..., path_weight=c)`` keeps every value; under a Gaussian prior (no encoder in
  the prior) the gradient of sum log w scales by c on the posterior's parameters and not at
  all on the generative ones, so no path (z2 -> q(z1|x,z2) -> z1 in the hierarchical
  models) is weighted twice, and log q holds the posterior's parameters fixed."""
  from exvae import models

  over = {"pixelcnn.channels": 8, "pixelcnn.num_layers": 2} if model == "pixelcnn" else {}
  c = load_config("test", model=model, prior="gaussian", **over)
  m = models.make_model(c, (8, 8, 1))
  params = m.init(jax.random.PRNGKey(0))
  x = (jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1)) < 0.4).astype(jnp.float32)
  log_lik = train_lib.get_likelihood(c.likelihood)[0]
  key = jax.random.PRNGKey(2)

  def total(p, weight):
    sc = m.score(p, x, key, 3, log_lik, path_weight=weight)
    log_pz = -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + sc.z**2, -1)
    return jnp.sum(sc.log_px + sc.log_p_rest + log_pz - sc.log_q), sc

  plain = m.score(params, x, key, 3, log_lik)
  _, weighted = total(params, jnp.ones((6, 3)))
  for f in ("z", "log_px", "log_p_rest", "log_q"):
    np.testing.assert_allclose(getattr(weighted, f), getattr(plain, f), rtol=1e-6, atol=1e-5)
  g1 = jax.grad(lambda p: total(p, jnp.ones((6, 3)))[0])(params)
  g3 = jax.grad(lambda p: total(p, jnp.full((6, 3), 3.0))[0])(params)
  scaled = fixed = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g3)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.abs(a).max() < 1e-6:
      continue
    if np.allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max()):
      fixed += 1
    else:
      np.testing.assert_allclose(
        b, 3 * a, rtol=1e-3, atol=1e-5 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path)
      )
      scaled += 1
  assert scaled > 0 and fixed > 0, (scaled, fixed)
