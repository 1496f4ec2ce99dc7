"""Exemplar-based generation with a trained model and its exemplar bank.

* conditional: for an exemplar x, ``z ~ N(mu(x), s2 I)`` decoded (the
  Exemplar VAE's generative process given the exemplar);
* unconditional: a uniformly random exemplar of the bank, then as above;
* cyclic: a chain ``x_0 -> z_1 ~ N(mu(x_0), s2 I) -> x_1 -> z_2 ~ ...`` where
  each decoded sample becomes the next exemplar (binarised, for binary data,
  since the encoder was trained on binary images);
* interpolation: the decoded straight line between two exemplars' codes;
* augmentation: one conditional sample of each image, on the 1/255 grey-level
  grid (:func:`augment_images`, what the classifier of :mod:`exvae.uses.augment`
  trains on beside the real images).

Images are the decoder's mean images (``mean_fn``: the Bernoulli mean
sigmoid(logits) by default; pass the run's ``setup.mean_fn`` for other
likelihoods).  Every sampling function is a pure function of explicit keys,
jitted but for :func:`augment_images`, which the classifier's jitted train step
traces; the ``save_*`` functions write PNG grids with :mod:`exvae.pictures`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from exvae import pictures
from exvae.likelihoods import bernoulli_mean
from exvae.models.base import Model

PyTree = Any


MeanFn = Callable[[Any], jax.Array]


def _mean_image(model: Model, params: PyTree, z: jax.Array, mean_fn: MeanFn) -> jax.Array:
  """Mean images mean_fn(decode(z)): (B, d) -> (B, H, W, C)."""
  return mean_fn(model.decode(params, z))


@functools.partial(jax.jit, static_argnames=("model", "n", "mean_fn"))
def conditional_samples(
  model: Model,
  params: PyTree,
  x: jax.Array,
  log_var: jax.Array,
  key: jax.Array,
  n: int,
  *,
  mean_fn: MeanFn = bernoulli_mean,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """n samples per exemplar: z ~ N(mu(x_b), s2 I), decoded.

  Args:
    model: the model (static).
    params: model parameters.
    x: (B, H, W, C) exemplar images (binarised for binary data).
    log_var: scalar log s2.
    key: PRNG key.
    n: samples per exemplar (static).

  Returns:
    ``(images (B, n, H, W, C), z (B, n, d), mu (B, d))``.
  """
  mu = model.encode_mean(params, x)
  b, d = mu.shape
  z = mu[:, None] + jnp.exp(0.5 * log_var) * jax.random.normal(key, (b, n, d), mu.dtype)
  imgs = _mean_image(model, params, z.reshape(b * n, d), mean_fn)
  return imgs.reshape((b, n) + imgs.shape[1:]), z, mu


@functools.partial(jax.jit, static_argnames=("model", "n", "mean_fn"))
def unconditional_samples(
  model: Model,
  params: PyTree,
  codes: jax.Array,
  log_var: jax.Array,
  key: jax.Array,
  n: int,
  *,
  mean_fn: MeanFn = bernoulli_mean,
) -> tuple[jax.Array, jax.Array]:
  """n samples of the exemplar prior (random bank row, then N(mu, s2 I)), decoded.

  Args:
    model: the model (static).
    params: model parameters.
    codes: (N, d) bank codes.
    log_var: scalar log s2.
    key: PRNG key.
    n: number of samples (static).

  Returns:
    ``(images (n, H, W, C), rows (n,) int32)``.
  """
  k_idx, k_eps = jax.random.split(key)
  rows = jax.random.randint(k_idx, (n,), 0, codes.shape[0], dtype=jnp.int32)
  z = codes[rows] + jnp.exp(0.5 * log_var) * jax.random.normal(k_eps, (n, codes.shape[1]))
  return _mean_image(model, params, z, mean_fn), rows


@functools.partial(jax.jit, static_argnames=("model", "steps", "binary", "mean_fn"))
def cyclic_chains(
  model: Model,
  params: PyTree,
  x0: jax.Array,
  log_var: jax.Array,
  key: jax.Array,
  steps: int,
  binary: bool = True,
  *,
  mean_fn: MeanFn = bernoulli_mean,
) -> jax.Array:
  """Cyclic generation: each decoded sample is the next step's exemplar.

  Step t: ``z_t ~ N(mu(x_{t-1}), s2 I)``, ``x_t = mean(decode(z_t))``; the
  encoder sees ``Bernoulli(x_t)`` (key from ``fold_in(key, t)``) if
  ``binary`` (a no-op for an already binary exemplar x_0).

  Args:
    model: the model (static).
    params: model parameters.
    x0: (B, H, W, C) starting exemplars (one chain each).
    log_var: scalar log s2.
    key: PRNG key.
    steps: T, chain length (static).
    binary: binarise the fed-back images (static).

  Returns:
    (B, T, H, W, C) mean images x_1..x_T.
  """

  def body(x, t):
    k = jax.random.fold_in(key, t)
    k_bin, k_eps = jax.random.split(k)
    xin = jax.random.bernoulli(k_bin, x).astype(jnp.float32) if binary else x
    mu = model.encode_mean(params, xin)
    z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(k_eps, mu.shape, mu.dtype)
    xn = _mean_image(model, params, z, mean_fn)
    return xn, xn

  # Binarising x_0 (an already binarised exemplar) changes nothing: Bernoulli(0/1) = 0/1.
  _, xs = jax.lax.scan(body, jnp.asarray(x0, jnp.float32), jnp.arange(steps))
  return jnp.moveaxis(xs, 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "steps", "mean_fn"))
def interpolate(
  model: Model,
  params: PyTree,
  z_a: jax.Array,
  z_b: jax.Array,
  steps: int,
  *,
  mean_fn: MeanFn = bernoulli_mean,
) -> jax.Array:
  """Decoded straight-line paths between pairs of codes.

  Args:
    model: the model (static).
    params: model parameters.
    z_a: (P, d) start codes.
    z_b: (P, d) end codes.
    steps: points per path, endpoints included (static, >= 2).

  Returns:
    (P, steps, H, W, C) mean images; [:, 0] decodes z_a, [:, -1] decodes z_b.
  """
  t = jnp.linspace(0.0, 1.0, steps)[None, :, None]
  z = (1.0 - t) * z_a[:, None] + t * z_b[:, None]  # (P, steps, d)
  p, s, d = z.shape
  imgs = _mean_image(model, params, z.reshape(p * s, d), mean_fn)
  return imgs.reshape((p, s) + imgs.shape[1:])


def augment_images(
  vae: Model,
  vae_params: PyTree,
  x: jax.Array,
  log_var: jax.Array,
  key: jax.Array,
  binary: bool,
  mean_fn: MeanFn = bernoulli_mean,
) -> jax.Array:
  """Decoded samples z ~ N(mu(x), s2 I), rounded to the 1/255 grid: augmented images.

  Each keeps its source image's label when a classifier trains on it
  (:mod:`exvae.uses.classifier`).  Not jitted here: the classifier's train step
  traces it.

  Args:
    vae: the generative model.
    vae_params: its parameters.
    x: (B, H, W, C) grey levels in [0, 1].
    log_var: scalar log s2.
    key: PRNG key.
    binary: encode Bernoulli(x) instead of x.
    mean_fn: decoder output -> mean image (Bernoulli mean by default).

  Returns:
    (B, H, W, C) augmented images in [0, 1] (multiples of 1/255).
  """
  k_bin, k_eps = jax.random.split(key)
  xin = jax.random.bernoulli(k_bin, x).astype(jnp.float32) if binary else x
  mu = vae.encode_mean(vae_params, xin)
  z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(k_eps, mu.shape, mu.dtype)
  p = jnp.clip(mean_fn(vae.decode(vae_params, z)), 0.0, 1.0)
  return jax.lax.stop_gradient(jnp.round(p * 255.0) / 255.0)


# ----------------------------------------------------------------------------
# PNG writers
# ----------------------------------------------------------------------------


def _scale(height: int) -> int:
  """Pixel upscaling of a grid: 2 for 28x28 images, more for tiny ones (8x8 digits)."""
  return max(2, 56 // max(int(height), 1))


def save_conditional_grid(path: str, inputs: np.ndarray, samples: np.ndarray) -> str:
  """One row per exemplar: the input, then its n samples.

  Args:
    path: PNG path.
    inputs: (B, H, W, C) exemplars.
    samples: (B, n, H, W, C) their samples.

  Returns:
    ``path``.
  """
  inputs, samples = np.asarray(inputs), np.asarray(samples)
  rows = np.concatenate([inputs[:, None], samples], axis=1)  # (B, 1 + n, ...)
  return pictures.save_grid(
    path, rows.reshape((-1,) + rows.shape[2:]), ncols=rows.shape[1], scale=_scale(rows.shape[2])
  )


def save_samples_grid(path: str, images: np.ndarray, ncols: int | None = None) -> str:
  """Unconditional samples (N, H, W, C) as a square-ish grid."""
  images = np.asarray(images)
  return pictures.save_grid(path, images, ncols=ncols, scale=_scale(images.shape[1]))


def save_chains(path: str, x0: np.ndarray, chains: np.ndarray) -> str:
  """Cyclic generation: one row per chain, the starting exemplar first.

  Args:
    path: PNG path.
    x0: (B, H, W, C) starting exemplars.
    chains: (B, T, H, W, C) chain states.
  """
  return save_conditional_grid(path, x0, chains)


def save_interpolation(path: str, x_a: np.ndarray, x_b: np.ndarray, paths: np.ndarray) -> str:
  """One row per pair: exemplar a, the decoded path, exemplar b.

  Args:
    path: PNG path.
    x_a, x_b: (P, H, W, C) the two exemplars of each pair.
    paths: (P, steps, H, W, C) decoded paths.
  """
  rows = np.concatenate([np.asarray(x_a)[:, None], np.asarray(paths), np.asarray(x_b)[:, None]], 1)
  return pictures.save_grid(
    path, rows.reshape((-1,) + rows.shape[2:]), ncols=rows.shape[1], scale=_scale(rows.shape[2])
  )
