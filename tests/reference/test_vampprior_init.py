"""reference/vampprior_init.py: the curves it reads and the table it prints."""

import json

import numpy as np

from conftest import load_script


def _mod():
  return load_script("reference/vampprior_init.py")


def test_curves_and_table(tmp_path):
  m = _mod()
  log = tmp_path / "ref.log"
  log.write_text(
    "beta: 0.01\no Val.  loss: 328.50   (RE: 222.67, KL: 105.83)\n"
    "[driver] EPOCH 1\no Val.  loss: 310.24   (RE: 1, KL: 2)\n"
  )
  assert m.reference_curve(str(log)) == {1: 328.5, 2: 310.24}
  jl = tmp_path / "metrics.jsonl"
  jl.write_text(
    json.dumps({"step": 5, "loss": 1.0})
    + "\n"
    + json.dumps({"epoch": 1, "val_loss": 326.4})
    + "\n"
    + '{"torn'
  )
  assert m.exvae_curve(str(jl)) == {1: 326.4}
  ref, a = [10.0, 12.0, 14.0], [9.0, 10.0, 11.0]
  rows = m.table({"reference": [{"1": x} for x in ref], "a": [{"1": x} for x in a]}, [1])
  se = np.sqrt(np.var(ref, ddof=1) / 3 + np.var(a, ddof=1) / 3)
  assert (
    rows[2]
    == f"| 1 | 12.00 (10.00, 12.00, 14.00) | 10.00 (9.00, 10.00, 11.00) | +2.00 +- {se:.2f} |"
  )


def test_the_committed_record_prints():
  m = _mod()
  with open(m.RECORD) as f:
    record = json.load(f)
  rows = m.table(record, range(1, 7))
  assert len(rows) == 8 and all(len(v) == 3 for v in record.values())
