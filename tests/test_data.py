"""Tests for exvae.data: IDX reader, tfds path, digits, omniglot reader, errors.

The genuine Fashion-MNIST tests need the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist) and are skipped without it. Every other
test builds its own tiny files; synthetic files only exercise the readers and
the split logic, they are never used as data.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from exvae import data
from exvae.data import DataNotFoundError, IdxFormatError, binarize, load, read_idx, validate_images

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_NAMES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path: str, arr: np.ndarray, *, gz: bool = False) -> str:
  """Writes ``arr`` as an IDX file (gzip-compressed when ``gz``)."""
  arr = np.asarray(arr)
  header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
  if gz:
    path += ".gz"
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)
  return path


# --------------------------------------------------------------------------
# Genuine Fashion-MNIST (IDX files from the Debian package)
# --------------------------------------------------------------------------

needs_fashion = pytest.mark.skipif(
  not all(os.path.exists(os.path.join(FASHION_DIR, n + ".gz")) for n in IDX_NAMES),
  reason=f"genuine Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fashion():
  return load("fashion_mnist")


@needs_fashion
def test_fashion_counts_shapes_and_statistics(fashion):
  s = fashion
  assert s.name == "fashion_mnist" and s.binary
  assert FASHION_DIR in s.source
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (50000, 10000, 10000)
  assert s.image_shape == (28, 28, 1)
  for x in (s.train_x, s.val_x, s.test_x):
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
  assert s.train_y.dtype == np.int32 and s.train_y.shape == (50000,)
  assert s.val_y.shape == (10000,) and s.test_y.shape == (10000,)
  full_y = np.concatenate([s.train_y, s.val_y])
  np.testing.assert_array_equal(np.bincount(full_y, minlength=10), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(s.test_y, minlength=10), np.full(10, 1000))
  # Train holds grey levels: mean of the 60000 official training images is 0.2860.
  n_tr, n_va = len(s.train_x), len(s.val_x)
  raw = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
  assert raw.shape == (60000, 28, 28) and raw.dtype == np.uint8
  assert round(float(raw.mean()) / 255.0, 3) == 0.286
  np.testing.assert_array_equal(s.train_x[..., 0], raw[:n_tr] / np.float32(255))
  assert 0.0 <= s.train_x.min() and s.train_x.max() <= 1.0
  assert len(np.unique(s.train_x[:100])) > 100  # many grey levels, not binary
  # Val / test are binarised once: values in {0, 1} with about the grey-level mean.
  for x in (s.val_x, s.test_x):
    assert set(np.unique(x).tolist()) == {0.0, 1.0}
  val_grey = raw[n_tr : n_tr + n_va].mean() / 255.0
  assert abs(float(s.val_x.mean()) - val_grey) < 0.005


@needs_fashion
def test_fashion_eval_binarisation_fixed_across_loads(fashion):
  again = load("fashion_mnist", max_train=10, max_test=1000)
  np.testing.assert_array_equal(again.val_x, fashion.val_x[:1000])
  np.testing.assert_array_equal(again.test_x, fashion.test_x[:1000])
  np.testing.assert_array_equal(again.val_y, fashion.val_y[:1000])
  assert len(again.train_x) == 10 and len(again.val_x) == len(again.test_x) == 1000
  other = load("fashion_mnist", eval_binarize_seed=1, max_train=10, max_test=1000)
  assert (other.val_x != again.val_x).any()
  assert (other.test_x != again.test_x).any()


@needs_fashion
def test_fashion_val_size_and_idx_source():
  s = load("fashion_mnist", source="idx", data_dir=FASHION_DIR, val_size=5000, max_test=10)
  assert len(s.train_x) == 55000 and len(s.val_x) == 10 and len(s.test_x) == 10


# --------------------------------------------------------------------------
# binarize / validate_images
# --------------------------------------------------------------------------


def test_binarize_deterministic_and_seed_dependent():
  p = np.random.default_rng(3).random((200, 8, 8, 1)).astype(np.float32)
  a, b, c = binarize(p, 0), binarize(p, 0), binarize(p, 1)
  assert a.dtype == np.float32 and a.shape == p.shape
  assert set(np.unique(a).tolist()) <= {0.0, 1.0}
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert abs(float(a.mean()) - float(p.mean())) < 0.02
  assert binarize(np.zeros((3, 2, 2, 1)), 0).sum() == 0
  assert binarize(np.ones((3, 2, 2, 1)), 0).min() == 1


def test_validate_images_errors():
  ok = np.full((2, 4, 4, 1), 0.5, np.float32)
  validate_images(ok, image_shape=(4, 4, 1))
  with pytest.raises(ValueError, match="4-D"):
    validate_images(ok[..., 0])
  with pytest.raises(ValueError, match=r"\(4, 4, 1\).*\(2, 4, 4, 1\)|shape"):
    validate_images(ok, image_shape=(5, 5, 1), name="val_x")
  with pytest.raises(ValueError, match=r"val_x.*\[0, 1\].*max=255.*255"):
    validate_images(ok * 510, name="val_x")
  with pytest.raises(ValueError, match=r"min=-0\.5"):
    validate_images(ok - 1)
  bad = ok.copy()
  bad[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"non-finite.*\(1, 2, 3, 0\)"):
    validate_images(bad)
  with pytest.raises(ValueError, match="numpy array"):
    validate_images([[0.5]])


def test_unknown_name_and_bad_source():
  with pytest.raises(ValueError, match="mnist.*fashion_mnist.*digits.*omniglot"):
    load("cifar10")
  with pytest.raises(ValueError, match="bad source 'csv'.*auto"):
    load("mnist", source="csv")
  with pytest.raises(ValueError, match="bad source"):
    load("digits", source="tfds")
  with pytest.raises(ValueError, match="max_train"):
    load("digits", max_train=0)


# --------------------------------------------------------------------------
# IDX reader edge cases on small files written here
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  imgs = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
  p = write_idx(str(tmp_path / "imgs"), imgs, gz=gz)
  out = read_idx(p)
  assert out.dtype == np.uint8 and out.shape == (5, 3, 4)
  np.testing.assert_array_equal(out, imgs)
  ints = np.array([-3, 0, 70000], np.int32)
  out = read_idx(write_idx(str(tmp_path / "ints"), ints, gz=gz))
  np.testing.assert_array_equal(out, ints)
  assert out.dtype.isnative


def test_read_idx_wrong_magic(tmp_path):
  p = tmp_path / "bad"
  p.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 12)
  with pytest.raises(IdxFormatError, match="magic"):
    read_idx(p)
  p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")  # unknown type code
  with pytest.raises(ValueError, match="magic"):
    read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
  imgs = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
  p = write_idx(str(tmp_path / "t"), imgs, gz=gz)
  if gz:  # cut the compressed stream
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(IdxFormatError, match="truncated"):
      read_idx(p)
    return
  raw = open(p, "rb").read()
  open(p, "wb").write(raw[:-10])
  with pytest.raises(IdxFormatError, match=r"truncated.*\(2, 28, 28\).*1558 bytes"):
    read_idx(p)
  open(p, "wb").write(raw[:10])  # header itself cut
  with pytest.raises(IdxFormatError, match="header"):
    read_idx(p)
  open(p, "wb").write(raw + b"\x00")
  with pytest.raises(IdxFormatError, match="corrupt"):
    read_idx(p)


def _fake_mnist_dir(root, n_train=30, n_test=8, gz=True):
  """Synthetic IDX files (for split logic only): image i is filled with i."""
  os.makedirs(root, exist_ok=True)
  tr = np.repeat(np.arange(n_train, dtype=np.uint8), 28 * 28).reshape(n_train, 28, 28)
  te = np.repeat(np.arange(n_test, dtype=np.uint8) + 100, 28 * 28).reshape(n_test, 28, 28)
  write_idx(os.path.join(root, IDX_NAMES[0]), tr, gz=gz)
  write_idx(os.path.join(root, IDX_NAMES[1]), (np.arange(n_train) % 10).astype(np.uint8), gz=gz)
  write_idx(os.path.join(root, IDX_NAMES[2]), te, gz=gz)
  write_idx(os.path.join(root, IDX_NAMES[3]), (np.arange(n_test) % 10).astype(np.uint8), gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_split_logic_on_synthetic_files(tmp_path, gz):
  _fake_mnist_dir(str(tmp_path / "MNIST" / "raw"), gz=gz)  # torchvision layout
  with pytest.warns(UserWarning, match="do not look like the genuine mnist"):
    s = load("mnist", data_dir=str(tmp_path), source="auto", val_size=10, max_test=5)
  assert s.source == "idx:" + str(tmp_path / "MNIST" / "raw")
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (20, 5, 5)
  # first 20 = train, last 10 = validation, in file order
  np.testing.assert_allclose(s.train_x[:, 0, 0, 0] * 255, np.arange(20), atol=1e-4)
  np.testing.assert_array_equal(s.train_y, np.arange(20) % 10)
  np.testing.assert_array_equal(s.val_y, np.arange(20, 25) % 10)
  with pytest.warns(UserWarning):
    with pytest.raises(ValueError, match="val_size"):
      load("mnist", data_dir=str(tmp_path), val_size=30)


def test_reference_binarisation_replays_the_authors_draw(tmp_path):
  root = str(tmp_path / "MNIST" / "raw")
  os.makedirs(root)
  rng = np.random.default_rng(5)
  tr = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
  te = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
  for name, arr in zip(IDX_NAMES, (tr, np.zeros(30, np.uint8), te, np.zeros(8, np.uint8))):
    write_idx(os.path.join(root, name), arr)
  with pytest.warns(UserWarning):
    s = load("mnist", data_dir=str(tmp_path), val_size=10, eval_binarize="reference")
  # The authors' code (base_load_data.py): x / 255. in float64, flattened, then
  # np.random.seed(777); binomial(1, x_val); binomial(1, x_test).
  saved = np.random.get_state()
  try:
    np.random.seed(777)
    want_val = np.random.binomial(1, tr[20:].reshape(10, -1) / 255.0)
    want_test = np.random.binomial(1, te.reshape(8, -1) / 255.0)
  finally:
    np.random.set_state(saved)
  np.testing.assert_array_equal(s.val_x.reshape(10, -1), want_val)
  np.testing.assert_array_equal(s.test_x.reshape(8, -1), want_test)
  assert s.val_x.dtype == np.float32 and s.test_x.shape == (8, 28, 28, 1)
  with pytest.warns(UserWarning):  # the truncated sets are prefixes of the full draw
    short = load(
      "mnist", data_dir=str(tmp_path), val_size=10, max_test=3, eval_binarize="reference"
    )
  np.testing.assert_array_equal(short.test_x, s.test_x[:3])
  with pytest.warns(UserWarning):  # exvae's own draw is another one
    own = load("mnist", data_dir=str(tmp_path), val_size=10)
  assert not np.array_equal(own.test_x, s.test_x)
  with pytest.raises(ValueError, match="eval_binarize must be"):
    load("mnist", data_dir=str(tmp_path), eval_binarize="777")
  with pytest.raises(ValueError, match="mnist and fashion_mnist only"):
    load("digits", eval_binarize="reference")


# --------------------------------------------------------------------------
# Missing data
# --------------------------------------------------------------------------


def test_missing_mnist_message(tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(DataNotFoundError) as ei:
    load("mnist", data_dir=empty, source="auto")
  msg = str(ei.value)
  assert isinstance(ei.value, FileNotFoundError)
  for n in IDX_NAMES:
    assert n in msg
  assert empty in msg and "data_dir" in msg and "tfds build mnist" in msg
  with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
    load("fashion_mnist", data_dir=empty, source="idx")


def test_missing_tfds_data(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataNotFoundError, match=r"(?s)tfds.*array_record.*data_dir"):
    load("mnist", data_dir=str(tmp_path), source="tfds")
  assert os.listdir(tmp_path) == []  # nothing downloaded or created


@pytest.mark.parametrize("name", ["mnist", "celeba"])
def test_an_unprepared_tfds_set_is_a_short_first_line_and_no_tfds_warnings(tmp_path, capfd, name):
  """The first line names the set and the directory; tfds' own warnings and its exception come
  after it, never before (the CLI prints the first line after its prefix)."""
  pytest.importorskip("tensorflow_datasets")
  (tmp_path / ("celeb_a" if name == "celeba" else name) / "9.9.9").mkdir(
    parents=True
  )  # a bare folder
  with pytest.raises(DataNotFoundError) as e:
    if name == "celeba":
      from exvae.data.celeba import load_celeba

      load_celeba(str(tmp_path))
    else:
      load(name, data_dir=str(tmp_path), source="tfds")
  first, *rest = str(e.value).splitlines()
  assert first.startswith(f"{name}: data not found: tfds data set") and len(first) < 160, first
  assert str(tmp_path) in first and "tfds build" in "\n".join(rest)
  assert "Variant folder" not in capfd.readouterr().err


# --------------------------------------------------------------------------
# tfds path
# --------------------------------------------------------------------------


def test_tfds_mock_end_to_end(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    s = load("mnist", data_dir=str(tmp_path), source="tfds", val_size=8)
  assert s.source.startswith("tfds:mnist@")
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (32, 8, 40)
  assert s.image_shape == (28, 28, 1) and s.train_x.dtype == np.float32
  assert 0.0 <= s.train_x.min() and s.train_x.max() <= 1.0
  assert len(np.unique(s.train_x)) > 2
  assert set(np.unique(s.val_x).tolist()) == {0.0, 1.0}
  assert s.train_y.dtype == np.int32 and s.train_y.max() < 10


def test_tfds_batched_read_of_real_array_record(tmp_path):
  """The fast path (``__getitems__``) on a genuine array_record data source
  (a tiny builder with synthetic images; mock data sources lack it)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from exvae.data import tfds_source

  class TinyImgs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((28, 28, 1), i, np.uint8), "label": i % 10}

  builder = TinyImgs(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  old = tfds_source._BATCH
  tfds_source._BATCH = 7  # several batches, the last one partial
  try:
    x, y = tfds_source._to_arrays(builder.as_data_source(split="train"))
  finally:
    tfds_source._BATCH = old
  assert x.shape == (30, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
  np.testing.assert_array_equal(y, x[:, 0, 0, 0] % 10)
  assert sorted(x[:, 0, 0, 0].tolist()) == list(range(30))
  assert tfds_source.tfds_prepared_dir("mnist", str(tmp_path)) is None


# --------------------------------------------------------------------------
# digits (real data shipped with scikit-learn)
# --------------------------------------------------------------------------


def test_digits():
  from sklearn.datasets import load_digits

  s = load("digits")
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (1297, 200, 300)
  assert s.image_shape == (8, 8, 1) and s.binary and s.source.startswith("sklearn")
  d = load_digits()
  assert d.images[0].sum() == 294.0  # the genuine first digit (a zero)
  perm = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(s.train_x[0, ..., 0] * 16, d.images[perm[500]])
  assert s.train_x[0].sum() == pytest.approx(d.images[perm[500]].sum() / 16)
  assert s.train_y[0] == d.target[perm[500]]
  np.testing.assert_array_equal(s.test_y, d.target[perm[:300]])
  assert 0.0 <= s.train_x.min() and s.train_x.max() == 1.0
  assert set(np.unique(s.test_x).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(load("digits").val_x, s.val_x)
  small = load("digits", val_size=100, max_train=50, max_test=20)
  assert (len(small.train_x), len(small.val_x), len(small.test_x)) == (50, 20, 20)


# --------------------------------------------------------------------------
# omniglot chardata.mat reader (synthetic tiny .mat)
# --------------------------------------------------------------------------


def _write_chardata(path, n_train=40, n_test=6):
  import scipy.io

  rng = np.random.default_rng(1)
  tr = (rng.random((n_train, 28, 28)) < 0.3).astype(np.float64)
  te = (rng.random((n_test, 28, 28)) < 0.3).astype(np.float64)
  te[0] = 0
  te[0, 0, 5] = 1  # one asymmetric pixel: row 0, column 5
  # one image per column, each flattened in Fortran order
  cols = lambda imgs: imgs.reshape(len(imgs), 784, order="F").T  # noqa: E731
  onehot = lambda n: np.eye(50)[np.arange(n) % 50].T  # noqa: E731
  scipy.io.savemat(
    path,
    {
      "data": cols(tr),
      "testdata": cols(te),
      "target": onehot(n_train),
      "testtarget": onehot(n_test),
    },
  )
  return tr, te


def test_omniglot_reader_and_splits(tmp_path):
  from exvae.data.omniglot import read_chardata

  tr, te = _write_chardata(str(tmp_path / "chardata.mat"))
  xtr, ytr, xte, yte = read_chardata(str(tmp_path / "chardata.mat"))
  assert xtr.shape == (40, 28, 28, 1) and xtr.dtype == np.float32
  np.testing.assert_array_equal(xtr[..., 0], tr)
  np.testing.assert_array_equal(xte[..., 0], te)
  assert xte[0, 0, 5, 0] == 1 and xte[0, 5, 0, 0] == 0
  np.testing.assert_array_equal(ytr, np.arange(40) % 50)

  s = load("omniglot", data_dir=str(tmp_path), val_size=10)
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (30, 10, 6)
  assert s.image_shape == (28, 28, 1) and s.binary
  np.testing.assert_array_equal(s.test_x[..., 0], te)  # binary images: binarisation is identity
  # train + val is a (fixed) permutation of the file's training images
  both = np.concatenate([s.train_x, s.val_x])[..., 0]
  key = lambda a: sorted(map(bytes, np.packbits(a.astype(bool), axis=-1).reshape(len(a), -1)))  # noqa: E731
  assert key(both) == key(tr)
  np.testing.assert_array_equal(
    load("omniglot", data_dir=str(tmp_path), val_size=10).train_x, s.train_x
  )
  with pytest.raises(ValueError, match="val_size"):
    load("omniglot", data_dir=str(tmp_path))  # genuine size expected by default


def test_omniglot_missing(tmp_path):
  with pytest.raises(DataNotFoundError) as ei:
    load("omniglot", data_dir=str(tmp_path))
  msg = str(ei.value)
  assert "chardata.mat" in msg and "data_dir" in msg and "yburda/iwae" in msg
  with pytest.raises(DataNotFoundError, match="chardata.mat"):
    load("omniglot")


def test_public_api():
  for n in ("DataNotFoundError", "Splits", "load", "binarize", "validate_images"):
    assert hasattr(data, n)
  assert issubclass(DataNotFoundError, FileNotFoundError)
