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
  c.exemplar.num_exemplars = 40          # subsampled: the candidates come from the key
  setup, state, pool, perm = fresh_run(c)
  m = int(c.exemplar.num_exemplars)
  draws = ref_step_check.exvae_draws(state.key, setup, pool, perm, step, 1, m)
  x, ids, k_loss = train_lib.train_batch(state.key, jnp.int32(step), pool, perm, setup=setup)
  np.testing.assert_array_equal(draws["ids"][0], np.asarray(ids))
  np.testing.assert_array_equal(draws["x"][0], np.asarray(x).reshape(x.shape[0], -1))
  beta = kl_beta(jnp.int32(step), setup.steps_per_epoch, setup.warmup_epochs)
  loss, (metrics, _) = elbo_loss(state.params, state.prior_state, setup, x, ids, k_loss, beta,
                                 pool)

  # The same loss from the draws, in NumPy (model networks through exvae's apply).
  params, model = state.params["model"], setup.model
  mu, logvar = (np.asarray(a, np.float64) for a in model.encode(params, x))
  z = mu + np.exp(0.5 * logvar) * draws["eps"][0]
  log_q = _np_log_normal(z, mu, logvar)
  log_px = np.asarray(bernoulli_log_prob(x, model.decode(params, jnp.asarray(z, jnp.float32))),
                      np.float64)
  cand = draws["cand"][0]
  bank = np.asarray(model.encode_mean(params, pool[cand]), np.float64)   # grey exemplars
  lv = float(state.params["prior"]["log_var"])
  logk = _np_log_normal(z[:, None, :], bank[None], np.full(bank.shape[1], lv))   # (B, M)
  own = np.asarray(ids)[:, None] == cand[None, :]                       # leave-one-out
  logk = np.where(own, -np.inf, logk)
  log_pz = logsumexp(logk, axis=1) - np.log(m - own.sum(1))
  want = np.mean(-log_px + float(beta) * (log_q - log_pz))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["recon"]), -log_px.mean(), rtol=2e-5)


def test_param_map_covers_every_model_parameter():
  c = load_config("test", prior="exemplar")
  setup, state, _, _ = fresh_run(c)
  mapped = set(ref_step_check.param_map())
  leaves = {tuple(k.key for k in path[:-1])
            for path, _ in jax.tree_util.tree_flatten_with_path(state.params["model"])[0]}
  assert leaves == mapped
  assert len(set(ref_step_check.param_map().values())) == len(mapped)   # one-to-one
