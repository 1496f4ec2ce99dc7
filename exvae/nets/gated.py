"""Gated dense layers of the VampPrior / Exemplar VAE reference architectures.

``GatedDense(h)(x) = Linear_h(x) * sigmoid(Linear_g(x))``.

The parameters are the reference's four tensors, ``h/kernel``, ``h/bias``,
``g/kernel`` and ``g/bias``: AdamNormGrad divides each tensor's gradient by
its own norm, so fusing h and g into one parameter would change the update
(the joint norm of h and g instead of each one's).  The forward pass runs
one matmul per kernel.  One matmul over the concatenated kernels was timed
against it on a quiet 2-core AMD EPYC with AVX-512
(`bench/gated_layout.py --steps rat,exact,gaussian`): the concatenation
copies the weights on every call, and the RAT step, whose compact encoding
calls the encoder once per 125-row chunk inside a ``lax.cond`` (where the
copy cannot be hoisted), was 1.23-1.50x slower with it, the exact-prior step
1.05x and the Gaussian step 1.02x.

``matmul_dtype`` (``config.matmul_dtype``): 'float32' (the default) runs the
code as it always was; 'bfloat16' rounds the operands of every matrix product
of the layer, forward and backward, to bfloat16 and accumulates in float32
(:func:`mixed_matmul`).  Parameters, biases, activations and outputs stay
float32 either way.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# He (Kaiming) normal initialisation: std = sqrt(2 / fan_in), the reference's
# ``he_init`` on every nn.Linear weight.  Biases keep PyTorch's default,
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): see :func:`exvae.nets.init.torch_biases`.
he_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


# Operand dtypes of the networks' matrix products (config.matmul_dtype; checked once,
# by exvae.models.check_matmul_dtype).
MATMUL_DTYPES = ("float32", "bfloat16")


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """``a`` and ``b`` contracted over one axis each, accumulated and returned in float32."""
  return lax.dot_general(
    a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  return _dot(x.astype(dtype), w.astype(dtype), (x.ndim - 1, 0))


def _mixed_matmul_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  return _dot(xc, wc, (x.ndim - 1, 0)), (xc, wc)


def _mixed_matmul_bwd(dtype, res, g):
  # The two backward products in the compute dtype too (without this rule the
  # float32 cotangent would promote them to float32 products).
  xc, wc = res
  gc = g.astype(dtype)
  dx = _dot(gc, wc, (g.ndim - 1, 1))  # (..., in)
  dw = _dot(xc.reshape(-1, xc.shape[-1]), gc.reshape(-1, gc.shape[-1]), (0, 0))  # (in, out)
  return dx, dw


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def mixed_matmul(x: jax.Array, w: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """``x @ w`` with operands rounded to ``dtype`` and float32 accumulation, also in the gradient.

  Args:
    x: (..., in) float32.
    w: (in, out) float32.
    dtype: operand dtype of the three products (forward, d/dx, d/dw).

  Returns:
    (..., out) float32; the gradients with respect to ``x`` and ``w`` are float32.
  """
  return _mixed_matmul(x.astype(jnp.float32), w.astype(jnp.float32), dtype)


def _bf16_dot_general(inputs, kernel, dimension_numbers, precision=None, **_):
  """``nn.Dense``'s ``dot_general`` for matmul_dtype='bfloat16' (see :func:`mixed_matmul`)."""
  assert dimension_numbers == (((inputs.ndim - 1,), (0,)), ((), ())), dimension_numbers
  return mixed_matmul(inputs, kernel, jnp.bfloat16)


# Extra nn.Dense arguments per operand dtype (a name outside MATMUL_DTYPES is a KeyError).
_DENSE_KW = {"float32": {}, "bfloat16": {"dot_general": _bf16_dot_general}}


def dense(
  features: int,
  *,
  kernel_init: Callable = None,
  name: str | None = None,
  matmul_dtype: str = "float32",
) -> nn.Dense:
  """``nn.Dense(features)`` (same parameters) whose product runs in ``matmul_dtype``.

  'float32' returns the plain ``nn.Dense`` (unchanged computation); 'bfloat16'
  gives it :func:`mixed_matmul` as its ``dot_general``: inputs and kernel
  rounded to bfloat16, float32 accumulation, the bias added in float32.
  """
  return nn.Dense(
    features, kernel_init=kernel_init or he_init, name=name, **_DENSE_KW[matmul_dtype]
  )


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
  """Gated dense layer: ``h(x) * sigmoid(g(x))``, h and g separate parameters and matmuls.

  Attributes:
    features: output width.
    matmul_dtype: 'float32' or 'bfloat16': operand dtype of the matmul
      (:func:`mixed_matmul`; bias, gate and output stay float32).
  """

  features: int
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in) -> (..., features)."""
    f, n_in = self.features, x.shape[-1]
    hk, hb = LinearParams((n_in, f), name="h")()
    gk, gb = LinearParams((n_in, f), name="g")()
    if self.matmul_dtype == "float32":
      h, g = x @ hk + hb, x @ gk + gb
    elif self.matmul_dtype == "bfloat16":
      h = mixed_matmul(x, hk, jnp.bfloat16) + hb
      g = mixed_matmul(x, gk, jnp.bfloat16) + gb
    else:
      raise KeyError(self.matmul_dtype)
    return h * jax.nn.sigmoid(g)
