"""reference/ref_step_check.py's exvae side: the draws it hands the reference are exvae's.

The bench replays exvae's randomness (batch, bits, reparameterisation noise,
exemplar candidates) in the authors' code, so it is only a comparison if those
draws are the ones exvae's loss really uses.  Here the loss is recomputed in
NumPy from the draws alone and compared with ``objectives.elbo_loss``; a
change to any key split in the step makes this fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import fresh_run, load_config

from reference import ref_step_check
from exvae.likelihoods import bernoulli_log_prob
from exvae.objectives import elbo_loss, kl_beta
from exvae import train_lib


def _np_log_normal(z, mean, log_var):
  return -0.5 * np.sum(log_var + np.log(2 * np.pi) + (z - mean) ** 2 / np.exp(log_var), axis=-1)


@pytest.mark.parametrize("step", [0, 7])
def test_draws_reproduce_the_exact_prior_loss(step):
  c = load_config("test", prior="exemplar")
  c.exemplar.rat = False
  c.exemplar.num_exemplars = 40  # subsampled: the candidates come from the key
  setup, state, pool, perm = fresh_run(c)
  m = int(c.exemplar.num_exemplars)
  draws = ref_step_check.exvae_draws(state.key, setup, pool, perm, step, 1, m)
  x, ids, k_loss = train_lib.train_batch(state.key, jnp.int32(step), pool, perm, setup=setup)
  np.testing.assert_array_equal(draws["ids"][0], np.asarray(ids))
  np.testing.assert_array_equal(draws["x"][0], np.asarray(x).reshape(x.shape[0], -1))
  beta = kl_beta(jnp.int32(step), setup.steps_per_epoch, setup.warmup_epochs)
  loss, (metrics, _) = elbo_loss(state.params, state.prior_state, setup, x, ids, k_loss, beta, pool)

  # The same loss from the draws, in NumPy (model networks through exvae's apply).
  params, model = state.params["model"], setup.model
  mu, logvar = (np.asarray(a, np.float64) for a in model.encode(params, x))
  z = mu + np.exp(0.5 * logvar) * draws["eps"][0]
  log_q = _np_log_normal(z, mu, logvar)
  log_px = np.asarray(
    bernoulli_log_prob(x, model.decode(params, jnp.asarray(z, jnp.float32))), np.float64
  )
  cand = draws["cand"][0]
  bank = np.asarray(model.encode_mean(params, pool[cand]), np.float64)  # grey exemplars
  lv = float(state.params["prior"]["log_var"])
  logk = _np_log_normal(z[:, None, :], bank[None], np.full(bank.shape[1], lv))  # (B, M)
  own = np.asarray(ids)[:, None] == cand[None, :]  # leave-one-out
  logk = np.where(own, -np.inf, logk)
  log_pz = logsumexp(logk, axis=1) - np.log(m - own.sum(1))
  want = np.mean(-log_px + float(beta) * (log_q - log_pz))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["recon"]), -log_px.mean(), rtol=2e-5)


def test_param_map_covers_every_model_parameter():
  c = load_config("test", prior="exemplar")
  setup, state, _, _ = fresh_run(c)
  mapped = set(ref_step_check.param_map())
  leaves = {
    tuple(k.key for k in path[:-1])
    for path, _ in jax.tree_util.tree_flatten_with_path(state.params["model"])[0]
  }
  assert leaves == mapped
  assert len(set(ref_step_check.param_map().values())) == len(mapped)  # one-to-one


def test_param_map_covers_every_hvae_parameter():
  c = load_config("test", prior="exemplar", model="hvae")
  setup, state, _, _ = fresh_run(c)
  mapped = set(ref_step_check.param_map("hvae"))
  leaves = {
    tuple(k.key for k in path[:-1])
    for path, _ in jax.tree_util.tree_flatten_with_path(state.params["model"])[0]
  }
  assert leaves == mapped
  assert len(set(ref_step_check.param_map("hvae").values())) == len(mapped)


def test_hvae_draws_are_the_noise_of_z2_then_z1():
  """The reference's forward draws z2's noise, then z1's; the two exvae_draws hands it
  must be the ones exvae's score uses: z2 and log q(z2|x) + log q(z1|x,z2) rebuilt from them."""
  c = load_config("test", prior="exemplar", model="hvae")
  c.exemplar.rat = False
  c.exemplar.num_exemplars = 40
  setup, state, pool, perm = fresh_run(c)
  step = 3
  draws = ref_step_check.exvae_draws(state.key, setup, pool, perm, step, 1, 40)
  assert draws["eps1"].shape == (1, c.batch_size, c.hvae.z1_dim)
  x, _, k_loss = train_lib.train_batch(state.key, jnp.int32(step), pool, perm, setup=setup)
  _, k_z = jax.random.split(k_loss)
  params, model = state.params["model"], setup.model
  sc = model.score(params, x, k_z, 1, setup.log_lik)
  mu2, lv2 = (np.asarray(a, np.float64) for a in model.encode(params, x))
  z2 = mu2 + np.exp(0.5 * lv2) * draws["eps"][0]
  np.testing.assert_allclose(np.asarray(sc.z)[:, 0], z2, rtol=1e-5, atol=1e-6)
  apply = lambda *a, method: model.module.apply({"params": params}, *a, method=method)  # noqa: E731
  hx = apply(x, method="q_z1_features")
  mu1, lv1 = (
    np.asarray(a, np.float64) for a in apply(hx, jnp.asarray(z2, jnp.float32), method="q_z1")
  )
  z1 = mu1 + np.exp(0.5 * lv1) * draws["eps1"][0]
  want = _np_log_normal(z2, mu2, lv2) + _np_log_normal(z1, mu1, lv1)
  np.testing.assert_allclose(np.asarray(sc.log_q)[:, 0], want, rtol=1e-5)
