"""Models behind one pure-function interface (:class:`Model`, :mod:`exvae.models.base`),
selected by ``config.model``.

* ``vae``: one-level MLP VAE (:mod:`exvae.models.vae`).
* ``hvae``: two-level MLP VAE, prior on z2 (:mod:`exvae.models.hvae`).
* ``convhvae``: two-level VAE with gated convolutions (:mod:`exvae.models.conv`).
* ``pixelcnn``: MLP encoder, gated PixelCNN decoder p(x|z) autoregressive over
  pixels (:mod:`exvae.models.pixelcnn`; stands in for the paper's PixelSNAIL).

``config.matmul_dtype='bfloat16'`` (operands of the networks' matrix products
in bfloat16, float32 accumulation) is implemented by ``vae`` and ``hvae``;
``convhvae`` and ``pixelcnn`` reject it (:func:`check_matmul_dtype`).

Every model supports ``config.likelihood`` 'bernoulli' (decoder gives logits)
and 'logistic' (decoder gives ``(mean, log_scale)`` of a discretised logistic).

A model outside the library is selected by a plug-in spec,
``config.model = "my_pkg.my_model:make_my_model"`` (see :mod:`exvae.plugins`):
a callable ``(config, image_shape) -> Model``, imported on first use.
"""

from __future__ import annotations

from typing import Callable, Sequence

from exvae import plugins
from exvae.models import vae as _vae
from exvae.models.base import Model, Scores
from exvae.models.conv import ConvHVAE, make_convhvae
from exvae.models.hvae import HVAE, make_head_vae_model, make_hvae
from exvae.models.pixelcnn import PixelVAE, make_pixelvae
from exvae.models.vae import VAE, check_matmul_dtype


def _vae_for_likelihood(config, image_shape: Sequence[int]) -> Model:
  # The Bernoulli VAE is exactly vae.make_vae; other likelihoods add an output head.
  if config.likelihood == "bernoulli":
    return _vae.make_vae(config, image_shape)
  return make_head_vae_model(config, image_shape)


MODELS: dict[str, Callable[..., Model]] = {
  "vae": _vae_for_likelihood,
  "hvae": make_hvae,
  "convhvae": make_convhvae,
  "pixelcnn": make_pixelvae,
}


def make_model(config, image_shape: Sequence[int]) -> Model:
  """Builds the model named by ``config.model``.

  Args:
    config: ConfigDict with ``model``, ``latent_dim``, ``hidden``,
      ``likelihood`` and (hierarchical models) ``hvae``, (pixelcnn) ``pixelcnn``.
    image_shape: (H, W, C) of the data set.

  Returns:
    A :class:`Model` whose functions are pure and jit-friendly.

  Raises:
    ValueError: unknown model or likelihood name, or a plug-in spec that
      cannot be imported.
  """
  name = config.model
  if plugins.is_spec(name) and name not in MODELS:
    factory = plugins.load(name, "model")
    if not callable(factory):
      raise ValueError(
        f"model plug-in {name!r} is {factory!r}, not a callable (config, image_shape) -> Model."
      )
    MODELS[name] = factory
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
  if plugins.is_spec(name):  # a plug-in is built with config.model_options
    return plugins.construct(
      MODELS[name],
      name,
      "model",
      config,
      image_shape,
      opts=plugins.options(config, "model_options"),
    )
  return MODELS[name](config, image_shape)


__all__ = [
  "VAE",
  "HVAE",
  "ConvHVAE",
  "PixelVAE",
  "Model",
  "Scores",
  "MODELS",
  "make_model",
  "check_matmul_dtype",
]
