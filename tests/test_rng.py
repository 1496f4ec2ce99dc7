"""The counter-based Bernoulli draws used for dynamic binarisation."""

import jax
import jax.numpy as jnp
import numpy as np

from exvae import rng


def test_bernoulli_mean_and_uniformity():
  p = jnp.full((1000, 1000), 0.3)
  x = np.asarray(rng.bernoulli(jax.random.PRNGKey(0), p))
  assert set(np.unique(x)) <= {0.0, 1.0}
  assert abs(x.mean() - 0.3) < 2e-3  # 1e6 draws: sd 4.6e-4
  u = np.asarray(rng.uniform_rows(jax.random.PRNGKey(1), (2000, 500), jnp.arange(2000)))
  hist, _ = np.histogram(u, bins=20, range=(0, 1))
  expected = u.size / 20
  chi2 = ((hist - expected) ** 2 / expected).sum()
  assert chi2 < 50, chi2  # 19 dof: p ~ 1e-4 at 50
  # Neighbouring pixels and neighbouring rows are uncorrelated.
  assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01
  assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01


def test_draws_depend_on_key_and_row_id_only():
  p = jnp.full((6, 5, 5, 1), 0.5)
  k = jax.random.PRNGKey(3)
  ids = jnp.array([10, 11, 12, 13, 14, 15])
  a = np.asarray(rng.bernoulli_rows(k, p, ids))
  # Same (key, id) -> same draws, wherever the row sits in the batch.
  perm = np.array([3, 0, 5, 1, 4, 2])
  b = np.asarray(rng.bernoulli_rows(k, p[perm], ids[perm]))
  np.testing.assert_array_equal(a[perm], b)
  c = np.asarray(rng.bernoulli_rows(jax.random.PRNGKey(4), p, ids))
  assert (a != c).mean() > 0.3  # another key: other draws
  d = np.asarray(rng.bernoulli_rows(k, p, ids + 1))
  assert (a != d).mean() > 0.3  # other ids: other draws
  # Probabilities 0 and 1 are respected exactly.
  assert np.asarray(rng.bernoulli(k, jnp.zeros((50, 50)))).sum() == 0
  assert np.asarray(rng.bernoulli(k, jnp.ones((50, 50)))).min() == 1
