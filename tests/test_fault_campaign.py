"""A small fault campaign (scripts/fault_campaign.py): kills at random times and damaged
checkpoint files on a tiny run; nothing may go silently wrong."""

import pytest
from conftest import load_script


@pytest.mark.slow
def test_a_small_fault_campaign_finds_nothing_silently_wrong(tmp_path):
  fc = load_script("scripts/fault_campaign.py")
  c = fc.run_campaign(
    faults=4,
    per_episode=4,
    seed=3,
    root=str(tmp_path),
    kinds=("SIGKILL", "SIGINT", "flip", "truncate"),
  )
  s = c.stats
  assert sum(c.counts.values()) == 4, c.counts
  assert s["silent"] == 0 and s["records_lost"] == 0 and s["records_duplicated"] == 0, c.problems
  assert s["detected"] + s["harmless"] == s["corruptions"]
  assert s["bit_identical"] == s["episodes"] >= 1, c.problems
  assert s["extra_lines"] == 0 and s["failed_runs"] == 0, c.problems
  assert "faults injected" in c.table()


@pytest.mark.slow
def test_faults_in_what_readers_read_back_are_caught(tmp_path):
  fc = load_script("scripts/fault_campaign.py")
  c = fc.run_campaign(faults=0, readers=4, seed=1, root=str(tmp_path))
  s = c.stats
  assert [c.counts[k] for k in fc.READER_FAULTS] == [1, 1, 1, 1], c.counts
  assert s["reader_caught"] == 4 and s["reader_silent"] == 0, c.problems
  assert s["failed_runs"] == 0 and "reader faults caught" in c.table()


@pytest.mark.slow
def test_faults_in_evaluation_published_models_and_compare_are_caught(tmp_path):
  """A few faults of --surfaces: a damaged reused evaluation, an edited published config,
  a NaN given to compare; each episode correct (identical, recomputed or refused)."""
  fc = load_script("scripts/fault_campaign.py")
  faults = (("eval", "metrics_edit"), ("published", "config_edit"), ("compare", "nan"))
  c = fc.run_campaign(faults=0, seed=2, root=str(tmp_path), surfaces=3, surface_faults=faults)
  got = {(e["surface"], e["fault"]): e["outcome"] for e in c.surfaces.episodes}
  assert got == {
    ("eval", "metrics_edit"): "recomputed",
    ("published", "config_edit"): "refused",
    ("compare", "nan"): "refused",
  }, c.surfaces.episodes
  s = c.surfaces.summary()
  assert (
    s["episodes"] == s["faults_landed"] == 3
    and s["outcomes"]["wrong_silent"] == 0
    and not c.problems
  )
  assert "readers: episodes not correct" in c.table()


def test_an_output_that_differs_from_the_undisturbed_one_is_a_wrong_result():
  """The campaign's comparison itself: a changed number or array is not 'the same'."""
  import numpy as np

  fc = load_script("scripts/fault_campaign.py")
  s = fc.Surfaces.__new__(fc.Surfaces)
  s.want = {
    "eval": {
      "eval_metrics.json": {"test_nll": 1.0, "eval_seconds": 3.0},
      "per_example.npz": {"log_px": np.array([1.0, np.nan])},
    }
  }
  s.volatile = {"eval": {"eval_seconds"}}
  same = {
    "eval_metrics.json": {"test_nll": 1.0, "eval_seconds": 9.0},
    "per_example.npz": {"log_px": np.array([1.0, np.nan])},
  }
  assert s.same("eval", same)
  assert not s.same(
    "eval", dict(same, **{"eval_metrics.json": {"test_nll": 1.0 + 1e-12, "eval_seconds": 3.0}})
  )
  assert not s.same("eval", dict(same, **{"per_example.npz": {"log_px": np.array([1.0, 2.0])}}))
  assert not s.same("eval", {"eval_metrics.json": same["eval_metrics.json"]})
