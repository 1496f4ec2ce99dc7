"""reference/seed_spread.py: the README's seed comparison recomputed from the stored values."""

import json

import numpy as np
import pytest
from scipy import stats

from conftest import load_script


def _mod():
  return load_script("reference/seed_spread.py")


def test_welch_matches_scipy():
  rng = np.random.default_rng(0)
  a, b = 236 + 0.2 * rng.standard_normal(6), 235.5 + 0.1 * rng.standard_normal(4)
  w = _mod().welch(a, b)
  t = stats.ttest_ind(a, b, equal_var=False)
  np.testing.assert_allclose(w["diff"] / w["se"], t.statistic, rtol=1e-12)
  np.testing.assert_allclose(w["p"], t.pvalue, rtol=1e-10)
  np.testing.assert_allclose(w["df"], t.df, rtol=1e-12)
  with pytest.raises(ValueError, match="two values or more"):
    _mod().welch([1.0], b)


def test_prints_the_stored_groups(tmp_path, capsys):
  rec = {
    "epoch52_on_reference_val_images": {
      "exvae": {"seed0": 236.0, "seed1": 236.2, "seed2": 235.8},
      "reference_own_evaluate_loss": {"seed15": 235.5, "seed16": 235.7},
    }
  }
  p = tmp_path / "r.json"
  p.write_text(json.dumps(rec))
  assert _mod().main(["--json", str(p)]) == 0
  out = capsys.readouterr().out
  assert "exvae     n=3  mean 236.000  sd 0.200" in out
  assert "reference n=2  mean 235.600" in out
  assert "exvae - reference: +0.400" in out


def test_pairs_mean_se_and_p(capsys):
  d = [0.16, 0.29, 0.05]
  got = _mod().paired(d)
  t = stats.ttest_1samp(d, 0.0)
  np.testing.assert_allclose(got["mean"], np.mean(d), rtol=1e-12)
  np.testing.assert_allclose(got["mean"] / got["se"], t.statistic, rtol=1e-12)
  np.testing.assert_allclose(got["p"], t.pvalue, rtol=1e-10)
  summaries = [
    {
      "ref_fresh_seed": s,
      "exvae": {str(s): {"val": [300.0, 261.0 + x]}},
      "reference": {str(s): {"val_own_scorer": [299.5, 261.0], "final_exvae_scorer": 261.0}},
    }
    for s, x in zip((20, 21, 22), d)
  ]
  _mod().print_pairs(summaries)
  out = capsys.readouterr().out
  assert (
    "pair 21: exvae - reference per epoch (own scorers) +0.50 +0.29; final, one scorer +0.290"
    in out
  )
  assert f"final epoch, one scorer: {np.mean(d):+.3f} +- {got['se']:.3f} nats over 3 pairs" in out


def test_pairs_vs_own_init(tmp_path, capsys):
  own = {"seed0": 236.0, "seed1": 236.2, "seed2": 235.8}
  rec = {
    "epoch52_on_reference_val_images": {
      "exvae": own,
      "reference_own_evaluate_loss": {"seed15": 235.5},
    }
  }
  finals = [235.4, 235.6, 235.5]
  summaries = [
    {
      "ref_fresh_seed": s,
      "exvae": {str(s): {"val": [300.0, f]}},
      "reference": {str(s): {"val_own_scorer": [299.5, 235.5], "final_exvae_scorer": 235.5}},
    }
    for s, f in zip((15, 16, 17), finals)
  ]
  r, p = tmp_path / "r.json", tmp_path / "p.json"
  r.write_text(json.dumps(rec))
  p.write_text(json.dumps(summaries))
  assert _mod().main(["--json", str(r), "--pairs", str(p), "--vs_own_init"]) == 0
  out = capsys.readouterr().out
  t = stats.ttest_ind(finals, list(own.values()), equal_var=False)
  se = (np.mean(finals) - np.mean(list(own.values()))) / t.statistic
  assert (
    f"exvae from the reference's initialisations (n=3, mean 235.500) - exvae from its own "
    f"(n=3, mean 236.000): -0.500 +- {se:.3f} nats (Welch, df {t.df:.1f}, p = {t.pvalue:.3f})"
  ) in out
  with pytest.raises(SystemExit):
    _mod().main(["--vs_own_init"])


def test_draws_differences(capsys):
  n = 16
  ex = 260.0 + np.arange(52, dtype=float)
  own = ex - 0.25  # the reference's own run, 0.25 lower
  pairs = [
    {
      "ref_fresh_seed": 15,
      "exvae": {"15": {"val": list(ex)}},
      "reference": {"15": {"val_own_scorer": list(own), "final_exvae_scorer": 0.0}},
    }
  ]
  a = ex[:n] - 0.05
  a[12:] += 0.1
  runs = [
    {
      "ref_fresh_seed": 15,
      "exvae_inputs": ["batch"],
      "val_own_scorer": list(a),
      "final_exvae_scorer": ex[n - 1] + 0.02,
    }
  ]
  (row,) = _mod().print_draws(runs, pairs)
  np.testing.assert_allclose(row["vs_exvae"]["1-12"], -0.05)
  np.testing.assert_allclose(row["vs_exvae"]["13-16"], 0.05)
  np.testing.assert_allclose(row["vs_ref_own"]["1-12"], 0.20)
  np.testing.assert_allclose(row["vs_ref_own"]["13-16"], 0.30)
  np.testing.assert_allclose(row["final_vs_exvae"], 0.02)
  out = capsys.readouterr().out
  assert "seed 15, exvae's batch, 16 epochs:" in out and "one scorer, from exvae +0.020" in out
  assert row["stream_seed"] is None
  (row,) = _mod().print_draws([dict(runs[0], exvae_inputs=[], stream_seed=116)], pairs)
  assert row["stream_seed"] == 116
  assert (
    "seed 15, exvae's nothing (torch re-seeded with 116), 16 epochs:" in capsys.readouterr().out
  )
  assert "final_vs_ref_own" not in row  # 16 of their 52 epochs
  with pytest.raises(ValueError, match="no pair for seed 16"):
    _mod().print_draws([dict(runs[0], ref_fresh_seed=16)], pairs)


def test_draws_full_length_windows(capsys):
  ex = 260.0 - 0.5 * np.arange(52, dtype=float)
  own = ex - 0.25
  pairs = [
    {
      "ref_fresh_seed": 15,
      "exvae": {"15": {"val": list(ex)}},
      "reference": {"15": {"val_own_scorer": list(own), "final_exvae_scorer": 234.0}},
    }
  ]
  a = own.copy()
  a[24:] += 0.4  # falls behind their run after epoch 24
  runs = [
    {
      "ref_fresh_seed": 15,
      "exvae_inputs": [],
      "stream_seed": 115,
      "val_own_scorer": list(a),
      "final_exvae_scorer": 234.3,
    }
  ]
  (row,) = _mod().print_draws(runs, pairs)
  np.testing.assert_allclose(row["vs_ref_own"]["13-24"], 0.0, atol=1e-12)
  np.testing.assert_allclose(row["vs_ref_own"]["25-52"], 0.4)
  np.testing.assert_allclose(row["vs_exvae"]["25-52"], 0.15)
  np.testing.assert_allclose(row["final_vs_ref_own"], 0.3)
  assert (
    "epochs 25-52 +0.400, epochs 44-52 +0.400; epoch 52, one scorer, from exvae "
    in capsys.readouterr().out
  )


def test_decoupled_summary(capsys):
  base = {
    "epochs": 52,
    "inputs": [],
    "final_vs_exvae": 0.1,
    "final_vs_ref_own": 0.3,
    "vs_exvae": {"25-52": 0.02, "44-52": 0.0},
    "vs_ref_own": {"25-52": 0.1, "44-52": 0.2},
  }
  rows = [
    dict(base, seed=15, stream_seed=115),
    dict(
      base,
      seed=16,
      stream_seed=116,
      final_vs_exvae=-0.1,
      final_vs_ref_own=0.1,
      vs_exvae={"25-52": -0.04, "44-52": 0.1},
      vs_ref_own={"25-52": 0.2, "44-52": 0.1},
    ),
    dict(base, seed=16, stream_seed=16, final_vs_ref_own=0.0),  # coupled: left out
    dict(base, seed=17, stream_seed=117, inputs=["batch"]),  # exvae's draws: out
    {
      "seed": 18,
      "epochs": 24,
      "inputs": [],
      "stream_seed": 118,  # not full length
      "final_vs_exvae": 5.0,
      "vs_exvae": {},
      "vs_ref_own": {},
    },
  ]
  out = _mod().print_decoupled(rows)
  assert out["n"] == 2 and out["starts"] == [15, 16]
  assert out["final"]["vs_ref_own"] == [0.3, 0.1]
  np.testing.assert_allclose(out["final"]["vs_ref_own_paired"]["mean"], 0.2)
  np.testing.assert_allclose(out["final"]["vs_ref_own_paired"]["se"], 0.1)
  np.testing.assert_allclose(out["final"]["vs_exvae_paired"]["mean"], 0.0, atol=1e-12)
  np.testing.assert_allclose(out["25-52"]["vs_exvae_paired"]["mean"], -0.01)
  np.testing.assert_allclose(out["44-52"]["vs_exvae_paired"]["se"], 0.05)
  text = capsys.readouterr().out
  assert "from 2 start(s) (15, 16)" in text and "mean over epochs 44-52:" in text
  one = _mod().print_decoupled(rows[:1])
  assert one["n"] == 1 and "vs_ref_own_paired" not in one["final"]
  assert "epoch 52, one scorer: +0.300 / +0.100" in capsys.readouterr().out
  assert _mod().print_decoupled(rows[2:]) is None
