"""Likelihoods: the discretised logistic against a NumPy reference, its normalisation, Bernoulli."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

from exvae.likelihoods import (
  LIKELIHOODS,
  bernoulli_log_prob,
  discretized_logistic_log_prob,
  get_likelihood,
  logistic_mean,
)


def ref_discretized_logistic(x, mean, log_scale, num_bins=256):
  """Float64 NumPy/SciPy reference: per-pixel log P(bin of x), edge bins open to +-inf.

  P = F(c + h) - F(c - h) with the logistic CDF F, computed as a difference of
  survival functions above the location (no saturation at 1 in float64).
  """
  x, mean, log_scale = (np.asarray(a, np.float64) for a in (x, mean, log_scale))
  k = np.round(x * (num_bins - 1))
  c = k / (num_bins - 1)
  h = 0.5 / (num_bins - 1)
  s = np.exp(log_scale)
  hi = np.where(k >= num_bins - 1, np.inf, c + h)
  lo = np.where(k <= 0, -np.inf, c - h)
  dist = stats.logistic(loc=mean, scale=s)
  p = np.where(c > mean, dist.sf(lo) - dist.sf(hi), dist.cdf(hi) - dist.cdf(lo))
  return np.log(p)


def test_discretized_logistic_matches_numpy():
  rng = np.random.default_rng(0)
  shape = (5, 6, 7, 3)
  x = rng.integers(0, 256, size=shape) / 255.0
  x[0, 0, 0] = 0.0  # both edge bins present
  x[0, 0, 1] = 1.0
  mean = rng.uniform(-0.2, 1.2, size=shape)
  log_scale = rng.uniform(-4.5, 0.0, size=shape)
  got = discretized_logistic_log_prob(
    jnp.asarray(x, jnp.float32),
    (jnp.asarray(mean, jnp.float32), jnp.asarray(log_scale, jnp.float32)),
  )
  want = ref_discretized_logistic(x, mean.astype(np.float32), log_scale.astype(np.float32))
  assert got.shape == (5,)
  np.testing.assert_allclose(np.asarray(got), want.reshape(5, -1).sum(-1), rtol=1e-5)


def test_discretized_logistic_tails_are_accurate_and_finite():
  # Sharp logistics (s = e^-4.5) and bins far in both tails, where a naive
  # difference of float32 sigmoids underflows to 0 (log -> -inf).
  x = jnp.array([0.0, 1.0, 2.0, 128.0, 253.0, 254.0, 255.0], jnp.float32)[:, None] / 255.0
  for mean in (-0.3, 0.0, 0.5, 1.0, 1.3):
    m, s = jnp.full_like(x, mean), jnp.full_like(x, -4.5)
    got = np.asarray(
      jax.vmap(lambda a, mm, ss: discretized_logistic_log_prob(a[None], (mm[None], ss[None]))[0])(
        x, m, s
      )
    )
    want = ref_discretized_logistic(np.asarray(x)[:, 0], np.float32(mean), np.float32(-4.5))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  g = jax.grad(lambda mm: discretized_logistic_log_prob(x, (mm, jnp.full_like(x, -4.5))).sum())(
    jnp.full_like(x, 0.5)
  )
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("seed", [0, 1])
def test_discretized_logistic_sums_to_one_over_256_bins(seed):
  rng = np.random.default_rng(seed)
  n = 200  # random (mean, log_scale) pairs, one per pixel
  mean = jnp.asarray(rng.uniform(-1.0, 2.0, size=n), jnp.float32)
  log_scale = jnp.asarray(rng.uniform(-6.0, 1.0, size=n), jnp.float32)
  levels = jnp.arange(256, dtype=jnp.float32)[:, None, None] / 255.0  # (256, 1, 1): batch = bins

  def per_pixel(m, s):
    lp = discretized_logistic_log_prob(levels, (m, s))  # (256,)
    return jax.nn.logsumexp(lp)

  total = jax.vmap(per_pixel)(mean, log_scale)
  np.testing.assert_allclose(np.exp(np.asarray(total)), 1.0, atol=1e-5)


def test_discretized_logistic_snaps_off_grid_values_and_broadcasts_global_scale():
  x = jnp.array([[0.5 + 0.3 / 255, 0.2]], jnp.float32)
  snapped = jnp.round(x * 255) / 255
  params = (jnp.full((1, 2), 0.4), jnp.float32(-2.0))  # global (scalar) log-scale
  np.testing.assert_allclose(
    np.asarray(discretized_logistic_log_prob(x, params)),
    np.asarray(discretized_logistic_log_prob(snapped, params)),
    rtol=1e-6,
  )


def test_bernoulli_matches_numpy():
  rng = np.random.default_rng(3)
  x = (rng.uniform(size=(4, 3, 3, 1)) < 0.5).astype(np.float32)
  logits = rng.normal(scale=5.0, size=x.shape).astype(np.float32)
  p = expit(logits.astype(np.float64))
  want = (x * np.log(p) + (1 - x) * np.log1p(-p)).reshape(4, -1).sum(-1)
  got = bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits), eps=0.0)  # no clamp
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # The default clamps p to [1e-5, 1 - 1e-5] as the reference (tests/test_fidelity.py).
  pc = np.clip(p, 1e-5, 1 - 1e-5)
  want_c = (x * np.log(pc) + (1 - x) * np.log1p(-pc)).reshape(4, -1).sum(-1)
  np.testing.assert_allclose(
    np.asarray(bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits))), want_c, rtol=1e-5
  )


def test_registry():
  assert set(LIKELIHOODS) >= {"bernoulli", "logistic"}
  lp, mean_fn = get_likelihood("logistic")
  assert lp is discretized_logistic_log_prob and mean_fn is logistic_mean
  m = mean_fn((jnp.array([-0.5, 0.3, 1.7]), jnp.zeros(3)))
  np.testing.assert_allclose(np.asarray(m), [0.0, 0.3, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown likelihood"):
    get_likelihood("gaussian_mixture")
