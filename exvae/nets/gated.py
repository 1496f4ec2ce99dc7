"""Gated dense layers of the VampPrior / Exemplar VAE reference architectures.

``GatedDense(h)(x) = Linear_h(x) * sigmoid(Linear_g(x))``.

The parameters are the reference's four tensors, ``h/kernel``, ``h/bias``,
``g/kernel`` and ``g/bias``: AdamNormGrad divides each tensor's gradient by
its own norm, so fusing h and g into one parameter would change the update
(the joint norm of h and g instead of each one's).  The forward pass still
runs ONE matmul over the concatenated kernels; the concatenation is a copy of
the weights per call, negligible next to the matmul over the batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# He (Kaiming) normal initialisation: std = sqrt(2 / fan_in), the reference's
# ``he_init`` on every nn.Linear weight.  Biases keep PyTorch's default,
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): see :func:`exvae.nets.init.torch_biases`.
he_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class LinearParams(nn.Module):
  """The ``kernel`` and ``bias`` of one linear map or convolution, without applying it.

  Lets a layer keep the reference's separate tensors (``h``, ``g``) as
  separate parameters while computing both in one matmul or convolution.

  Attributes:
    kernel_shape: (in, out) for a dense layer, (kh, kw, in, out) for a conv.
    kernel_init: initialiser of the kernel.
  """

  kernel_shape: tuple[int, ...]
  kernel_init: nn.initializers.Initializer = he_init

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """Returns ``(kernel kernel_shape, bias (kernel_shape[-1],))``."""
    kernel = self.param("kernel", self.kernel_init, tuple(self.kernel_shape))
    bias = self.param("bias", nn.initializers.zeros, (self.kernel_shape[-1],))
    return kernel, bias


class GatedDense(nn.Module):
  """Gated dense layer: ``h(x) * sigmoid(g(x))``, h and g separate parameters, one matmul.

  Attributes:
    features: output width.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in) -> (..., features)."""
    f, n_in = self.features, x.shape[-1]
    hk, hb = LinearParams((n_in, f), name="h")()
    gk, gb = LinearParams((n_in, f), name="g")()
    hg = x @ jnp.concatenate([hk, gk], axis=1) + jnp.concatenate([hb, gb])
    h, g = hg[..., :f], hg[..., f:]
    return h * jax.nn.sigmoid(g)
