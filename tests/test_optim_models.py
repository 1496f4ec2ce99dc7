"""The AdamNormGrad chain and the model's shapes / clipping."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import load_config
from exvae.models import make_model
from exvae.optim import normalize_by_norm


def test_normalize_by_norm_gives_unit_norm_per_leaf():
  g = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.full((2, 2), 10.0)}, "z": jnp.zeros(3)}
  t = normalize_by_norm(1e-7)
  out, _ = t.update(g, t.init(g))
  np.testing.assert_allclose(float(jnp.linalg.norm(out["a"])), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["b"]["c"])), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["z"]), 0.0)  # zero gradient stays zero


def test_vae_shapes_and_logvar_clip():
  c = load_config("test", latent_dim=5, hidden=(300, 300))
  m = make_model(c, (28, 28, 1))
  p = m.init(jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree.leaves(p))
  # Encoder 784->2x300, 300->2x300, 300->5 (x2); decoder 5->2x300, 300->2x300, 300->784.
  want = (
    (784 * 600 + 600)
    + (300 * 600 + 600)
    + 2 * (300 * 5 + 5)
    + (5 * 600 + 600)
    + (300 * 600 + 600)
    + (300 * 784 + 784)
  )
  assert n_params == want
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 28, 28, 1)), jnp.float32)
  mu, logvar = m.encode(p, x * 1e4)  # extreme inputs hit the clip
  assert mu.shape == (3, 5) and logvar.shape == (3, 5)
  assert float(logvar.min()) >= -6.0 and float(logvar.max()) <= 2.0
  assert m.decode(p, mu).shape == (3, 28, 28, 1)
  np.testing.assert_allclose(
    np.asarray(m.encode_mean(p, x)), np.asarray(m.encode(p, x)[0]), rtol=1e-6
  )
