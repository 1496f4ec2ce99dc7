"""exvae/runinfo.py: reading run records and describing the machine."""

import json
import math

from exvae import runinfo


def test_read_val_records_keeps_the_last_record_per_epoch(tmp_path):
  recs = [
    {"epoch": 2, "val_loss": 5.0},
    {"step": 7, "loss": 1.0},
    {"epoch": 1, "val_loss": 6.0},
    {"epoch": 2, "val_loss": 4.5, "time": 3.0},
  ]  # epoch 2 again after a resume
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n\n{torn")
  assert runinfo.read_val_records(tmp_path) == [recs[2], recs[3]]
  assert runinfo.read_val_records(tmp_path / "missing") == []
  assert runinfo.read_jsonl(tmp_path / "metrics.jsonl") == recs


def test_matmul_rate_matches_its_own_timing():
  rate = runinfo.matmul_rate(n=64, reps=2)
  assert math.isfinite(rate) and rate > 0
  # 2 n^3 FLOPs in at least one microsecond: no more than 5e5 GFLOP/s.
  assert rate < 2 * 64**3 / 1e-6


def test_cpu_name_reads_the_model_name_and_marks_avx512(tmp_path, monkeypatch):
  import builtins

  info = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2{}\n"
  real_open = builtins.open
  for flags, suffix in ((" avx512f avx512bw", ", AVX-512"), ("", "")):
    path = tmp_path / "cpuinfo"
    path.write_text(info.format(flags))
    monkeypatch.setattr(
      builtins, "open", lambda p, *a, **k: real_open(path if p == "/proc/cpuinfo" else p, *a, **k)
    )
    assert runinfo.cpu_name() == "Test CPU 9000"
    assert runinfo.cpu_name(with_isa=True) == "Test CPU 9000" + suffix
  monkeypatch.setattr(builtins, "open", real_open)
  assert runinfo.cpu_name()
