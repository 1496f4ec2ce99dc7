"""Data sets for exvae: MNIST, Fashion-MNIST, Omniglot (28x28) and sklearn digits.

Entry point: :func:`load` returns a :class:`Splits` with float32 images in
[0, 1] of shape (N, H, W, C); :func:`load_grey` the same splits with grey-level
validation and test images, for the classifiers of the downstream uses. All
four data sets are modelled with a Bernoulli likelihood (``binary=True``): the
trainer re-binarises training images every batch, while validation and test
images come back already binarised once with fixed seeds (as in the Exemplar
VAE paper).

Splits (as in the paper):
  * mnist, fashion_mnist: first 50000 official training images = train, the
    last 10000 = validation (``val_size`` overrides 10000), official 10000 test.
  * omniglot (``chardata.mat``): training images shuffled with a fixed
    permutation (seed 0, as the VampPrior code shuffles), 23000 train, the
    remaining 1345 validation, official 8070 test.
  * digits (sklearn): fixed permutation (seed 0): 300 test, 200 validation,
    1297 train.

A researcher's own data set is ``npz:PATH`` (an ``.npz`` file) or a plug-in
``MODULE:FUNCTION`` (:mod:`exvae.data.user`): split, binarised and checked as
the built-in sets, with its identity (path, SHA-256 of its arrays) in
``Splits.identity``.

Nothing is ever downloaded and no fake data is ever returned: a missing data
set raises :class:`DataNotFoundError` explaining how to get it, and a user's data set
that cannot be used a :class:`DataFormatError` (both defined in :mod:`exvae.errors`,
with the other expected errors, and importable from here).
"""

from __future__ import annotations

import os

import numpy as np

from exvae.data import user
from exvae.errors import ConfigError, DataFormatError, DataNotFoundError
from exvae.data.core import Splits, binarize, reference_binarize, validate_images
from exvae.data.idx import (
  IDX_FILES,
  IdxFormatError,
  find_idx_dir,
  idx_candidate_dirs,
  load_idx_dataset,
  read_idx,
)

__all__ = [
  "DataFormatError",
  "DataNotFoundError",
  "IdxFormatError",
  "Splits",
  "KNOWN_DATASETS",
  "GREY_DATASETS",
  "DEFAULT_IDX_DIRS",
  "load",
  "load_grey",
  "binarize",
  "reference_binarize",
  "validate_images",
  "read_idx",
]

KNOWN_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "digits", "omniglot", "celeba")
# The built-in binary data sets whose grey levels load_grey reads (besides a user's data set).
GREY_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "digits")
_SOURCES = {
  "mnist": ("auto", "idx", "tfds"),
  "fashion_mnist": ("auto", "idx", "tfds"),
  "digits": ("auto", "sklearn"),
  "omniglot": ("auto", "mat"),
  "celeba": ("auto", "tfds"),  # continuous colour 64x64 (exvae/data/celeba.py), not binarised
}
# Where IDX files are looked for when data_dir is None. Fashion-MNIST:
# `apt-get install dataset-fashion-mnist` (Debian) installs the genuine files there.
DEFAULT_IDX_DIRS = {
  "mnist": "/usr/share/datasets/mnist",
  "fashion_mnist": "/usr/share/datasets/fashion-mnist",
}
_IDX_URLS = {
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/ (mirror of yann.lecun.com/exdb/mnist)",
  "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
}
_DEFAULT_VAL = {"mnist": 10000, "fashion_mnist": 10000, "digits": 200}
_OMNIGLOT_TRAIN = 23000
_SPLIT_SEED = 0
# Streams for the fixed evaluation binarisations: rng seeded with (seed, stream).
_VAL_STREAM, _TEST_STREAM = 1, 2


def _missing_mnist_message(name: str, data_dir: str | None, source: str) -> str:
  from exvae.data.tfds_source import default_tfds_data_dir, how_to_prepare, TFDS_NAMES

  idx_root = data_dir if data_dir is not None else DEFAULT_IDX_DIRS[name]
  dirs = idx_candidate_dirs(name, idx_root)
  files = ", ".join(f + "[.gz]" for f in IDX_FILES)
  tfds_dir = os.path.expanduser(data_dir) if data_dir is not None else default_tfds_data_dir()
  lines = [f"{name}: data not found (source={source!r}, data_dir={data_dir!r})."]
  if source in ("auto", "idx"):
    lines.append(f"Looked for the IDX files {files} in: {', '.join(dirs)}")
  if source in ("auto", "tfds"):
    lines.append(
      f"Looked for a tfds-prepared '{TFDS_NAMES[name]}' in {tfds_dir}/{TFDS_NAMES[name]}/<version>/"
    )
  lines.append("To fix, either:")
  if name == "fashion_mnist":
    lines.append(
      f"  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (installs the "
      f"genuine IDX files in {DEFAULT_IDX_DIRS[name]}, used when data_dir is None)"
    )
    if data_dir is not None and find_idx_dir(name, DEFAULT_IDX_DIRS[name]) is not None:
      lines.append(
        f"    (they ARE installed here: pass data_dir=None or --config.data_dir={DEFAULT_IDX_DIRS[name]})"
      )
  lines.append(
    f"  - put the four IDX files ({_IDX_URLS[name]}) in a directory and pass it as "
    "data_dir (--config.data_dir=/path/to/dir)"
  )
  lines.append(
    "  - or prepare it with tfds on a machine with internet and pass that tfds "
    "directory as data_dir (--config.data_dir=...):\n" + how_to_prepare(name, data_dir)
  )
  return "\n".join(lines)


def _load_mnist_like(name: str, data_dir: str | None, source: str):
  """Returns (xtr uint8 (N,H,W[,1]), ytr, xte, yte, source description)."""
  from exvae.data import tfds_source

  if source in ("auto", "idx"):
    idx_root = data_dir if data_dir is not None else DEFAULT_IDX_DIRS[name]
    found = find_idx_dir(name, idx_root)
    if found is not None:
      directory, paths = found
      xtr, ytr, xte, yte = load_idx_dataset(name, directory, paths)
      return xtr, ytr, xte, yte, f"idx:{directory}"
    if source == "idx":
      raise DataNotFoundError(_missing_mnist_message(name, data_dir, source))
  if source == "tfds" or tfds_source.tfds_prepared_dir(name, data_dir) is not None:
    return tfds_source.load_tfds(name, data_dir)
  raise DataNotFoundError(_missing_mnist_message(name, data_dir, source))


def _check_count(value: int | None, what: str, minimum: int = 1) -> None:
  if value is not None and (not isinstance(value, (int, np.integer)) or value < minimum):
    raise ValueError(f"{what} must be an integer >= {minimum} or None, got {value!r}")


def _as_float_images(x: np.ndarray) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255.0)
  return np.asarray(x, np.float32)


def load(
  name: str,
  *,
  data_dir: str | None = None,
  source: str = "auto",
  val_size: int | None = None,
  eval_binarize_seed: int = 0,
  eval_binarize: str = "exvae",
  max_train: int | None = None,
  max_test: int | None = None,
  likelihood: str = "bernoulli",
) -> Splits:
  """Loads a data set and splits it into train / validation / test.

  Args:
    name: one of 'mnist', 'fashion_mnist', 'digits', 'omniglot', 'celeba', or
      a user's data set: ``npz:PATH`` or a plug-in ``MODULE:FUNCTION``
      (:mod:`exvae.data.user`).
    data_dir: where the data lives. mnist / fashion_mnist: a directory with
      the four IDX files (or a sub-directory such as ``mnist``,
      ``MNIST/raw``) or a tfds data_dir; None: the default IDX directory
      (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST), then the tfds
      default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). omniglot:
      directory holding ``chardata.mat`` (or the file itself). Ignored for
      digits.
    source: 'auto' (IDX files if present, else a prepared tfds data set),
      'idx', 'tfds' (mnist, fashion_mnist), 'sklearn' (digits), 'mat'
      (omniglot).
    val_size: size of the validation split carved from the end of the
      official training set (defaults: 10000 for mnist/fashion_mnist, 200 for
      digits, the 1345 images beyond 23000 for omniglot).
    eval_binarize_seed: seed of the fixed binarisation of val and test (they
      use different streams derived from it).
    eval_binarize: 'exvae' (the draw seeded by ``eval_binarize_seed``) or
      'reference' (mnist, fashion_mnist: the authors' own draw, see
      :func:`reference_binarize`, so that test NLLs are scored on the paper's
      binarised images).
    max_train: keep only the first ``max_train`` training images.
    max_test: keep only the first ``max_test`` validation and test images.
    likelihood: a user's data set only: 'bernoulli' binarises it (training
      images per batch, val/test once with fixed seeds, as the built-in
      sets); any other (the discretised 'logistic') keeps its grey levels.

  Returns:
    A :class:`Splits`; images float32 (N, H, W, C); val/test binarised.

  Raises:
    ValueError: unknown name or source, bad sizes.
    DataNotFoundError: the data is not on disk (the message says how to get it).
    IdxFormatError: corrupt IDX files.
    DataFormatError: a user's data set holds arrays that cannot be used.
  """
  if user.is_user_dataset(name):
    return _load_user(
      name,
      source=source,
      val_size=val_size,
      eval_binarize=eval_binarize,
      eval_binarize_seed=eval_binarize_seed,
      max_train=max_train,
      max_test=max_test,
      likelihood=likelihood,
    )
  _check_load_args(name, source, eval_binarize, val_size, max_train, max_test)
  if name == "celeba":  # continuous data: its own loader (official tfds splits, no binarisation)
    from exvae.data.celeba import load_celeba

    return load_celeba(data_dir, max_train=max_train, max_test=max_test)

  parts, desc = _read_splits(name, data_dir, source, val_size)
  return _assemble(
    name,
    parts,
    binary=True,
    source=desc,
    eval_binarize=eval_binarize,
    eval_binarize_seed=eval_binarize_seed,
    max_train=max_train,
    max_test=max_test,
  )  # all four data sets use a Bernoulli likelihood


def _check_load_args(
  name: str,
  source: str,
  eval_binarize: str,
  val_size: int | None,
  max_train: int | None,
  max_test: int | None,
) -> None:
  """Checks :func:`load`'s arguments for a built-in data set (see there).

  Raises:
    ValueError: unknown name or source, an ``eval_binarize`` the data set has not, bad sizes.
  """
  if name not in KNOWN_DATASETS:
    raise ValueError(
      f"unknown data set {name!r}; known data sets: {', '.join(KNOWN_DATASETS)}, "
      "or your own: npz:PATH (an .npz file) or MODULE:FUNCTION (a plug-in)"
    )
  if source not in _SOURCES[name]:
    raise ValueError(
      f"bad source {source!r} for data set {name!r}; valid sources: {', '.join(_SOURCES[name])}"
    )
  if eval_binarize not in ("exvae", "reference"):
    raise ValueError(f"eval_binarize must be 'exvae' or 'reference', got {eval_binarize!r}")
  if eval_binarize == "reference" and name not in ("mnist", "fashion_mnist"):
    raise ValueError(
      f"eval_binarize='reference' replays the authors' draw for mnist and "
      f"fashion_mnist only, not {name!r}: use eval_binarize='exvae'"
    )
  _check_count(val_size, "val_size")
  _check_count(max_train, "max_train")
  _check_count(max_test, "max_test")


def load_grey(
  name: str,
  *,
  data_dir: str | None = None,
  source: str = "auto",
  val_size: int | None = None,
  max_train: int | None = None,
  max_test: int | None = None,
) -> Splits:
  """The splits of :func:`load` with grey-level validation and test images (not binarised).

  :func:`load` binarises the validation and test images of a binary data set
  once, with fixed seeds, for the likelihood; a classifier trained on the
  images (the downstream uses) reads their grey levels instead.  The split
  rule is :func:`load`'s, so ``train_x`` equals its ``train_x``.

  Args:
    name: one of :data:`GREY_DATASETS`, or a user's data set (``npz:PATH``,
      ``MODULE:FUNCTION``).
    data_dir, source, val_size, max_train, max_test: as :func:`load`.

  Returns:
    A :class:`Splits` with ``binary=False``; images float32 (N, H, W, C) in [0, 1].

  Raises:
    ValueError: a data set whose grey levels are not read here (omniglot,
      celeba), an unknown source, bad sizes.
    DataNotFoundError, IdxFormatError, DataFormatError: as :func:`load`.
  """
  if user.is_user_dataset(name):
    return _load_user(
      name,
      source=source,
      val_size=val_size,
      eval_binarize="exvae",
      eval_binarize_seed=0,
      max_train=max_train,
      max_test=max_test,
      likelihood="logistic",
    )  # any non-Bernoulli likelihood: grey levels
  if name not in GREY_DATASETS:
    raise ValueError(
      f"no grey-level reader for {name!r}; grey levels are read for "
      f"{', '.join(GREY_DATASETS)} and a user's data set"
    )
  if source not in _SOURCES[name]:
    raise ValueError(
      f"bad source {source!r} for data set {name!r}; valid sources: {', '.join(_SOURCES[name])}"
    )
  _check_count(val_size, "val_size")
  _check_count(max_train, "max_train")
  _check_count(max_test, "max_test")
  parts, desc = _read_splits(name, data_dir, source, val_size)
  return _assemble(
    name,
    parts,
    binary=False,
    source=desc,
    eval_binarize="exvae",
    eval_binarize_seed=0,
    max_train=max_train,
    max_test=max_test,
  )


def _read_splits(name: str, data_dir: str | None, source: str, val_size: int | None):
  """The raw splits of a built-in binary data set (mnist, fashion_mnist, digits, omniglot).

  Returns:
    ``((train_x, train_y, val_x, val_y, test_x, test_y), source description)``;
    images as stored (uint8 or float), labels or None.
  """
  train_y: np.ndarray | None
  if name in ("mnist", "fashion_mnist"):
    xtr, ytr, xte, yte, desc = _load_mnist_like(name, data_dir, source)
    n_val = _DEFAULT_VAL[name] if val_size is None else int(val_size)
    if n_val >= len(xtr):
      raise ValueError(f"val_size={n_val} must be smaller than the {len(xtr)} training images")
    train_x, val_x = xtr[: len(xtr) - n_val], xtr[len(xtr) - n_val :]
    train_y, val_y = ytr[: len(ytr) - n_val], ytr[len(ytr) - n_val :]
    test_x, test_y = xte, yte
  elif name == "digits":
    from exvae.data.digits import DIGITS_TEST, digits_permutation, load_digits_arrays

    x, y = load_digits_arrays()
    n_val = _DEFAULT_VAL[name] if val_size is None else int(val_size)
    if DIGITS_TEST + n_val >= len(x):
      raise ValueError(f"val_size={n_val} leaves no digits for training")
    perm = digits_permutation(len(x))
    te, va, tr = (
      perm[:DIGITS_TEST],
      perm[DIGITS_TEST : DIGITS_TEST + n_val],
      perm[DIGITS_TEST + n_val :],
    )
    train_x, train_y, val_x, val_y, test_x, test_y = x[tr], y[tr], x[va], y[va], x[te], y[te]
    desc = "sklearn:load_digits"
  else:  # omniglot
    from exvae.data.omniglot import find_omniglot, read_chardata

    path = find_omniglot(data_dir)
    xtr, ytr, test_x, test_y = read_chardata(path)
    if val_size is None:
      if len(xtr) <= _OMNIGLOT_TRAIN:
        raise ValueError(
          f"{path} has only {len(xtr)} training images (the genuine file has 24345); "
          f"pass val_size explicitly"
        )
      n_val = len(xtr) - _OMNIGLOT_TRAIN
    else:
      n_val = int(val_size)
    if n_val >= len(xtr):
      raise ValueError(f"val_size={n_val} must be smaller than the {len(xtr)} training images")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(xtr))
    tr, va = perm[: len(xtr) - n_val], perm[len(xtr) - n_val :]
    train_x, val_x = xtr[tr], xtr[va]
    train_y = ytr[tr] if ytr is not None else None
    val_y = ytr[va] if ytr is not None else None
    desc = path
  return (train_x, train_y, val_x, val_y, test_x, test_y), desc


def _load_user(
  name: str,
  *,
  source: str,
  val_size: int | None,
  eval_binarize: str,
  eval_binarize_seed: int,
  max_train: int | None,
  max_test: int | None,
  likelihood: str,
) -> Splits:
  """A user's data set (``npz:PATH`` or ``MODULE:FUNCTION``), split and binarised as the built-ins."""
  kind = "npz:PATH" if user.is_npz(name) else "a plug-in"
  if source != "auto":
    raise ConfigError(
      f"data_source={source!r} does not apply to {kind} (--config.dataset="
      f"{name}): leave --config.data_source at 'auto'"
    )
  if eval_binarize != "exvae":
    raise ConfigError(
      f"eval_binarize={eval_binarize!r} replays the authors' draw for mnist "
      f"and fashion_mnist only, not {kind}: use eval_binarize='exvae'"
    )
  _check_count(val_size, "val_size")
  _check_count(max_train, "max_train")
  _check_count(max_test, "max_test")
  parts, desc, identity = user.read_user_dataset(name, val_size)
  name = f"npz:{identity['path']}" if "path" in identity else name
  return _assemble(
    name,
    parts,
    binary=likelihood == "bernoulli",
    source=desc,
    eval_binarize="exvae",
    eval_binarize_seed=eval_binarize_seed,
    max_train=max_train,
    max_test=max_test,
    identity=identity,
  )


def _assemble(
  name: str,
  parts: tuple,
  *,
  binary: bool,
  source: str,
  eval_binarize: str,
  eval_binarize_seed: int,
  max_train: int | None,
  max_test: int | None,
  identity: dict | None = None,
) -> Splits:
  """The :class:`Splits` of raw splits: the fixed val/test binarisation, truncation, checks.

  Args:
    name: the data set's name.
    parts: (train_x, train_y, val_x, val_y, test_x, test_y); images uint8,
      bool or float in [0, 1], (N, H, W) or (N, H, W, C); labels or None.
    binary: binarise val/test once with fixed seeds (a Bernoulli likelihood);
      False keeps their grey levels.
    source, identity: as :class:`Splits` records them.
    eval_binarize, eval_binarize_seed, max_train, max_test: as :func:`load`.
  """
  train_x, train_y, val_x, val_y, test_x, test_y = parts
  if binary and eval_binarize == "reference":
    val_x, test_x = reference_binarize(val_x, test_x)  # from the raw grey levels
  else:
    val_x, test_x = _as_float_images(val_x), _as_float_images(test_x)
    if binary:
      val_x = binarize(val_x, (int(eval_binarize_seed), _VAL_STREAM))
      test_x = binarize(test_x, (int(eval_binarize_seed), _TEST_STREAM))
  if max_train is not None:
    train_x = train_x[:max_train].copy()  # do not keep the full array alive
    train_y = train_y[:max_train] if train_y is not None else None
  if max_test is not None:
    val_x, test_x = val_x[:max_test].copy(), test_x[:max_test].copy()
    val_y = val_y[:max_test] if val_y is not None else None
    test_y = test_y[:max_test] if test_y is not None else None

  train_x = _as_float_images(train_x)
  train_x, val_x, test_x = (np.ascontiguousarray(a, np.float32) for a in (train_x, val_x, test_x))
  shape = train_x.shape[1:]
  validate_images(train_x, name=f"{name} train_x")
  validate_images(val_x, image_shape=shape, name=f"{name} val_x")
  validate_images(test_x, image_shape=shape, name=f"{name} test_x")
  as_labels = lambda a: None if a is None else np.ascontiguousarray(a, np.int32)  # noqa: E731
  return Splits(
    name=name,
    train_x=train_x,
    train_y=as_labels(train_y),
    val_x=val_x,
    val_y=as_labels(val_y),
    test_x=test_x,
    test_y=as_labels(test_y),
    binary=binary,
    source=source,
    identity=identity,
  )
