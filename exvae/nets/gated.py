"""Gated dense layers of the VampPrior / Exemplar VAE reference architectures.

``GatedDense(h)(x) = Linear_h(x) * sigmoid(Linear_g(x))``, He-initialised
(the reference uses ``he_init`` on every linear layer).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# He (Kaiming) normal initialisation: std = sqrt(2 / fan_in).
he_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class GatedDense(nn.Module):
  """Gated dense layer: ``h(x) * sigmoid(g(x))``.

  Attributes:
    features: output width.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # One matmul producing both halves is faster than two separate ones.
    hg = nn.Dense(2 * self.features, kernel_init=he_init, name="hg")(x)
    h, g = jnp.split(hg, 2, axis=-1)
    return h * jax.nn.sigmoid(g)
