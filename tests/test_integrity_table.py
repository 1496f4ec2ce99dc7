"""scripts/integrity_table.py: the readers' fault-campaign tables of docs/running.md."""

import json
import os

from conftest import ROOT, load_script

it = load_script("scripts/integrity_table.py")


def test_the_page_matches_the_records():
  page = os.path.join(ROOT, "docs", "running.md")
  assert it.main(["--results", os.path.join(ROOT, "results"), "--check", page]) == 0


def _record(path, started, outcomes, per_surface):
  path.write_text(
    json.dumps(
      {
        "commit": "abcdef0123",
        "started": started,
        "wall_clock_s": 600.0,
        "readers": {
          "episodes": sum(outcomes.values()),
          "faults_landed": 9,
          "outcomes": outcomes,
          "per_surface": per_surface,
          "faults_landed_per_surface": {"compare": 2},
        },
      }
    )
  )


def test_tables_count_every_outcome_and_show_the_newest_campaign(tmp_path):
  (tmp_path / "integrity").mkdir()
  _record(
    tmp_path / "integrity" / "readers_seed9.json",
    "2026-01-02",
    {"identical": 3, "multi_line": 1},
    {"compare": {"npz_flip": {"multi_line": 1}}},
  )
  _record(
    tmp_path / "integrity" / "readers_seed4.json",
    "2026-01-01",
    {"refused": 5},
    {"eval": {"SIGKILL": {"identical": 2}}},
  )
  text = it.tables(it.load_records(str(tmp_path)))
  rows = [l for l in text.splitlines() if l.startswith("| [readers_seed")]
  assert [r.split("]")[0] for r in rows] == ["| [readers_seed4.json", "| [readers_seed9.json"]
  cells = [c.strip() for c in rows[1].split("|")]
  assert cells[2:12] == ["4", "9", "3", "0", "0", "0", "0", "1", "0", "10 min"], cells
  assert "npz_flip: 1 multi_line" in text and "SIGKILL" not in text  # the newest only
  page = tmp_path / "p.md"
  page.write_text(f"intro\n{it.BEGIN}\nold\n{it.END}\nrest\n")
  assert it.main(["--results", str(tmp_path), "--check", str(page)]) == 1
  assert it.main(["--results", str(tmp_path), "--write", str(page)]) == 0
  assert it.main(["--results", str(tmp_path), "--check", str(page)]) == 0
  assert page.read_text().startswith("intro\n") and page.read_text().endswith(f"{it.END}\nrest\n")
