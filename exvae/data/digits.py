"""The scikit-learn handwritten digits (real data shipped inside scikit-learn).

1797 images of 8x8 pixels with 17 grey levels (0..16), from the UCI "Optical
Recognition of Handwritten Digits" data set. Used as the tiny real data set for
fast tests and CPU demos (kept at 8x8, i.e. 64-pixel inputs).
"""

from __future__ import annotations

import numpy as np

__all__ = [
  "DIGITS_TEST",
  "DIGITS_VAL",
  "DIGITS_PERM_SEED",
  "load_digits_arrays",
  "digits_permutation",
]

DIGITS_TEST = 300
DIGITS_VAL = 200
DIGITS_PERM_SEED = 0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Loads all 1797 digits.

  Returns:
    (images, labels): float32 (1797, 8, 8, 1) grey levels divided by 16 (so
    in [0, 1]) and int32 labels 0..9, in scikit-learn's order.
  """
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (np.asarray(d.images, np.float32) / np.float32(16.0))[..., None]
  return x, np.asarray(d.target, np.int32)


def digits_permutation(n: int) -> np.ndarray:
  """Fixed permutation used to split the digits.

  Args:
    n: number of images.

  Returns:
    ``np.random.default_rng(0).permutation(n)``; the first 300 indices are
    the test set, the next ``val_size`` (default 200) the validation set and
    the rest (1297 by default) the training set.
  """
  return np.random.default_rng(DIGITS_PERM_SEED).permutation(n)
