"""reference/fidelity_tables.py: docs/fidelity.md holds exactly the tables it generates."""

import json
import os
import shutil

from conftest import ROOT, load_script


def _mod():
  return load_script("reference/fidelity_tables.py")


def test_docs_fidelity_matches_the_generator():
  ft = _mod()
  page = open(os.path.join(ROOT, "docs", "fidelity.md")).read()
  want = ft.tables(os.path.join(ROOT, "results", "fidelity"))
  assert set(ft.blocks(page)) == set(ft.NAMES)
  for name, body in want.items():
    assert ft.blocks(page)[name] == body.strip(), (
      f"docs/fidelity.md's {name} table is stale: run "
      "python reference/fidelity_tables.py --write docs/fidelity.md"
    )


def test_tables_follow_the_records(tmp_path):
  """A changed record changes its table; fill() rewrites only the marked blocks."""
  ft = _mod()
  res = tmp_path / "fidelity"
  shutil.copytree(os.path.join(ROOT, "results", "fidelity"), res)
  rec = json.loads((res / "equal_epoch_rat.json").read_text())
  rec["epoch52_on_reference_val_images"]["exvae"] = {"seed0": 236.0, "seed1": 238.0}
  (res / "equal_epoch_rat.json").write_text(json.dumps(rec))
  seeds = ft.seeds52(str(res))
  assert "| exvae | 2 | 237.00 | 1.41 | 236.00-238.00 |" in seeds
  page = "intro\n" + "\n".join(f"{a}\nold\n{b}" for a, b in map(ft.markers, ft.NAMES)) + "\nend\n"
  new = ft.fill(page, ft.tables(str(res)))
  assert "old" not in new and new.startswith("intro\n") and new.endswith("\nend\n")
  assert ft.blocks(new)["seeds52"] == seeds
