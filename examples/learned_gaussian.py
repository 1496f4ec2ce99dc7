"""A prior written outside the library: a learned isotropic Gaussian N(m, s2 I).

Run it without editing exvae (from this directory, or with it on PYTHONPATH):

    exvae-train --config=test --workdir=runs/lg --config.prior=learned_gaussian:LearnedGaussian
    exvae-eval  --config=test --workdir=runs/lg --config.prior=learned_gaussian:LearnedGaussian

or by file path from anywhere: ``--config.prior=/path/to/examples/learned_gaussian.py:LearnedGaussian``.
The spec is stored in the run's config.json, so resume and evaluation find
it again (``exvae-eval --workdir=runs/lg``). The prior's parameters live in
``params["prior"]`` and are trained by the same optimiser; checkpoints and
pictures need no change.

Keyword arguments of the constructor are set from the command line as
``config.prior_options``: ``--config.prior_options.init_log_var=-1.0``
starts the learned variance at exp(-1). At start-up exvae checks that
``log_prob`` and ``sample`` are implemented and, with one traced call on a
dummy batch, that they return (B,) and (n, d).
"""

import jax
import jax.numpy as jnp

from exvae.priors import Prior


class LearnedGaussian(Prior):
  """log p(z) = log N(z; mean, exp(log_var) I), both learned.

  Args:
    config: the run's config.
    init_log_var: the starting log-variance (``--config.prior_options.init_log_var``).
  """

  def __init__(self, config, init_log_var: float = 0.0):
    super().__init__(config)
    self.init_log_var = float(init_log_var)

  def init(self, key, model, num_train):
    del key, num_train
    return {"mean": jnp.zeros(model.latent_dim), "log_var": jnp.full((), self.init_log_var)}

  def log_prob(self, params, z, ctx, ids=None):
    del ctx, ids
    d = z.shape[-1]
    sq = jnp.sum((z - params["mean"]) ** 2, -1)
    return -0.5 * (d * (jnp.log(2 * jnp.pi) + params["log_var"]) + sq / jnp.exp(params["log_var"]))

  def sample(self, params, key, n, ctx):
    del ctx
    eps = jax.random.normal(key, (n, params["mean"].shape[0]))
    return params["mean"] + jnp.exp(0.5 * params["log_var"]) * eps

  def describe(self, params):
    # Logged every log_every_steps (metrics.jsonl, TensorBoard train/prior_log_var, train/prior_var).
    return {"prior_log_var": params["log_var"]}
