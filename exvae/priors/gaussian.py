"""Standard Gaussian prior p(z) = N(0, I)."""

import jax
import jax.numpy as jnp

from exvae.priors.base import Prior, register


@register("gaussian")
class GaussianPrior(Prior):
  """N(0, I); no parameters, no context."""

  def log_prob(self, params, z, ctx, ids=None):
    del params, ctx, ids
    return -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + z**2, axis=-1)

  def sample(self, params, key, n, ctx):
    del params, ctx
    self_d = self.config.latent_dim
    return jax.random.normal(key, (n, self_d))
