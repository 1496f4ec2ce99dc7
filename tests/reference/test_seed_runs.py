"""reference/seed_runs.py: seed lists, metrics parsing, refusals and one tiny parallel run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT as _ROOT

ROOT = Path(_ROOT)
sys.path.insert(0, str(ROOT / "reference"))

import seed_runs  # noqa: E402


def test_parse_seeds():
  assert seed_runs.parse_seeds("3") == [3]
  assert seed_runs.parse_seeds("0-4") == [0, 1, 2, 3, 4]
  assert seed_runs.parse_seeds("7-8,1,5, 8") == [1, 5, 7, 8]
  for bad in ("", "a", "4-2", "1,,2", "-3"):
    with pytest.raises(ValueError):
      seed_runs.parse_seeds(bad)


def test_read_val_curve_orders_epochs_and_skips_other_records(tmp_path):
  lines = [{"epoch": 2, "val_loss": 5.0}, {"step": 7, "loss": 1.0}, {"epoch": 1, "val_loss": 6.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{broken\n")
  assert seed_runs.read_val_curve(tmp_path) == [6.0, 5.0]
  assert seed_runs.read_val_curve(tmp_path / "missing") == []


@pytest.mark.parametrize(
  "args",
  [
    ["--seeds", "x"],
    ["--epochs", "0"],
    ["--parallel", "0"],
    ["--set", "novalue"],
    ["--config", "no_such_config"],
  ],
)
def test_refusals(args, tmp_path):
  base = {"--config": "test", "--seeds": "0", "--epochs": "1", "--out": str(tmp_path)}
  base.update(dict(zip(args[::2], args[1::2])))
  argv = [x for kv in base.items() for x in kv]
  with pytest.raises(SystemExit) as e:
    seed_runs.main(argv)
  assert e.value.code == 2


@pytest.mark.slow
def test_two_seeds_in_parallel(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "reference/seed_runs.py",
      "--config",
      "test",
      "--seeds",
      "1-2",
      "--epochs",
      "1",
      "--out",
      str(tmp_path),
      "--parallel",
      "2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  summary = json.loads((tmp_path / "seed_runs.json").read_text())
  runs = summary["seeds"]
  assert sorted(runs) == ["1", "2"]
  assert all(r["epochs_done"] == 1 and r["returncode"] == 0 for r in runs.values())
  # Different seeds train different models.
  assert runs["1"]["val_loss"] != runs["2"]["val_loss"]
