"""A small fault campaign (scripts/fault_campaign.py): kills at random times and damaged
checkpoint files on a tiny run; nothing may go silently wrong."""

import pytest
from conftest import load_script


@pytest.mark.slow
def test_a_small_fault_campaign_finds_nothing_silently_wrong(tmp_path):
  fc = load_script("scripts/fault_campaign.py")
  c = fc.run_campaign(faults=4, per_episode=4, seed=3, root=str(tmp_path),
                      kinds=("SIGKILL", "SIGINT", "flip", "truncate"))
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
