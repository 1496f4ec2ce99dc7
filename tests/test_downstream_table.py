"""docs/downstream.md is generated from results/ and says what the JSON files hold."""

import json
import os

import numpy as np

from conftest import ROOT, load_script

dt = load_script("scripts/downstream_table.py")


def test_the_page_matches_the_generator():
  page = os.path.join(ROOT, "docs", "downstream.md")
  assert dt.main(["--results", os.path.join(ROOT, "results"), "--check", page]) == 0


def test_tables_from_synthetic_results(tmp_path):
  root = tmp_path / "results"
  (root / "m_knn").mkdir(parents=True)
  (root / "m_aug").mkdir()
  knn = {
    "test": {"3": 0.1234, "5": 0.1, "9": 0.2, "15": 0.3},
    "query_images": "grey",
    "tie_break": "lowest_label",
    "model": {"best_epoch": 7},
  }
  (root / "m_knn" / "knn.json").write_text(json.dumps(knn))
  aug = {
    "test_error_without": 0.0900,
    "test_error_without_std": 0.001,
    "test_error_with": 0.0850,
    "test_error_with_std": 0.002,
    "seeds": [0, 1, 2],
    "epochs": 100,
    "encode_input": "grey",
    "log_var": -3.0,
  }
  (root / "m_aug" / "augment.json").write_text(json.dumps(aug))
  text = dt.generate(str(root))
  assert "| `m_knn` | 12.34 | 10.00 | 20.00 | 30.00 | grey, lowest_label | best epoch 7 |" in text
  assert (
    "| `m_aug` | 3 | 100 | 9.00 +- 0.10 | 8.50 +- 0.20 | -0.50 | grey | exp(-3.00) | - |" in text
  )
  (root / "m_aug2").mkdir()
  aug.update(aug_error_without=0.1234, train_error_without=0.0321)
  (root / "m_aug2" / "augment.json").write_text(json.dumps(aug))
  assert "| exp(-3.00) | 12.34 (real: 3.21) |" in dt.generate(str(root))
  (root / "m_aug3").mkdir()  # one arm only (an s2 sweep)
  one = {k: v for k, v in aug.items() if "without" not in k}
  (root / "m_aug3" / "augment.json").write_text(json.dumps(one))
  assert "| `m_aug3` | 3 | 100 | - | 8.50 +- 0.20 | - | grey | exp(-3.00) | - |" in dt.generate(
    str(root)
  )
  assert "| paper (Exemplar VAE) | - | 100 | 8.56 | 8.16 | -0.40 |" in text
  page = tmp_path / "page.md"
  page.write_text(f"intro\n{dt.BEGIN}\nstale\n{dt.END}\n")
  assert dt.main(["--results", str(root), "--check", str(page)]) == 1
  assert dt.main(["--results", str(root), "--write", str(page)]) == 0
  assert dt.main(["--results", str(root), "--check", str(page)]) == 0
  assert page.read_text().startswith("intro\n") and "12.34" in page.read_text()
  (tmp_path / "bare.md").write_text("no markers\n")
  assert dt.main(["--results", str(root), "--check", str(tmp_path / "bare.md")]) == 2


def test_paired_knn_differences_match_numpy(tmp_path):
  root = tmp_path / "results"
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 500).astype(np.int32)
  preds = {}
  for name, p_right in (
    ("fam_exemplar_rat", 0.9),
    ("fam_vampprior", 0.85),
    ("fam_gaussian", 0.8),
    ("other_gaussian", 0.8),
  ):
    (root / name).mkdir(parents=True)
    prior = name.split("_")[1]
    model = "hvae" if name.startswith("other") else "vae"
    (root / name / "config.json").write_text(
      json.dumps({"dataset": "fashion_mnist", "model": model, "prior": prior})
    )
    right = rng.random(500) < p_right
    pred = {
      f"pred_k{k}": np.where(right, labels, (labels + 1) % 10).astype(np.int32) for k in dt.KS
    }
    preds[name] = pred
    val_pred = (
      {}
      if name == "fam_gaussian"
      else {  # one model without the validation setting
        f"val_pred_k{k}": np.where(rng.random(500) < p_right, labels, 0).astype(np.int32)
        for k in dt.KS
      }
    )
    preds[name] = dict(pred, **val_pred)
    np.savez(
      root / name / "knn_per_example.npz",
      labels=labels,
      **({"val_labels": labels} if val_pred else {}),
      **pred,
      **val_pred,
    )
    (root / name / "knn.json").write_text(json.dumps({"test": {k: 0.1 for k in dt.KS}}))
  text = dt.generate(str(root))
  wa = preds["fam_exemplar_rat"]["pred_k5"] != labels
  wb = preds["fam_gaussian"]["pred_k5"] != labels
  d = wa.astype(float) - wb
  want = f"{100 * d.mean():+.2f} +- {100 * d.std(ddof=1) / np.sqrt(d.size):.2f}"
  rows = [l for l in text.splitlines() if l.startswith("| `fam_exemplar_rat` - `fam_gaussian` |")]
  assert len(rows) == 2 and "| test (" in rows[0] and "| validation (" in rows[1]
  assert rows[0].split(" | ")[3] == want
  assert rows[1].count("not paired") == len(dt.KS)  # the Gaussian kept no validation setting
  wa = preds["fam_exemplar_rat"]["val_pred_k9"] != labels
  wb = preds["fam_vampprior"]["val_pred_k9"] != labels
  d = wa.astype(float) - wb
  val_row = next(
    l
    for l in text.splitlines()
    if l.startswith("| `fam_exemplar_rat` - `fam_vampprior` | validation")
  )
  assert (
    val_row.split(" | ")[4]
    == f"{100 * d.mean():+.2f} +- {100 * d.std(ddof=1) / np.sqrt(d.size):.2f}"
  )
  assert (
    "| `fam_exemplar_rat` - `fam_vampprior` |" in text
    and "| `fam_vampprior` - `fam_gaussian` |" in text
  )
  assert (
    "other_gaussian` -" not in text and "- `other_gaussian`" not in text
  )  # another model family
  # Models that scored other images (other labels) are not paired.
  np.savez(
    root / "fam_gaussian" / "knn_per_example.npz", labels=(labels + 1) % 10, **preds["fam_gaussian"]
  )
  row = next(
    l
    for l in dt.generate(str(root)).splitlines()
    if l.startswith("| `fam_exemplar_rat` - `fam_gaussian` | test")
  )
  assert row.count("not paired") == len(dt.KS)


def test_augmentation_difference_spread_is_over_paired_seeds(tmp_path):
  root = tmp_path / "results"
  (root / "m").mkdir(parents=True)
  runs = [
    {"seed": s, "test_error_without": w, "test_error_with": a}
    for s, (w, a) in enumerate([(0.0941, 0.0906), (0.0922, 0.0909), (0.0964, 0.0895)])
  ]
  aug = {
    "test_error_without": 0.09423,
    "test_error_without_std": 0.0021,
    "test_error_with": 0.09033,
    "test_error_with_std": 0.0007,
    "seeds": [0, 1, 2],
    "epochs": 100,
    "runs": runs,
  }
  (root / "m" / "augment.json").write_text(json.dumps(aug))
  diffs = [r["test_error_with"] - r["test_error_without"] for r in runs]
  want = f"| -0.39 +- {100 * np.std(diffs, ddof=1):.2f} |"
  assert want in dt.generate(str(root)) and want != "| -0.39 +- 0.00 |"


def test_knn_pairs_follow_config_not_names(tmp_path):
  """Rows pair by the data set, model and prior their config.json records; names play no part."""
  root = tmp_path / "results"
  labels = np.arange(100, dtype=np.int32) % 10
  for name, prior, model in (
    ("run_b", "gaussian", "vae"),
    ("run_a", "exemplar", "vae"),
    ("hvae_exemplar", "exemplar", "hvae"),
    ("no_config", None, None),
  ):
    (root / name).mkdir(parents=True)
    np.savez(
      root / name / "knn_per_example.npz", labels=labels, **{f"pred_k{k}": labels for k in dt.KS}
    )
    (root / name / "knn.json").write_text(json.dumps({"test": {k: 0.0 for k in dt.KS}}))
    if prior:
      (root / name / "config.json").write_text(
        json.dumps({"dataset": "fashion_mnist", "model": model, "prior": prior})
      )
  text = dt.generate(str(root))
  pairs = [l.split(" | ")[0] for l in text.splitlines() if " - `" in l]
  assert pairs == ["| `run_a` - `run_b`"]  # richer first, whatever the names say


def test_baseline_table_reads_both_codes_records(tmp_path):
  root = tmp_path / "results"
  (root / "m").mkdir(parents=True)
  (root / "m" / "augment.json").write_text(
    json.dumps(
      {
        "num_train": 60000,
        "seeds": [0, 1],
        "test_error_without": 0.0942,
        "test_error_without_std": 0.0021,
        "test_error_with": 0.09,
      }
    )
  )
  base = root / "fidelity" / "classify_baseline"
  base.mkdir(parents=True)
  (base / "ours.json").write_text(
    json.dumps(
      {
        "num_train": 50000,
        "seeds": [0],
        "test_error_without": 0.0969,
        "test_error_without_std": 0.0,
      }
    )
  )
  (base / "ref.json").write_text(
    json.dumps(  # ref_classify.py records errors in percent
      {
        "num_train": 50000,
        "seed": 1,
        "test_error": 8.73,
        "code": "sajadn/Exemplar-VAE 4dbd091 utils/classify_data.classify_data",
      }
    )
  )
  (base / "notes.txt").write_text("not a record")
  text = dt.baseline_table(str(root))
  assert "| exvae (`results/m/augment.json`) | 60000 | 0, 1 | 9.42 +- 0.21 |" in text
  assert "| exvae (`results/fidelity/classify_baseline/ours.json`) | 50000 | 0 | 9.69 |" in text
  assert (
    "| authors' `classify_data` (`results/fidelity/classify_baseline/ref.json`) | 50000 | 1 "
    "| 8.73 |"
  ) in text
  assert "| paper | - | - | 8.56 |" in text
  assert "no record" in dt.baseline_table(str(tmp_path / "empty"))


def test_query_set_table_matches_numpy_and_finds_a_planted_gap(tmp_path):
  """Validation minus test paired differences (same references), and their permutation p."""
  root = tmp_path / "results"
  rng = np.random.default_rng(1)
  n = 2000
  yv, yt = rng.integers(0, 10, n).astype(np.int32), rng.integers(0, 10, n).astype(np.int32)

  def write(gap):
    preds = {}
    for name, prior, p_val, p_test in (
      ("a", "exemplar", 0.9 + gap, 0.9),
      ("b", "gaussian", 0.9, 0.9),
    ):
      (root / name).mkdir(parents=True, exist_ok=True)
      (root / name / "config.json").write_text(
        json.dumps({"dataset": "d", "model": "vae", "prior": prior})
      )
      arr = {"labels": yt, "val_labels": yv, "test_on_train_labels": yt}
      for k in dt.KS:
        arr[f"pred_k{k}"] = yt
        arr[f"val_pred_k{k}"] = np.where(rng.random(n) < p_val, yv, (yv + 1) % 10).astype(np.int32)
        arr[f"test_on_train_pred_k{k}"] = np.where(
          rng.random(n) < p_test, yt, (yt + 1) % 10
        ).astype(np.int32)
      np.savez(root / name / "knn_per_example.npz", **arr)
      (root / name / "knn.json").write_text(json.dumps({"test": {k: 0.1 for k in dt.KS}}))
      preds[name] = arr
    return preds

  preds = write(gap=0.0)
  text = dt.query_set_table(str(root), ["a", "b"])
  dv = (preds["a"]["val_pred_k9"] != yv).astype(float) - (preds["b"]["val_pred_k9"] != yv)
  dt_ = (preds["a"]["test_on_train_pred_k9"] != yt).astype(float) - (
    preds["b"]["test_on_train_pred_k9"] != yt
  )
  want = (
    f"{100 * (dv.mean() - dt_.mean()):+.2f} +- "
    f"{100 * np.hypot(dv.std(ddof=1) / np.sqrt(n), dt_.std(ddof=1) / np.sqrt(n)):.2f}"
  )
  row = next(l for l in text.splitlines() if l.startswith("| `a` - `b` |"))
  assert row.split(" | ")[3] == want
  p_null = float(text.rsplit(": ", 1)[1].rstrip(".\n"))
  write(gap=0.06)  # the richer prior gains 6 points on validation only
  p_gap = float(dt.query_set_table(str(root), ["a", "b"]).rsplit(": ", 1)[1].rstrip(".\n"))
  assert p_null > 0.05 and p_gap < 0.01
  # Another model, scored on fewer images, gets its own rows and its own p-value.
  for name, prior, src in (("c", "exemplar", "a"), ("d", "gaussian", "b")):
    (root / name).mkdir()
    (root / name / "config.json").write_text(
      json.dumps({"dataset": "d", "model": "hvae", "prior": prior})
    )
    with np.load(root / src / "knn_per_example.npz") as z:
      np.savez(root / name / "knn_per_example.npz", **{k: z[k][:500] for k in z.files})
  text = dt.query_set_table(str(root), ["a", "b", "c", "d"])
  assert "| `c` - `d` |" in text and "`hvae` on `d`: family-wise" in text
  assert "`vae` on `d`: family-wise" in text
  # Two models that predict alike have no spread: no evidence, not a division by zero.
  assert dt.query_set_test(np.zeros((50, 2)), np.zeros((40, 2)), permutations=20)[2] == 1.0
