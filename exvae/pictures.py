"""PNG grids of images (samples, reconstructions), written with Pillow only."""

from __future__ import annotations

import math

import numpy as np

from exvae import atomic


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles (N, H, W, C) images in [0, 1] into one uint8 (rows*H, cols*W, C) array."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = images[i]
  return (grid * 255).round().astype(np.uint8)


def grid_image(images: np.ndarray, ncols: int | None = None, scale: int = 2):
  """The PIL image of an image grid (see :func:`image_grid`), scaled up ``scale`` times."""
  from PIL import Image

  g = image_grid(images, ncols)
  mode = "L" if g.shape[-1] == 1 else "RGB"
  img = Image.fromarray(g[..., 0] if mode == "L" else g, mode=mode)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  return img


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, scale: int = 2) -> str:
  """Writes an image grid to ``path`` (PNG), atomically (:mod:`exvae.atomic`)."""
  img = grid_image(images, ncols, scale)
  return atomic.write_with(path, lambda f: img.save(f, format="PNG"))


def samples_and_reconstructions(
  samples: np.ndarray, originals: np.ndarray, recons: np.ndarray, ncols: int = 16
) -> tuple[np.ndarray, int]:
  """Rows of prior samples, then alternating rows of originals / reconstructions.

  Returns:
    ``(images (K, H, W, C), ncols)`` to tile with :func:`image_grid`.
  """
  n_orig = originals.shape[0]
  ncols = min(ncols, max(n_orig, 1), samples.shape[0]) if n_orig else ncols
  rows = [samples[: (samples.shape[0] // ncols) * ncols]]
  for start in range(0, (n_orig // ncols) * ncols, ncols):
    rows.append(originals[start : start + ncols])
    rows.append(recons[start : start + ncols])
  return np.concatenate(rows, 0), ncols


def save_samples_and_reconstructions(
  path: str, samples: np.ndarray, originals: np.ndarray, recons: np.ndarray, ncols: int = 16
) -> str:
  """One PNG: rows of prior samples, then alternating rows of originals / reconstructions."""
  images, ncols = samples_and_reconstructions(samples, originals, recons, ncols)
  return save_grid(path, images, ncols=ncols)
