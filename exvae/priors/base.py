"""The prior interface: the one extension point of exvae.

A prior is a small object with pure methods. Its learnable parameters live in
the same pytree as the model's (``params["prior"]``) and are trained by the same
optimiser; non-learnable per-run state (e.g. the RAT cache of exemplar codes)
lives in ``prior_state`` inside the train state and is checkpointed with it.

Training and evaluation call only these methods:

* ``init(key, model, num_train) -> params``
* ``init_state(model, num_train) -> state``                     (default: ``{}``)
* ``refresh(params, state, model, model_params, inputs) -> state``
  once per epoch, outside the gradient                          (default: identity)
* ``context(params, state, model, model_params, inputs, train) -> (ctx, state)``
  what ``log_prob`` needs for this batch (encoded pseudo-inputs,
  subsampled exemplars, retrieved neighbours, or the full bank at evaluation)
* ``log_prob(params, z, ctx, ids=None) -> (B,)``; ``ids`` enable leave-one-out
* ``sample(params, key, n, ctx) -> (n, d)``

All of them must be traceable under ``jax.jit`` (static shapes, no Python
control flow on array values).  A new prior is one file defining a subclass and
a call to :func:`register`; configs select it by name (``config.prior``).

The context.  ``ctx`` is built by the prior's own ``context`` and read only by
its own ``log_prob``, ``log_prob_grouped`` and ``sample``; the library passes it
through unopened (it is returned from and passed into jitted functions, and
``jax.lax.stop_gradient`` is applied to the evaluation context), so it must be
a pytree.  A prior that needs none returns ``None`` (the default).  The
built-in priors each define a typed context, a frozen dataclass registered
with :func:`jax.tree_util.register_dataclass` whose fields are documented
with their shapes: :class:`exvae.priors.vampprior.VampContext` (the encoded
pseudo-inputs) and :class:`exvae.priors.exemplar.ExemplarContext` (exemplar
codes, and which of leave-one-out, a component mask, a fixed normaliser or
the split evaluation bank apply: an optional field is ``None`` when its
behaviour is off, a mode that changes the traced program is a static field).
A plug-in prior should do the same: a misspelt field is then an error at
construction, not a key that is silently never read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from exvae.models.base import Model

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ContextInputs:
  """What a prior may look at when building its per-batch context.

  Attributes:
    x: (B, H, W, C) the (binarised) training batch, or None at evaluation.
    ids: (B,) int32 indices of the batch in the training set (-1: not a
      training point), or None.
    mu: (B, d) encoder means of ``x`` (already computed by the loss), or None.
    key: PRNG key for the prior's own randomness (exemplar subsampling).
    pool: (N, H, W, C) the training images that serve as exemplars (grey
      levels in [0, 1]), or None if the prior needs none.
    binary: whether exemplar images are binarised before encoding.
    pool_sharded: ``pool`` is split along N over the ``data`` mesh axis (and
      padded): read it with ``distributed.take_rows`` / ``map_pool_shards``.
    pool_size: the number of real training images N (0: ``pool.shape[0]``).
  """

  x: jax.Array | None = None
  ids: jax.Array | None = None
  mu: jax.Array | None = None
  key: jax.Array | None = None
  pool: jax.Array | None = None
  binary: bool = True
  pool_sharded: bool = False
  pool_size: int = 0

  @property
  def num_pool(self) -> int:
    """N, the number of training images (a split pool carries padding rows)."""
    return int(self.pool_size) or int(self.pool.shape[0])


jax.tree_util.register_dataclass(
  ContextInputs,
  data_fields=["x", "ids", "mu", "key", "pool"],
  meta_fields=["binary", "pool_sharded", "pool_size"],
)


class Prior:
  """Base class; subclasses override what they need.

  Attributes:
    needs_pool: True if the prior reads training images (exemplar priors).
  """

  name: str = "base"
  needs_pool: bool = False

  def __init__(self, config):
    self.config = config

  # -- parameters and state -------------------------------------------------
  def init(self, key: jax.Array, model: Model, num_train: int) -> PyTree:
    """Learnable parameters (a pytree, possibly empty)."""
    del key, model, num_train
    return {}

  def init_state(self, model: Model, num_train: int) -> PyTree:
    """Non-learnable state carried in the train state (checkpointed)."""
    del model, num_train
    return {}

  def refresh(self, params, state, model: Model, model_params, inputs: ContextInputs) -> PyTree:
    """Called at the start of every epoch (no gradients; ``inputs`` has pool, key). Returns new state."""
    del params, model, model_params, inputs
    return state

  # -- density ----------------------------------------------------------------
  def context(
    self, params, state, model: Model, model_params, inputs: ContextInputs, train: bool
  ) -> tuple[PyTree, PyTree]:
    """What :meth:`log_prob` and :meth:`sample` need for this batch.

    Args:
      params: the prior's parameters (``params["prior"]``).
      state: its non-learnable state (``{}`` at evaluation).
      model, model_params: the model and its parameters (to encode images).
      inputs: the batch and the exemplar pool (:class:`ContextInputs`).
      train: a training step (False: the evaluation context, built once per
        evaluation and shared by every test batch).

    Returns:
      ``(ctx, new_state)``: ``ctx`` a pytree only this prior reads (None: the
      prior needs none, the default), ``new_state`` the updated state.
    """
    del params, model, model_params, inputs, train
    return None, state

  def log_prob(self, params, z: jax.Array, ctx, ids: jax.Array | None = None) -> jax.Array:
    """log p(z) of a batch of codes.

    Args:
      params: the prior's parameters.
      z: (B, d) codes.
      ctx: this prior's context from :meth:`context`.
      ids: (B,) int32 training-set indices of the codes' images, given in
        training for leave-one-out (a prior without exemplars ignores them).

    Returns:
      (B,) log-densities.
    """
    raise NotImplementedError

  def sample(self, params, key: jax.Array, n: int, ctx) -> jax.Array:
    """Draws codes from the prior.

    Args:
      params: the prior's parameters.
      key: PRNG key.
      n: the number of codes (static).
      ctx: this prior's context (at evaluation, the evaluation context).

    Returns:
      (n, d) codes.
    """
    raise NotImplementedError

  def log_prob_grouped(self, params, z: jax.Array, centers: jax.Array, ctx):
    """Evaluation hook: z (b, S, d) are S samples around each of b centres (d,).

    Returns ``(log_p (b, S), err (b, S))`` where the exact log-density lies in
    ``[log_p, log_p + err]``.  The default is exact (err = 0); a prior may
    override it with a faster certified approximation (the exemplar prior's
    triangle-inequality pruning).
    """
    del centers
    b, s, d = z.shape
    return self.log_prob(params, z.reshape(b * s, d), ctx).reshape(b, s), jnp.zeros((b, s))

  def describe(self, params) -> dict[str, float]:
    """Scalars worth logging (e.g. the learned prior variance)."""
    del params
    return {}

  # Identity hashing: a prior object is a static argument of jitted steps.
  __hash__ = object.__hash__
  __eq__ = object.__eq__


_REGISTRY: dict[str, Callable[[Any], Prior]] = {}


def register(name: str, cls: type[Prior] | None = None):
  """Makes a prior class selectable as ``config.prior = name``.

  ``@register("name")`` on a class (a built-in prior) also sets its ``name``;
  ``register(spec, cls)`` records a plug-in class under its ``MODULE:CLASS`` spec
  as it is (:func:`exvae.priors.make_prior` does, on first use).

  Returns:
    The decorator, or ``cls``.

  Raises:
    ValueError: ``name`` is registered already.
  """

  def add(cls):
    if name in _REGISTRY:
      raise ValueError(f"Prior {name!r} registered twice.")
    _REGISTRY[name] = cls
    return cls

  if cls is not None:
    return add(cls)

  def deco(cls):
    cls.name = name
    return add(cls)

  return deco


def prior_class(name: str) -> Callable[[Any], Prior]:
  """The class registered as ``name``.

  Raises:
    ValueError: no prior is registered as ``name`` (the message lists those that are).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown prior {name!r}; registered priors: {sorted(_REGISTRY)}.")
  return _REGISTRY[name]


def registered_priors() -> list[str]:
  """The names and plug-in specs registered so far, sorted."""
  return sorted(_REGISTRY)
