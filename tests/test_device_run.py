"""scripts/device_run.sh / device_run.py: a run advanced in device-sized chunks.

The device machine is not needed: the script runs here with $OUT set to a temp dir.
"""

import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script

SCRIPT = os.path.join(ROOT, "scripts", "device_run.sh")


def _dr():
  return load_script("scripts/device_run.py")


def _idx(path, arr):
  """Writes uint8 ``arr`` as a gzipped IDX file."""
  head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(head + arr.astype(np.uint8).tobytes())


def test_xz_keeps_the_idx_bytes_and_truncates_with_a_matching_header(tmp_path):
  dr = _dr()
  from exvae.data import idx as idx_lib

  arr = np.random.default_rng(0).integers(0, 256, (7, 3, 2)).astype(np.uint8)
  _idx(tmp_path / "a.gz", arr)
  dr._xz(str(tmp_path / "a.gz"), str(tmp_path / "full.xz"))
  dr._xz(str(tmp_path / "a.gz"), str(tmp_path / "first3.xz"), limit_items=3)
  for name, want in (("full", arr), ("first3", arr[:3])):
    (tmp_path / name).write_bytes(lzma.decompress((tmp_path / f"{name}.xz").read_bytes()))
    np.testing.assert_array_equal(idx_lib.read_idx(str(tmp_path / name)), want)


def _fake_run(wd):
  """A run directory with one checkpoint step of incompressible bytes and a log."""
  step = wd / "checkpoints" / "40"
  step.mkdir(parents=True)
  (step / "blob").write_bytes(np.random.default_rng(1).bytes(300_000))
  (wd / "metrics.jsonl").write_text(
    json.dumps({"epoch": 2, "step": 40, "val_loss": 9.0, "best_val": 9.0}) + "\n"
  )
  (wd / "config.json").write_text("{}")


def test_pack_splits_into_parts_and_unpack_restores_the_run(tmp_path, monkeypatch):
  dr = _dr()
  monkeypatch.setattr(dr, "PART_BYTES", 100_000)
  monkeypatch.setenv("DEVICE_RUN_CARRY", str(tmp_path / "carry"))
  _fake_run(tmp_path / "run")
  m = dr.pack_run("cfg", str(tmp_path / "run"), str(tmp_path / "out"))
  assert m["step"] == 40 and m["epoch"] == 2 and not m["finished"]
  assert len(m["parts"]) == 4  # 300 kB of random bytes in 100 kB parts
  assert all(os.path.getsize(tmp_path / "out" / "cfg" / p) <= 100_000 for p in m["parts"])
  line = dr.unpack_returned("cfg", str(tmp_path / "out"), root=str(tmp_path))
  assert "run at step 40" in line
  assert sorted(os.listdir(tmp_path / "carry" / "cfg")) == sorted(m["parts"] + ["manifest.json"])
  assert "resuming cfg from step 40" in dr.restore_run("cfg", str(tmp_path / "again"))
  assert (tmp_path / "again" / "checkpoints" / "40" / "blob").read_bytes() == (
    tmp_path / "run" / "checkpoints" / "40" / "blob"
  ).read_bytes()
  # A damaged part is refused before anything is replaced.
  part = tmp_path / "out" / "cfg" / m["parts"][1]
  part.write_bytes(part.read_bytes()[:-1] + b"x")
  with pytest.raises(dr.DeviceRunError, match="do not match"):
    dr.unpack_returned("cfg", str(tmp_path / "out" / "cfg"), root=str(tmp_path))
  assert "resuming cfg from step 40" in dr.restore_run("cfg", str(tmp_path / "again"))


def test_hold_moves_what_the_device_does_not_read_and_restore_brings_it_back(tmp_path):
  dr = _dr()
  root = tmp_path / "repo"
  for rel, size in (
    ("exvae/a.py", 10),
    ("results/x/model/params.npz", 5000),
    ("carry/device/cfg/run.tar.gz.00", 3000),
    ("carry/device/other/run.tar.gz.00", 4000),
    ("docs/images/p.png", 700),
  ):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"x" * size)
  subprocess.run(["git", "init", "-q", str(root)], check=True)
  subprocess.run(
    ["git", "-C", str(root), "add", "exvae", "results", "carry/device/other", "docs"], check=True
  )
  (root / ".gitignore").write_text("/.device-hold/\n")
  assert dr.travel_bytes(str(root), ())["total"] == 10 + 5000 + 3000 + 4000 + 700 + 15
  assert dr.hold(str(root), keep="carry/device/cfg/") == 3
  assert dr.travel_bytes(str(root), ())["total"] == 10 + 3000 + 15
  assert (root / ".device-hold" / "results" / "x" / "model" / "params.npz").exists()
  assert dr.restore(str(root)) == 3
  assert (root / "results" / "x" / "model" / "params.npz").stat().st_size == 5000
  assert not (root / ".device-hold").exists()


def test_bad_minutes_and_config_are_one_line(tmp_path):
  for args, what in (
    (["test", "soon"], "MINUTES must be a number"),
    (["no_such_config", "1"], "no config configs/no_such_config.py"),
  ):
    p = subprocess.run(
      ["bash", SCRIPT, *args],
      capture_output=True,
      text=True,
      env=dict(os.environ, OUT=str(tmp_path)),
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and what in p.stderr


def _call(tmp_path, tag, carry, *args):
  """One device call through the script: $OUT, the run's work folder and the carry in tmp."""
  out = tmp_path / f"out-{tag}"
  env = dict(
    os.environ,
    OUT=str(out),
    PYTHON=sys.executable,
    DEVICE_RUN_CARRY=str(carry),
    DEVICE_RUN_CARRIED=str(tmp_path / "carried"),
    DEVICE_RUN_WORK=str(tmp_path / f"work-{tag}"),
    DEVICE_RUN_TERM_EVERY="1",
    DEVICE_RUN_GRACE="900",
  )  # a loaded machine may take minutes to start
  p = subprocess.run(
    ["bash", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert (
    subprocess.run(
      ["bash", SCRIPT, "--unpack", "test", str(out)], env=env, capture_output=True
    ).returncode
    == 0
  )
  if "--eval" in args:
    return None, out
  manifest = json.loads((carry / "test" / "manifest.json").read_text())
  return manifest, out


def _records(workdir):
  """metrics.jsonl without what depends on the clock or the folder."""
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    r = r.get("summary", r)
    out.append(
      {k: v for k, v in r.items() if k not in ("time", "wall_time_s", "picture", "workdir")}
    )
  return out


def _digest(workdir, step):
  """The recorded blake2b digests of every array of a checkpoint step (state and best)."""
  path = workdir / "checkpoints" / str(step) / "digest" / "metadata"
  d = json.loads(path.read_text())
  return d["state"], d["best"]


@pytest.mark.slow
def test_two_chunks_continue_one_run(tmp_path):
  dr = _dr()
  flags = ("--config.checkpoint_every_steps=1000", "--config.tensorboard=False")
  # One uninterrupted call, then the same run as a first call whose deadline passes during
  # start-up (it stops at the first step after the trainer takes over SIGTERM) and a second.
  ref, _ = _call(tmp_path, "ref", tmp_path / "carry-ref", "test", "10", *flags)
  first, _ = _call(tmp_path, "a", tmp_path / "carry", "test", "0.01", *flags)
  second, _ = _call(tmp_path, "b", tmp_path / "carry", "test", "10", *flags)
  assert ref["finished"] and not first["finished"] and second["finished"]
  assert 0 < first["step"] < ref["step"] == second["step"]
  runs = {}
  for tag, carry in (("ref", tmp_path / "carry-ref"), ("chunks", tmp_path / "carry")):
    os.environ["DEVICE_RUN_CARRY"] = str(carry)
    try:
      dr.restore_run("test", str(tmp_path / f"final-{tag}"))
    finally:
      del os.environ["DEVICE_RUN_CARRY"]
    runs[tag] = tmp_path / f"final-{tag}"
  assert _records(runs["chunks"]) == _records(runs["ref"])
  assert _digest(runs["chunks"], ref["step"]) == _digest(runs["ref"], ref["step"])


@pytest.mark.slow
def test_an_eval_call_returns_the_per_example_scores(tmp_path, monkeypatch):
  dr = _dr()
  carry = tmp_path / "carry"
  run, _ = _call(
    tmp_path,
    "t",
    carry,
    "test",
    "10",
    "--config.max_steps=64",
    "--config.checkpoint_every_steps=1000",
    "--config.tensorboard=False",
  )
  assert run["step"] == 64 and run["finished"]
  monkeypatch.setenv("DEVICE_RUN_CARRY", str(carry))
  monkeypatch.setenv("DEVICE_RUN_CARRIED", str(tmp_path / "carried"))
  model = dr.publish_for_eval("test")  # what --prepare --eval does here
  assert os.path.exists(os.path.join(model, "params.npz"))
  _, out = _call(
    tmp_path,
    "e",
    carry,
    "--eval",
    "test",
    "10",
    "--config.eval.num_importance_samples=8",
    "--config.eval.max_test_examples=12",
  )
  assert sorted(os.listdir(out / "test" / "eval")) == [
    "eval_metrics.json",
    "eval_samples.png",
    "per_example.npz",
  ]
  got = carry / "test" / "eval"
  metrics = json.loads((got / "eval_metrics.json").read_text())
  scores = np.load(got / "per_example.npz")
  assert metrics["num_importance_samples"] == 8 and metrics["num_test_examples"] == 12
  assert scores["log_px"].shape == (12,)
  np.testing.assert_allclose(-scores["log_px"].mean(), metrics["test_nll"], rtol=1e-6)
  assert (carry / "test" / "manifest.json").exists()  # the run itself stays carried
