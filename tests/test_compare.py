"""Per-example eval outputs (per_example.npz) and the paired comparison (exvae compare)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT, load_config
from exvae import compare, eval_lib, per_example, train_lib


def _identity(count, digest="d" * 64, **kw):
  return dict(
    dict(dataset="digits", split="test", eval_binarize_seed=0, count=count, images_sha256=digest),
    **kw,
  )


def _write(path, log_px, elbo=None, **identity_kw):
  log_px = np.asarray(log_px)
  return per_example.save(
    str(path),
    {"log_px": log_px, "elbo": log_px - 1.0 if elbo is None else elbo},
    _identity(log_px.shape[0], **identity_kw),
    {"prior": "x"},
  )


@pytest.mark.parametrize("n,shift", [(5, 0.3), (200, 0.05), (10000, -0.01)])
def test_paired_stats_match_scipy(n, shift):
  rng = np.random.default_rng(n)
  hard = rng.gamma(2.0, 30.0, n)  # shared per-image difficulty
  a = hard + rng.normal(0, 0.5, n)
  b = hard + shift + rng.normal(0, 0.5, n)
  s = compare.paired_stats(a, b)
  ref = stats.ttest_rel(a, b)
  np.testing.assert_allclose(s["t"], ref.statistic, rtol=1e-10)
  np.testing.assert_allclose(s["p_value"], ref.pvalue, rtol=1e-8, atol=1e-300)
  np.testing.assert_allclose(s["mean_diff"], np.mean(a - b), rtol=1e-12)
  np.testing.assert_allclose(s["stderr"], stats.sem(a - b), rtol=1e-10)
  assert s["df"] == n - 1 and s["n"] == n
  assert s["a_wins"] == np.mean(a < b) and s["b_wins"] == np.mean(a > b)
  np.testing.assert_allclose(s["a_wins"] + s["b_wins"] + s["ties"], 1.0)


def test_paired_stats_edge_cases_and_holm():
  a = np.array([1.0, 2.0, 3.0])
  s = compare.paired_stats(a, a)
  assert s["p_value"] == 1.0 and s["ties"] == 1.0 and s["mean_diff"] == 0.0
  s = compare.paired_stats(a, a + 1.0)  # constant difference: certain
  assert s["p_value"] == 0.0 and s["a_wins"] == 1.0
  with pytest.raises(ValueError, match="differ in length"):
    compare.paired_stats(a, a[:2])
  # Holm: p sorted (0.01, 0.02, 0.04) with m = 3 -> (0.03, 0.04, 0.04), monotone, capped at 1.
  np.testing.assert_allclose(compare.holm([0.04, 0.01, 0.02]), [0.04, 0.03, 0.04])
  np.testing.assert_allclose(compare.holm([0.9, 0.5]), [1.0, 1.0])
  # A p-value below float64's range underflows to 0; it prints as a bound, not as 0.
  rng = np.random.default_rng(1)
  x = rng.normal(size=10000)
  s = compare.paired_stats(x, x + 1.0 + 0.02 * rng.normal(size=10000))
  assert s["p_value"] == 0.0 and abs(s["t"]) > 1000
  assert compare.format_p(s["p_value"]) == "< 1e-300"
  assert compare.format_p(0.012345) == "= 0.0123" and compare.format_p(0.012345, 2) == "= 0.012"


def test_compare_cli_on_known_arrays(tmp_path):
  rng = np.random.default_rng(0)
  base = -rng.gamma(2.0, 30.0, 500)
  runs = {"good": base + 0.2 + rng.normal(0, 0.3, 500), "bad": base, "same": base.copy()}
  for name, lp in runs.items():
    _write(tmp_path / "results" / name / per_example.FILENAME, lp)
  dirs = [str(tmp_path / "results" / n) for n in ("good", "bad", "same")]
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "compare.py"),
      *dirs,
      "--plot",
      f"--out={tmp_path / 'cmp.png'}",
      f"--json={tmp_path / 'cmp.json'}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=str(tmp_path),
  )
  assert out.returncode == 0, out.stderr
  ref = stats.ttest_rel(-runs["good"], -runs["bad"])
  line = [l for l in out.stdout.splitlines() if l.strip().startswith("good vs bad")][0]
  assert f"t = {ref.statistic:.2f}" in line and f"p = {ref.pvalue:.3g} (Holm " in line
  assert f"diff {np.mean(runs['bad'] - runs['good']):+.4f}" in line
  assert f"A wins {100 * np.mean(runs['good'] > runs['bad']):.1f}%" in line
  assert "bad vs same" in out.stdout and "ties 100.0%" in out.stdout
  assert os.path.getsize(tmp_path / "cmp.png") > 1000
  import json

  saved = json.load(open(tmp_path / "cmp.json"))
  assert len(saved["pairs"]) == 3 and saved["identity"]["count"] == 500
  # Different images are refused, with a one-line reason naming the field.
  _write(tmp_path / "other" / per_example.FILENAME, base, digest="e" * 64)
  bad = subprocess.run(
    [sys.executable, os.path.join(ROOT, "compare.py"), dirs[0], str(tmp_path / "other")],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2 and "images_sha256" in bad.stderr
  assert "Traceback" not in bad.stderr
  with pytest.raises(FileNotFoundError, match="evaluate it first"):
    compare.compare([dirs[0], str(tmp_path)])


@pytest.mark.slow
def test_eval_writes_per_example_scores_with_the_test_set_identity(tmp_path):
  c = load_config("test", max_steps=10)
  wd = str(tmp_path / "run")
  train_lib.train_and_evaluate(c, wd)
  m = eval_lib.evaluate(c, wd)
  rec = per_example.load(wd)
  assert rec["path"] == m["per_example"] == os.path.join(wd, per_example.FILENAME)
  for k in per_example.SCORES:
    assert rec[k].dtype == np.float32 and rec[k].shape == (40,)
  np.testing.assert_allclose(-rec["log_px"].mean(), m["test_nll"], rtol=1e-5)
  np.testing.assert_allclose(-rec["elbo"].mean(), m["test_elbo"], rtol=1e-5)
  np.testing.assert_allclose(rec["recon"] + rec["kl"], -rec["elbo"], rtol=1e-4, atol=1e-3)
  assert np.all(rec["log_px"] >= rec["elbo"] - 1e-4)
  splits = train_lib.load_data(c)
  assert per_example.identity(rec) == {
    "dataset": "digits",
    "split": "test",
    "eval_binarize_seed": 0,
    "count": 40,
    "images_sha256": per_example.images_digest(splits.test_x[:40]),
  }
  assert rec["num_importance_samples"] == 16 and rec["prior"] == "exemplar"
  # Copied into a results/ entry, it compares against a re-evaluation (another
  # sampling seed) of the same run: same images, small paired differences.
  res = tmp_path / "results" / "test"
  res.mkdir(parents=True)
  shutil.copy(rec["path"], res)
  eval_lib.evaluate(load_config("test", max_steps=10, **{"eval.seed": 1}), wd)
  r = compare.compare([str(res), wd])
  assert r["pairs"][0]["n"] == 40 and abs(r["pairs"][0]["mean_diff"]) < 1.0
  # Another evaluation subset is another test set: refused.
  eval_lib.evaluate(load_config("test", max_steps=10, **{"eval.max_test_examples": 30}), wd)
  with pytest.raises(compare.IdentityMismatchError, match="count"):
    compare.compare([str(res), wd])


def _compare_cli(*paths):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "compare.py"), *map(str, paths)],
    capture_output=True,
    text=True,
    timeout=300,
  )


def _one_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_compare_refuses_scores_it_cannot_trust_in_one_line(tmp_path):
  """A NaN score, a damaged file, a count that does not match the arrays, or a file that
  is not the one the eval_metrics.json beside it records: each is refused (exit 2, one
  line), never compared."""
  import json
  from exvae import atomic

  rng = np.random.default_rng(1)
  lp = -rng.gamma(2.0, 30.0, 50)
  good = _write(tmp_path / "good" / per_example.FILENAME, lp)
  nan = lp.copy()
  nan[7] = np.nan
  _write(tmp_path / "nan" / per_example.FILENAME, nan)
  with pytest.raises(compare.PerExampleFileError, match="non-finite log_px score.*image 7"):
    compare.compare([good, str(tmp_path / "nan")])
  r = _compare_cli(good, tmp_path / "nan")
  assert r.returncode == 2 and "non-finite" in _one_line(r.stderr) and "+nan" not in r.stdout
  # Damaged (cut short): one line, exit 2, no traceback.
  cut = tmp_path / "cut" / per_example.FILENAME
  cut.parent.mkdir()
  cut.write_bytes(open(good, "rb").read()[:300])
  r = _compare_cli(good, cut)
  assert r.returncode == 2 and "cannot be read" in _one_line(r.stderr), r.stderr[-2000:]
  # Damaged (a flipped byte in the zip's central directory names an unknown zip version,
  # which zipfile reports as NotImplementedError): one line, exit 2.
  raw = bytearray(open(good, "rb").read())
  at = raw.index(b"PK\x01\x02") + 6  # "version needed to extract"
  raw[at : at + 2] = (109).to_bytes(2, "little")  # zip version 10.9
  flipped = tmp_path / "flipped" / per_example.FILENAME
  flipped.parent.mkdir()
  flipped.write_bytes(bytes(raw))
  r = _compare_cli(good, flipped)
  assert r.returncode == 2 and "cannot be read" in _one_line(r.stderr), r.stderr[-2000:]
  # A count that does not match the arrays.
  arrays = per_example.arrays({"log_px": lp, "elbo": lp - 1}, _identity(50))
  arrays["count"] = np.asarray(49)
  bad_count = tmp_path / "count" / per_example.FILENAME
  bad_count.parent.mkdir()
  np.savez(bad_count, **arrays)
  r = _compare_cli(good, bad_count)
  assert r.returncode == 2 and "count says 49" in _one_line(r.stderr), r.stderr[-2000:]
  # One score raised by 100 beside an eval_metrics.json that records the file's digest.
  ev = tmp_path / "ev"
  ev.mkdir()
  shutil.copy(good, ev / per_example.FILENAME)
  (ev / "eval_metrics.json").write_text(
    json.dumps({"outputs_sha256": {per_example.FILENAME: atomic.sha256_file(good)}})
  )
  assert compare.compare([good, str(ev)])["pairs"][0]["mean_diff"] == 0.0
  raised = lp.copy()
  raised[3] += 100.0
  _write(ev / per_example.FILENAME, raised)
  with pytest.raises(compare.PerExampleFileError, match="is not the file"):
    compare.compare([good, str(ev)])
