"""A researcher's own data set: ``--config.dataset=npz:PATH`` and ``MODULE:FUNCTION``.

Every file here is written by the test (tiny arrays exercise the readers, the
checks and the split rules); the end-to-end runs use scikit-learn's real digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT, load_config
from exvae import data, errors, plugins, rundir
from exvae.cli import exits
from exvae.config_checks import check_plugins
from exvae.data import DataFormatError, DataNotFoundError, user

PY = sys.executable
_RNG = np.random.default_rng(0)


def _u8(*shape):
  return _RNG.integers(0, 256, shape, dtype=np.uint8)


def _npz(path, **arrays):
  np.savez(str(path), **arrays)
  return str(path)


def _digits_uint8():
  from sklearn.datasets import load_digits

  d = load_digits()
  return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


# ----------------------------------------------------------------------------
# Loading: dtypes, ranks, splits, labels
# ----------------------------------------------------------------------------


def _as_float(x):
  """What the built-in sets make of stored images: uint8 / 255, bool and floats as float32."""
  x = x[..., None] if x.ndim == 3 else x
  return x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)


@pytest.mark.parametrize("kind", ["uint8_3d", "uint8_4d", "bool", "float32", "float64", "rgb"])
def test_each_dtype_and_rank_loads_as_the_built_in_sets_do(tmp_path, kind):
  shape = {"uint8_4d": (40, 5, 6, 1), "rgb": (40, 5, 6, 3)}.get(kind, (40, 5, 6))
  raw = _u8(*shape)
  stored = {
    "uint8_3d": raw,
    "uint8_4d": raw,
    "rgb": raw,
    "bool": raw > 127,
    "float32": (raw / 255.0).astype(np.float32),
    "float64": raw / 255.0,
  }[kind]
  test = stored[:7].copy()
  path = _npz(tmp_path / "d.npz", x_train=stored, x_test=test)
  s = data.load(f"npz:{path}", eval_binarize_seed=3)
  c = shape[3] if len(shape) == 4 else 1
  assert s.image_shape == (5, 6, c) and s.binary and s.train_y is None
  assert s.name == f"npz:{path}" and "mnist" not in s.name and s.source == f"npz:{path}"
  # Default validation: the last tenth of x_train; training images stay grey levels.
  np.testing.assert_array_equal(s.train_x, _as_float(stored[:36]))
  assert s.train_x.dtype == np.float32 and s.val_x.shape[0] == 4
  # Validation and test: binarised once, with the built-in sets' seeds and streams.
  np.testing.assert_array_equal(s.val_x, data.binarize(_as_float(stored[36:]), (3, 1)))
  np.testing.assert_array_equal(s.test_x, data.binarize(_as_float(test), (3, 2)))
  assert set(np.unique(s.test_x)) <= {0.0, 1.0}
  # A continuous likelihood keeps the grey levels of val and test.
  g = data.load(f"npz:{path}", likelihood="logistic")
  assert not g.binary
  np.testing.assert_array_equal(g.test_x, _as_float(test))
  np.testing.assert_array_equal(g.val_x, _as_float(stored[36:]))


def test_validation_split_default_explicit_and_given(tmp_path):
  x, y = _u8(50, 4, 4), np.arange(50) % 7
  xt, yt = _u8(9, 4, 4), np.arange(9) % 7
  path = _npz(tmp_path / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
  s = data.load(f"npz:{path}")
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (45, 5, 9)
  np.testing.assert_array_equal(s.train_y, y[:45])
  np.testing.assert_array_equal(s.val_y, y[45:])
  np.testing.assert_array_equal(s.test_y, yt)
  assert s.train_y.dtype == np.int32
  s = data.load(f"npz:{path}", val_size=12, max_train=20, max_test=3)
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (20, 3, 3)
  np.testing.assert_array_equal(s.train_x[..., 0], x[:20] / np.float32(255))
  np.testing.assert_array_equal(s.val_y, y[38:41])
  xv, yv = _u8(6, 4, 4), np.arange(6) % 7
  path = _npz(tmp_path / "b.npz", x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt)
  s = data.load(f"npz:{path}")
  assert (len(s.train_x), len(s.val_x)) == (50, 6) and s.test_y is None
  np.testing.assert_array_equal(s.val_x, data.binarize(_as_float(xv), (0, 1)))
  np.testing.assert_array_equal(s.val_y, yv)
  with pytest.raises(DataFormatError, match="has the key 'x_val', so val_size=5"):
    data.load(f"npz:{path}", val_size=5)


def test_built_in_names_and_defaults_are_unchanged():
  with pytest.raises(ValueError, match="unknown data set 'npzz'.*mnist.*npz:PATH"):
    data.load("npzz")
  assert not user.is_user_dataset("fashion_mnist") and user.is_user_dataset("npz:a.npz")
  assert user.is_user_dataset("my_pkg.data:load") and data.load("digits").identity is None


# ----------------------------------------------------------------------------
# Bad input: one line naming the file and the key
# ----------------------------------------------------------------------------


def _bad_cases(d):
  x, xt = _u8(20, 4, 4), _u8(5, 4, 4)
  nan = (x / 255.0).astype(np.float32)
  nan[3, 1, 2] = np.nan
  inf = xt / 255.0
  inf[0, 0, 0] = np.inf
  object_labels = np.empty(20, dtype=object)
  return {
    "missing_x_test": (dict(x_train=x), "x_test", "missing key"),
    "missing_x_train": (dict(x_test=xt), "x_train", "missing key"),
    "rank_2": (dict(x_train=x.reshape(20, 16), x_test=xt), "x_train", "shape (20, 16)"),
    "rank_5": (dict(x_train=x, x_test=xt[None, None]), "x_test", "expected images"),
    "nan": (dict(x_train=nan, x_test=xt), "x_train", "NaN or inf"),
    "inf": (dict(x_train=x, x_test=inf), "x_test", "NaN or inf"),
    "float_0_255": (dict(x_train=x.astype(np.float32), x_test=xt), "x_train", "outside [0, 1]"),
    "negative_float": (dict(x_train=x, x_test=-(xt / 255.0)), "x_test", "outside [0, 1]"),
    "int64_images": (dict(x_train=x.astype(np.int64), x_test=xt), "x_train", "dtype int64"),
    "empty_test": (dict(x_train=x, x_test=xt[:0]), "x_test", "is empty"),
    "empty_val": (dict(x_train=x, x_val=xt[:0], x_test=xt), "x_val", "is empty"),
    "label_length": (
      dict(x_train=x, y_train=np.arange(19), x_test=xt),
      "y_train",
      "19 labels for the 20 images",
    ),
    "label_rank": (
      dict(x_train=x, x_test=xt, y_test=np.zeros((5, 1), int)),
      "y_test",
      "expected labels (N,)",
    ),
    "label_float": (dict(x_train=x, x_test=xt, y_test=np.zeros(5)), "y_test", "float64"),
    "label_negative": (
      dict(x_train=x, x_test=xt, y_test=-np.ones(5, int)),
      "y_test",
      "negative label",
    ),
    "labels_without_images": (
      dict(x_train=x, x_test=xt, y_val=np.zeros(3, int)),
      "y_val",
      "without 'x_val'",
    ),
    "image_shapes_differ": (dict(x_train=x, x_test=_u8(5, 4, 5)), "x_test", "(4, 5, 1)"),
    "unknown_key": (dict(x_train=x, x_test=xt, x_valid=xt), "x_valid", "unknown key"),
    "object_array": (
      dict(x_train=x, x_test=xt, y_train=object_labels),
      "y_train",
      "Python objects",
    ),
  }


def _one_line_naming(e, *words):
  """The CLI's line for ``e``: one line, exit code 1, no type prefix, naming every word."""
  line = exits.one_line(e)
  assert "\n" not in str(e).strip() and exits.exit_code(e) == 1, (type(e), str(e))
  for w in words:
    assert w in line, (w, line)
  return line


@pytest.mark.parametrize("case", sorted(_bad_cases(None)))
def test_every_bad_array_is_one_line_naming_the_file_and_the_key(tmp_path, case):
  arrays, key, words = _bad_cases(tmp_path)[case]
  path = str(tmp_path / f"{case}.npz")
  np.savez(path, **arrays)
  with pytest.raises(DataFormatError) as e:
    data.load(f"npz:{path}")
  line = _one_line_naming(e.value, path, f"'{key}'", words)
  assert not line.startswith("DataFormatError")


def test_files_that_are_not_npz_archives(tmp_path):
  cases = {}
  (tmp_path / "text.npz").write_text("not an archive")
  cases["text.npz"] = "not a NumPy .npz file"
  np.save(str(tmp_path / "one.npy"), _u8(3, 4, 4))
  cases["one.npy"] = "single-array .npy file"
  import zipfile

  with zipfile.ZipFile(str(tmp_path / "stray.npz"), "w") as z:
    z.writestr("x_train.npy", b"garbage")
  cases["stray.npz"] = "key 'x_train' is not a NumPy array"
  os.mkdir(str(tmp_path / "dir.npz"))
  cases["dir.npz"] = "is a directory"
  for name, words in cases.items():
    path = str(tmp_path / name)
    with pytest.raises(DataFormatError) as e:
      data.load(f"npz:{path}")
    _one_line_naming(e.value, path, words)
  missing = str(tmp_path / "missing.npz")
  with pytest.raises(DataNotFoundError) as e:
    data.load(f"npz:{missing}")
  _one_line_naming(e.value, missing, "no such file")
  with pytest.raises(DataNotFoundError):  # the train command's check at start
    user.check_dataset(f"npz:{missing}")
  with pytest.raises(DataFormatError, match="needs the path"):
    data.load("npz:")


def test_config_mistakes_for_a_user_data_set_are_one_line(tmp_path):
  path = _npz(tmp_path / "a.npz", x_train=_u8(20, 4, 4), x_test=_u8(5, 4, 4))
  for kw, words in (
    ({"source": "sklearn"}, "data_source='sklearn'"),
    ({"eval_binarize": "reference"}, "eval_binarize='reference'"),
    ({"val_size": 20}, "val_size=20 leaves no training image"),
  ):
    with pytest.raises(ValueError) as e:
      data.load(f"npz:{path}", **kw)
    _one_line_naming(e.value, *words.split(" ... "))


def test_a_bad_file_stops_train_py_with_one_line(tmp_path):
  path = _npz(tmp_path / "f.npz", x_train=_u8(20, 4, 4).astype(np.float32), x_test=_u8(5, 4, 4))
  r = subprocess.run(
    [
      PY,
      os.path.join(ROOT, "train.py"),
      "--config=test",
      f"--workdir={tmp_path / 'run'}",
      "--config.data_source=auto",
      "--config.dataset=npz:f.npz",
    ],
    capture_output=True,
    text=True,
    cwd=str(tmp_path),
    timeout=300,
  )
  lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("WARNING:absl")]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
  assert lines[0].startswith(f"exvae-train: error: {path}: key 'x_train' has floats outside")
  assert not os.path.exists(tmp_path / "run" / "config.json")


# ----------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------


def test_identity_follows_the_arrays_not_the_file(tmp_path):
  x, xt = _u8(20, 4, 4), _u8(5, 4, 4)
  a = _npz(tmp_path / "a.npz", x_train=x, x_test=xt)
  np.savez_compressed(str(tmp_path / "b.npz"), x_test=xt, x_train=x)  # other bytes, same arrays
  ia, ib = (data.load(f"npz:{p}").identity for p in (a, str(tmp_path / "b.npz")))
  assert ia["path"] == a and ia["sha256"] == ib["sha256"] and len(ia["sha256"]) == 64
  changed = x.copy()
  changed[0, 0, 0] ^= 1  # one pixel
  for arrays in (
    dict(x_train=changed, x_test=xt),
    dict(x_train=x, x_test=xt, y_test=np.arange(5)),
    dict(x_train=x.reshape(20, 4, 4, 1), x_test=xt),
    dict(x_train=(x / 255.0), x_test=xt),
  ):
    np.savez(a, **arrays)
    assert data.load(f"npz:{a}").identity["sha256"] != ib["sha256"], sorted(arrays)


def test_rundir_records_the_data_and_refuses_other_arrays(tmp_path, capsys):
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  ident = {"path": "/d/a.npz", "sha256": "a" * 64}
  rundir.check_data_identity(wd, ident, resuming=False)
  with open(os.path.join(wd, rundir.DATA_FILE)) as f:
    assert json.load(f) == ident
  rundir.check_data_identity(wd, dict(ident), resuming=True)  # the same data: fine
  rundir.check_reader_data(wd, dict(ident))
  other = dict(ident, sha256="b" * 64)
  with pytest.raises(errors.ConfigDriftError) as e:
    rundir.check_data_identity(wd, other, resuming=True)
  _one_line_naming(
    e.value,
    "/d/a.npz holds other arrays",
    "aaaaaaaaaaaa then, bbbbbbbbbbbb now",
    "--allow_config_change",
  )
  with pytest.raises(errors.ConfigDriftError) as e:
    rundir.check_reader_data(wd, other)
  _one_line_naming(e.value, "Reading", "/d/a.npz holds other arrays")
  with pytest.raises(errors.ConfigDriftError, match="names a built-in data set"):
    rundir.check_reader_data(wd, None)
  assert not os.path.exists(os.path.join(wd, rundir.CHANGES_FILE))
  rundir.check_data_identity(wd, other, resuming=True, allow_change=True)
  with open(os.path.join(wd, rundir.DATA_FILE)) as f:
    assert json.load(f) == other
  with open(os.path.join(wd, rundir.CHANGES_FILE)) as f:
    assert json.loads(f.read())["changes"]["data"] == [ident, other]
  rundir.check_reader_data(str(tmp_path), None)  # a run without a record: nothing to check


# ----------------------------------------------------------------------------
# Plug-ins
# ----------------------------------------------------------------------------

_PLUGIN = '''
import numpy as np

def load():
  r = np.random.default_rng(1)
  return {"x_train": r.random((30, 3, 3)), "x_test": r.random((4, 3, 3)),
          "y_train": np.arange(30) % 2}

def broken():
  raise RuntimeError("no data here")

def not_a_dict():
  return [1, 2]

def bad_key():
  return {"x_train": np.zeros((3, 2, 2)), "x_test": np.zeros((1, 2, 2)) + 2}

NOT_CALLABLE = 3
'''


def test_a_plugin_data_set_is_loaded_checked_and_identified(tmp_path):
  f = tmp_path / "my_data.py"
  f.write_text(_PLUGIN)
  spec = f"{f}:load"
  user.check_dataset(spec)
  s = data.load(spec)
  r = np.random.default_rng(1)
  xtr, xte = r.random((30, 3, 3)), r.random((4, 3, 3))
  np.testing.assert_array_equal(s.train_x[..., 0], xtr[:27].astype(np.float32))
  np.testing.assert_array_equal(s.test_x, data.binarize(xte[..., None].astype(np.float32), (0, 2)))
  np.testing.assert_array_equal(s.val_y, [1, 0, 1])
  assert s.name == spec and s.identity["plugin"] == spec
  assert s.identity["sha256"] == user.arrays_sha256(
    {"x_train": xtr, "x_test": xte, "y_train": np.arange(30) % 2}
  )
  cases = {
    "broken": (plugins.PluginError, "raised RuntimeError: no data here"),
    "not_a_dict": (DataFormatError, "returned a list"),
    "bad_key": (DataFormatError, "key 'x_test' has floats outside [0, 1]"),
    "nothing": (ValueError, "has no attribute 'nothing'"),
  }
  for fn, (err, words) in cases.items():
    with pytest.raises(err) as e:
      data.load(f"{f}:{fn}")
    assert words in exits.one_line(e.value) and f"{f}:{fn}" in str(e.value), str(e.value)
  with pytest.raises(plugins.PluginError, match="not a function"):
    user.check_dataset(f"{f}:NOT_CALLABLE")
  with pytest.raises(ValueError, match="has no attribute"):
    check_plugins(load_config("test", dataset=f"{f}:nothing"))


def test_labels_are_needed_for_knn_and_augmentation(tmp_path):
  from exvae.uses import classifier, knn

  path = _npz(tmp_path / "n.npz", x_train=_u8(20, 4, 4), x_test=_u8(5, 4, 4))
  s = data.load(f"npz:{path}")
  with pytest.raises(ValueError) as e:
    knn.evaluate_knn(types.SimpleNamespace(splits=s))
  _one_line_naming(e.value, "kNN classification needs labels", path, "y_train, y_val, y_test")
  with pytest.raises(ValueError) as e:
    classifier.grey_splits(load_config("test", dataset=f"npz:{path}"), s)
  _one_line_naming(e.value, "needs labels", "y_train")


def test_grey_levels_for_the_classifier_come_from_the_same_file(tmp_path):
  from exvae.uses import classifier

  x, y = _u8(30, 4, 4), np.arange(30) % 3
  path = _npz(
    tmp_path / "l.npz", x_train=x, y_train=y, x_test=_u8(6, 4, 4), y_test=np.arange(6) % 3
  )
  c = load_config("test", dataset=f"npz:{path}", data_source="auto", val_size=5)
  s = data.load(f"npz:{path}", val_size=5)
  g = classifier.grey_splits(c, s)
  assert g.grey_eval
  np.testing.assert_array_equal(g.val_x[..., 0], x[25:] / np.float32(255))
  np.testing.assert_array_equal(g.val_y, y[25:])


# ----------------------------------------------------------------------------
# Training and evaluation on an npz file
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "prior, extra",
  [
    pytest.param("gaussian", {}, marks=pytest.mark.slow),
    pytest.param("vampprior", {}, marks=pytest.mark.slow),
    pytest.param("exemplar", {}, marks=pytest.mark.slow),
    pytest.param("exemplar", {"exemplar.rat": True}, marks=pytest.mark.slow),
  ],
  ids=["gaussian", "vampprior", "exemplar", "rat"],
)
def test_every_prior_trains_on_an_npz(tmp_path, prior, extra):
  from conftest import run_train_steps

  x, _ = _digits_uint8()
  path = _npz(tmp_path / "d.npz", x_train=x[:300], x_test=x[300:340])
  c = load_config("test", dataset=f"npz:{path}", data_source="auto", prior=prior, **extra)
  _, losses = run_train_steps(c, 1, steps=3)
  assert len(losses) == 3 and all(np.isfinite(losses)), losses


@pytest.mark.slow
def test_train_eval_on_an_npz_and_a_changed_file_is_refused(tmp_path):
  from exvae import eval_lib, train_lib

  x, y = _digits_uint8()
  path = _npz(
    tmp_path / "d.npz", x_train=x[:400], y_train=y[:400], x_test=x[400:460], y_test=y[400:460]
  )
  wd = str(tmp_path / "run")
  c = load_config("test", dataset=f"npz:{path}", data_source="auto", max_steps=20)
  summary = train_lib.train_and_evaluate(c, wd)
  ident = {"path": path, "sha256": user.arrays_sha256(dict(np.load(path)))}
  assert summary["data_identity"] == ident and summary["dataset"] == f"npz:{path}"
  m = eval_lib.evaluate(c, wd)
  assert np.isfinite(m["test_nll"]) and m["data_identity"] == ident
  assert m["dataset"] == f"npz:{path}" and "mnist" not in json.dumps(m)
  with np.load(os.path.join(wd, "per_example.npz")) as z:
    assert str(z["data_sha256"]) == ident["sha256"] and str(z["dataset"]) == f"npz:{path}"
  x2 = x[:400].copy()
  x2[5, 3, 3] = 255 - x2[5, 3, 3]
  _npz(path, x_train=x2, y_train=y[:400], x_test=x[400:460], y_test=y[400:460])
  with pytest.raises(errors.ConfigDriftError, match="holds other arrays"):
    eval_lib.evaluate(c, wd)
  c2 = load_config("test", dataset=f"npz:{path}", data_source="auto", max_steps=30)
  with pytest.raises(errors.ConfigDriftError, match="Resuming .* on other data"):
    train_lib.train_and_evaluate(c2, wd)
  with open(os.path.join(wd, rundir.DATA_FILE)) as f:  # the refused resume changed nothing
    assert json.load(f) == ident


# ----------------------------------------------------------------------------
# docs/data.md: the example runs as it stands
# ----------------------------------------------------------------------------


def doc_example(page: str = os.path.join(ROOT, "docs", "data.md")) -> str:
  """The bash block of the page's example section, verbatim."""
  import re

  with open(page) as f:
    text = f.read()
  section = text[text.index("## Example:") :]
  return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def _shims(bin_dir) -> dict:
  """An environment whose PATH has ``python`` and the console scripts of this checkout."""
  os.makedirs(bin_dir, exist_ok=True)
  for name, target in (
    ("python", None),
    ("exvae-train", "train.py"),
    ("exvae-eval", "eval.py"),
    ("exvae-compare", "compare.py"),
    ("exvae-uses", "uses.py"),
  ):
    path = os.path.join(bin_dir, name)
    script = "" if target is None else f" {os.path.join(ROOT, target)}"
    with open(path, "w") as f:
      f.write(f'#!/bin/sh\nexec {PY}{script} "$@"\n')
    os.chmod(path, 0o755)
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", CI="1")


@pytest.mark.slow
def test_the_docs_example_runs_verbatim(tmp_path):
  block = doc_example()
  assert "npz:digits.npz" in block and "exvae-compare" in block
  env = _shims(str(tmp_path / "bin"))
  os.makedirs(tmp_path / ".venv" / "bin")
  os.symlink(tmp_path / "bin" / "python", tmp_path / ".venv" / "bin" / "python")
  r = subprocess.run(
    ["bash", "-e", "-c", block],
    cwd=str(tmp_path / "bin" / ".."),
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  x = np.load(str(tmp_path / "digits.npz"))
  sha = user.arrays_sha256(dict(x))
  for run in ("digits_gaussian", "digits_exemplar"):
    with open(tmp_path / "runs" / run / "eval_metrics.json") as f:
      m = json.load(f)
    assert m["num_test_examples"] == 297 and np.isfinite(m["test_nll"])
    assert m["data_identity"] == {"path": str(tmp_path / "digits.npz"), "sha256": sha}
  assert "runs/digits_exemplar" in r.stdout and "runs/digits_gaussian" in r.stdout, r.stdout


def test_the_example_plugin_gives_the_digits():
  spec = os.path.join(ROOT, "examples", "digits_dataset.py") + ":load"
  s = data.load(spec)
  x, y = _digits_uint8()
  assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (1350, 150, 297)
  np.testing.assert_array_equal(s.train_x[..., 0], x[:1350] / np.float32(255))
  np.testing.assert_array_equal(s.test_y, y[1500:])
