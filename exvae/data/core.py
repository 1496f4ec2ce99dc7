"""Core data types and helpers shared by all data readers.

Defines the :class:`Splits` container returned by :func:`exvae.data.load`, the
deterministic :func:`binarize` used for the fixed validation/test binarisation,
and :func:`validate_images`, the sanity check every loaded split goes through.
The errors of the data (:class:`~exvae.errors.DataNotFoundError`,
:class:`~exvae.errors.DataFormatError`) live in :mod:`exvae.errors`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = ["Splits", "binarize", "validate_images"]


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train / validation / test splits of one data set.

  Attributes:
    name: data set name ('mnist', 'fashion_mnist', 'digits' or 'omniglot').
    train_x: (N_train, H, W, C) float32 grey levels in [0, 1]. For binary
      data sets these are NOT binarised: the trainer re-binarises them every
      batch (dynamic binarisation).
    train_y: (N_train,) int32 labels, or None when the data set has none.
    val_x: (N_val, H, W, C) float32. For binary data sets already binarised
      once with a fixed seed (values in {0, 1}).
    val_y: (N_val,) int32 labels or None.
    test_x: (N_test, H, W, C) float32, binarised once like ``val_x`` (with a
      different fixed seed) for binary data sets.
    test_y: (N_test,) int32 labels or None.
    binary: True for a Bernoulli likelihood (train images are binarised per
      batch by the trainer, val/test are fixed binarisations).
    source: human-readable description of where the data came from.
    identity: for a user's data set (``npz:PATH`` or a plug-in), what the
      run records and checks of it: ``{"path"}`` or ``{"plugin"}`` and
      ``"sha256"`` of its arrays (see :func:`exvae.data.user.arrays_sha256`);
      None for the built-in data sets.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray | None
  val_x: np.ndarray
  val_y: np.ndarray | None
  test_x: np.ndarray
  test_y: np.ndarray | None
  binary: bool
  source: str
  identity: dict | None = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    h, w, c = self.train_x.shape[1:]
    return (int(h), int(w), int(c))

  def __repr__(self) -> str:  # the arrays would make the default repr huge
    return (
      f"Splits(name={self.name!r}, train={self.train_x.shape[0]}, "
      f"val={self.val_x.shape[0]}, test={self.test_x.shape[0]}, "
      f"image_shape={self.image_shape}, binary={self.binary}, "
      f"labels={self.train_y is not None}, source={self.source!r})"
    )


def _binarize_with(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  u = rng.random(np.shape(x), dtype=np.float32)
  return (u < np.asarray(x, dtype=np.float32)).astype(np.float32)


def binarize(x: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
  """Stochastically binarises grey levels: each pixel ~ Bernoulli(x).

  Deterministic given ``seed`` (numpy PCG64 generator seeded with it).

  Args:
    x: array of probabilities in [0, 1], any shape.
    seed: integer seed (or a sequence of ints, as accepted by
      ``np.random.default_rng``).

  Returns:
    float32 array of the same shape with values in {0, 1}.
  """
  return _binarize_with(x, np.random.default_rng(seed))


# The reference's fixed draw (utils/load_data/base_load_data.py, ``binarize``): the legacy
# global generator seeded with 777, the validation images first, then the test images.
REFERENCE_BINARIZE_SEED = 777


def reference_binarize(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """The reference's fixed binarisation of validation then test images, bit for bit.

  The authors' code runs ``np.random.seed(777)``, then ``np.random.binomial(1, x_val)``
  and ``np.random.binomial(1, x_test)`` on the grey levels ``uint8 / 255`` in float64.
  Replaying that draw scores exactly the images the paper's numbers were scored on.

  Args:
    *arrays: the validation images, then (optionally) the test images: uint8 (N, H, W[, C])
      or grey levels in [0, 1] (taken as float64).

  Returns:
    float32 arrays of the same shapes (channel axis added to 3-d input), values in {0, 1}.
  """
  rs = np.random.RandomState(REFERENCE_BINARIZE_SEED)  # legacy MT19937, as np.random.seed
  out = []
  for x in arrays:
    x = np.asarray(x)
    p = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if p.ndim == 3:
      p = p[..., None]
    out.append(rs.binomial(1, p).astype(np.float32))  # C order, as on (N, 784) rows
  return tuple(out)


def validate_images(
  x: np.ndarray,
  *,
  image_shape: tuple[int, ...] | None = None,
  name: str = "images",
) -> None:
  """Checks that ``x`` is a batch of images with grey levels in [0, 1].

  Args:
    x: array expected to be (N, H, W, C), finite, with values in [0, 1].
    image_shape: if given, the expected (H, W, C).
    name: what ``x`` is, used in error messages.

  Raises:
    ValueError: wrong type, ndim or shape, non-finite values, or values
      outside [0, 1]; the message says which and where.
  """
  if not isinstance(x, np.ndarray):
    raise ValueError(f"{name}: expected a numpy array, got {type(x).__name__}")
  if x.ndim != 4:
    raise ValueError(
      f"{name}: expected a 4-D array (N, H, W, C), got ndim={x.ndim} with shape {x.shape}"
    )
  if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(
      f"{name}: expected images of shape (H, W, C)={tuple(image_shape)}, "
      f"got array of shape {x.shape}"
    )
  if x.size == 0:
    return
  if not (
    np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_
  ):
    raise ValueError(f"{name}: expected a numeric array, got dtype {x.dtype}")
  if np.issubdtype(x.dtype, np.floating):
    finite = np.isfinite(x)
    if not finite.all():
      bad = np.argwhere(~finite)[0]
      raise ValueError(
        f"{name}: {int((~finite).sum())} non-finite value(s) (NaN/inf), "
        f"first at index {tuple(int(i) for i in bad)}"
      )
  lo, hi = x.min(), x.max()
  if lo < 0 or hi > 1:
    raise ValueError(
      f"{name}: values must lie in [0, 1] (grey levels / probabilities), "
      f"got min={float(lo):g}, max={float(hi):g}"
      + (" -- did you forget to divide uint8 pixels by 255?" if hi > 1 else "")
    )
