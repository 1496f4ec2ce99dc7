"""The model interface: what training, evaluation and the priors see of a generative model.

A model is a :class:`Model`, a bundle of pure functions of ``(params, inputs)``
(``init``, ``encode``, ``encode_mean``, ``decode``, ``score``) and its sizes; its
``score`` returns :class:`Scores`, every term of the importance weights but the
prior's.  The built-in models (:mod:`exvae.models`) and a user's plug-in model
(``config.model = "my_pkg.my_model:make_my_model"``, a callable
``(config, image_shape) -> Model``) implement it alike; the prior's side of the
interface is :mod:`exvae.priors.base`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

Params = Any


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per-sample terms of a model's importance weights (all but the prior's).

  Attributes:
    z: (B, S, d) samples of the latent that the prior scores (the top latent).
    mu: (B, d) posterior mean of that latent (the exemplar code of x).
    log_px: (B, S) log p(x | latents).
    log_p_rest: (B, S) log-density of the lower latents given the top one
      (0 for a one-level VAE).
    log_q: (B, S) log q(all latents | x) (with ``score``'s ``path_weight``:
      the posterior's parameters held fixed, gradients only through the samples).
  """

  z: jax.Array
  mu: jax.Array
  log_px: jax.Array
  log_p_rest: jax.Array
  log_q: jax.Array


# eq=False: hashed by identity, so a Model can be a static jit argument.
@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """Pure-function view of a generative model (what priors and losses use).

  Attributes:
    init: ``init(key) -> params``.
    encode: ``encode(params, x) -> (mu, logvar)`` of the latent the prior
      scores (the top latent); x (B, H, W, C), outputs (B, d).
    encode_mean: ``encode_mean(params, x) -> mu`` (B, d): the exemplar code.
    decode: ``decode(params, z) -> likelihood parameters`` for ``x`` (B, H, W, C),
      from a top latent (lower latents, if any, are sampled or set to their means).
    score: ``score(params, x, key, num_samples, log_lik, *, path_weight=None)
      -> Scores``: S posterior samples and every term of log w except
      log p(z_top).  ``path_weight`` (B, S), needed by
      ``gradient_estimator='dreg'`` only, multiplies the gradient that flows
      from each sample (of every latent) back to the encoder, and makes
      ``log_q`` hold the posterior's parameters fixed.
    latent_dim: d.
    image_shape: (H, W, C).
    module: the Flax module whose ``apply`` these functions call.
  """

  init: Callable[[jax.Array], Params]
  encode: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
  encode_mean: Callable[[Params, jax.Array], jax.Array]
  decode: Callable[[Params, jax.Array], jax.Array]
  score: Callable[..., Scores]
  latent_dim: int
  image_shape: tuple[int, int, int]
  module: nn.Module
