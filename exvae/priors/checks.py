"""What is checked of a plug-in prior before it trains: its class, then one traced and one
concrete call of its methods on dummy inputs.

A prior named by a plug-in spec (``config.prior = "my_pkg.my_prior:MyPrior"``,
:mod:`exvae.plugins`) is the user's own code: a missing method, a wrong shape or a
density that is not finite is reported in one line (:class:`~exvae.plugins.PluginError`)
before the first training step, not as a trace deep inside a jitted step.
:func:`exvae.priors.make_prior` checks the class, :mod:`exvae.train_lib` the shapes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from exvae.plugins import PluginError
from exvae.priors.base import ContextInputs, Prior


# The methods a prior must implement (the base class's raise NotImplementedError),
# with the shape each returns.
REQUIRED_PRIOR_METHODS = {"log_prob": "(B,)", "sample": "(n, d)"}


def check_prior_class(cls: type, spec: str) -> None:
  """The prior class implements every method of :data:`REQUIRED_PRIOR_METHODS`.

  Raises:
    PluginError: naming the first method left to the base class.
  """
  for name, shape in REQUIRED_PRIOR_METHODS.items():
    if getattr(cls, name, None) is getattr(Prior, name):
      raise PluginError(
        f"prior plug-in {spec!r}: {cls.__name__} does not implement {name}() "
        f"(it must return {shape}); see examples/learned_gaussian.py."
      )


def check_prior_shapes(
  prior: Any, model: Any, num_train: int, spec: str, batch: int = 3, n: int = 5
) -> None:
  """One traced call (``jax.eval_shape``, no computation) of the prior's methods on dummy inputs.

  Checks ``init``, ``init_state``, ``context``, ``log_prob`` (must return
  ``(B,)``) and ``sample`` (must return ``(n, d)``), with ``d`` the model's
  latent size, before any training step runs.

  Args:
    prior: the prior object.
    model: the :class:`exvae.models.Model` it serves.
    num_train: N, the training set size.
    spec: the prior's name (for messages).
    batch: B of the dummy batch.
    n: the number of dummy samples.

  Raises:
    PluginError: naming the method, the shape it returned and the one expected,
      or the error its trace raised.
  """
  d = int(model.latent_dim)
  h, w, c = (int(s) for s in model.image_shape)
  pool_n = min(int(num_train), 2 * batch)

  def traced(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    model_params = model.init(k1)
    params = prior.init(k2, model, num_train)
    state = prior.init_state(model, num_train)
    inputs = ContextInputs(
      x=jnp.zeros((batch, h, w, c)),
      ids=jnp.arange(batch, dtype=jnp.int32),
      mu=jnp.zeros((batch, d)),
      key=k3,
      pool=jnp.zeros((pool_n, h, w, c)),
      pool_size=pool_n,
    )
    ctx, _ = prior.context(params, state, model, model_params, inputs, True)
    z = jnp.zeros((batch, d))
    out = {}
    for name, call in (
      ("log_prob", lambda: prior.log_prob(params, z, ctx, inputs.ids)),
      ("sample", lambda: prior.sample(params, k4, n, ctx)),
    ):
      try:
        out[name] = call()
      except NotImplementedError:
        raise PluginError(
          f"prior plug-in {spec!r}: {type(prior).__name__}.{name}() raises "
          f"NotImplementedError; it must return "
          f"{REQUIRED_PRIOR_METHODS[name]}."
        ) from None
    return out

  try:
    shapes = jax.eval_shape(traced, jax.random.PRNGKey(0))
  except PluginError:
    raise
  except Exception as e:  # noqa: BLE001  (the plug-in's own error, in one line)
    raise PluginError(
      f"prior plug-in {spec!r} fails on a dummy batch (B={batch}, d={d}): "
      f"{type(e).__name__}: {' '.join(str(e).split())}"
    ) from e
  want = {"log_prob": (batch,), "sample": (n, d)}
  for name, shape in want.items():
    got = getattr(shapes[name], "shape", None)
    if tuple(got or ()) != shape or got is None:
      expected = REQUIRED_PRIOR_METHODS[name]
      raise PluginError(
        f"prior plug-in {spec!r}: {type(prior).__name__}.{name}() returns shape "
        f"{tuple(got) if got is not None else type(shapes[name]).__name__}, "
        f"expected {expected} = {shape} (B={batch}, n={n}, d={d})."
      )
  check_prior_finite(prior, model, num_train, spec, batch=batch)


def check_prior_finite(prior: Any, model: Any, num_train: int, spec: str, batch: int = 3) -> None:
  """One concrete call: ``log_prob`` at the initial parameters is finite.

  Evaluated (outside any training, with its own key) at ``z = 0`` and at ``batch`` of the
  prior's own samples, with the dummy context of :func:`check_prior_shapes`. A density
  that is not finite there (a log of 0 or of a negative number, a variance of 0) would
  stop training at its first step with a non-finite loss.

  Raises:
    PluginError: naming the prior, where ``log_prob`` is not finite and its values.
  """
  d = int(model.latent_dim)
  h, w, c = (int(s) for s in model.image_shape)
  pool_n = min(int(num_train), 2 * batch)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = prior.init(k2, model, num_train)
  inputs = ContextInputs(
    x=jnp.zeros((batch, h, w, c)),
    ids=jnp.arange(batch, dtype=jnp.int32),
    mu=jnp.zeros((batch, d)),
    key=k3,
    pool=jnp.zeros((pool_n, h, w, c)),
    pool_size=pool_n,
  )
  ctx, _ = prior.context(
    params, prior.init_state(model, num_train), model, model.init(k1), inputs, True
  )
  for where, z in (
    ("z = 0", jnp.zeros((batch, d))),
    ("its own samples", prior.sample(params, k4, batch, ctx)),
  ):
    lp = np.asarray(prior.log_prob(params, jnp.asarray(z), ctx, inputs.ids))
    if not np.all(np.isfinite(lp)):
      raise PluginError(
        f"prior plug-in {spec!r}: {type(prior).__name__}.log_prob() is not "
        f"finite at its initial parameters ({where}: {lp.tolist()}); a log-density "
        "must be finite (a log of 0 or of a negative number?)."
      )
