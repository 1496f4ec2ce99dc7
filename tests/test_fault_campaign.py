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
