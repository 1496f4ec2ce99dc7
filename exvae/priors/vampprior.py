"""VampPrior (Tomczak & Welling 2018): p(z) = 1/K sum_k q(z | u_k).

The K pseudo-inputs u_k are learned images; as in the reference they are
clipped to [0, 1] (hardtanh) before being encoded.  Config: ``vampprior.num_pseudo``,
``vampprior.init`` ("he": N(0, 2 / K), as the reference ends up with; "normal":
N(``init_mean``, ``init_std``)).
"""

import dataclasses

import jax
import jax.numpy as jnp

from exvae.priors.base import Prior, register
from exvae.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class VampContext:
  """The VampPrior's context: the encoded pseudo-inputs, the K mixture components.

  Built by :meth:`VampPrior.context` (the same in training and evaluation) from
  the current parameters; gradients flow through it into the pseudo-inputs and
  the encoder during training.

  Attributes:
    logvar: (K, d) encoder log-variances of the K pseudo-inputs.
    mu: (K, d) encoder means of the K pseudo-inputs.
  """

  # Alphabetical, as ExemplarContext: flattened like a {"logvar", "mu"} dict, so the
  # jitted programs that take a context are traced with the same arguments.
  logvar: jax.Array
  mu: jax.Array


jax.tree_util.register_dataclass(VampContext, data_fields=["logvar", "mu"], meta_fields=[])


def mixture_diag_log_prob(z, mu, logvar):
  """log (1/K) sum_k N(z; mu_k, diag(exp(logvar_k))).

  Args:
    z: (B, d) queries.
    mu: (K, d) component means.
    logvar: (K, d) component log-variances.

  Returns:
    (B,) log-densities.
  """
  inv_var = jnp.exp(-logvar)  # (K, d)
  # Quadratic form in matmul form: sum_d (z - mu)^2 / var
  #   = z^2 . inv_var - 2 z . (mu * inv_var) + sum_d mu^2 * inv_var
  # so B x K x d is never materialised. The matmuls are pinned to full float32: at
  # the default precision (one bfloat16 pass on TPU, TF32 on recent NVIDIA GPUs)
  # the cancellation costs nats (tests/test_precision.py).
  hi = jax.lax.Precision.HIGHEST
  quad = (
    jnp.matmul(z**2, inv_var.T, precision=hi)
    - 2.0 * jnp.matmul(z, (mu * inv_var).T, precision=hi)
    + jnp.sum(mu**2 * inv_var, -1)
  )
  quad = jnp.maximum(quad, 0.0)
  d = z.shape[-1]
  log_comp = -0.5 * (d * jnp.log(2 * jnp.pi) + jnp.sum(logvar, -1) + quad)  # (B, K)
  return jax.nn.logsumexp(log_comp, axis=-1) - jnp.log(mu.shape[0])


@register("vampprior")
class VampPrior(Prior):
  """Mixture of the variational posteriors of K learned pseudo-inputs."""

  def init(self, key, model, num_train):
    del num_train
    cfg = self.config.vampprior
    noise = jax.random.normal(key, (cfg.num_pseudo,) + tuple(model.image_shape))
    init = cfg.get("init", "normal")
    if init == "he":
      # The reference's pseudo-inputs are the weights of a bias-free Linear(K, D) applied
      # to the identity, He-initialised with fan-in K: N(0, 2 / K).
      return {"pseudo_inputs": jnp.sqrt(2.0 / cfg.num_pseudo) * noise}
    if init == "normal":
      return {"pseudo_inputs": cfg.init_mean + cfg.init_std * noise}
    raise ConfigError(f"vampprior.init must be 'he' or 'normal', got {init!r}.")

  def context(self, params, state, model, model_params, inputs, train):
    del inputs, train
    u = jnp.clip(params["pseudo_inputs"], 0.0, 1.0)
    mu, logvar = model.encode(model_params, u)
    return VampContext(logvar=logvar, mu=mu), state

  def log_prob(self, params, z, ctx: VampContext, ids=None):
    del params, ids
    return mixture_diag_log_prob(z, ctx.mu, ctx.logvar)

  def sample(self, params, key, n, ctx: VampContext):
    del params
    k1, k2 = jax.random.split(key)
    comp = jax.random.randint(k1, (n,), 0, ctx.mu.shape[0])
    eps = jax.random.normal(k2, (n, ctx.mu.shape[1]))
    return ctx.mu[comp] + jnp.exp(0.5 * ctx.logvar[comp]) * eps
