"""PNG grids of images (samples, reconstructions), written with Pillow only."""

from __future__ import annotations

import math
import os

import numpy as np


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles (N, H, W, C) images in [0, 1] into one uint8 (rows*H, cols*W, C) array."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
  return (grid * 255).round().astype(np.uint8)


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, scale: int = 2) -> str:
  """Writes an image grid to ``path`` (PNG), atomically (temp file + rename)."""
  from PIL import Image
  g = image_grid(images, ncols)
  mode = "L" if g.shape[-1] == 1 else "RGB"
  img = Image.fromarray(g[..., 0] if mode == "L" else g, mode=mode)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)
  return path


def save_samples_and_reconstructions(path: str, samples: np.ndarray, originals: np.ndarray,
                                     recons: np.ndarray, ncols: int = 16) -> str:
  """One PNG: rows of prior samples, then alternating rows of originals / reconstructions."""
  n_orig = originals.shape[0]
  ncols = min(ncols, max(n_orig, 1), samples.shape[0]) if n_orig else ncols
  rows = [samples[: (samples.shape[0] // ncols) * ncols]]
  for start in range(0, (n_orig // ncols) * ncols, ncols):
    rows.append(originals[start:start + ncols])
    rows.append(recons[start:start + ncols])
  return save_grid(path, np.concatenate(rows, 0), ncols=ncols)
