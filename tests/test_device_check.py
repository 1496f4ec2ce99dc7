"""bench/device_check.py: the smoke run end to end, the budget, and broken sections.

The full check is meant for a borrowed GPU machine; `--smoke` runs the same code
at tiny sizes on the CPU here, so the script cannot rot between GPU loans.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = Path(ROOT) / "bench" / "device_check.py"


def _run(tmp_path, *args, timeout=400):
  out = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--out", str(out), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return proc, out


def _load(out, name):
  return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
  # A budget far above the ~60 s the smoke run takes, so that a loaded machine
  # cannot push a section past it (the budget itself is tested below).
  proc, out = _run(tmp_path, "--smoke", "--budget_s", "900", timeout=1200)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert sorted(p.name for p in out.iterdir()) == sorted(
    f"{s}.json" for s in ("env", "tests", "kernel", "train_speed", "eval", "train_run")
  )
  records = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
  assert all(r["status"] == "ok" and r["smoke"] for r in records.values()), records
  env = records["env"]
  assert env["backend"] and env["device_kind"] and env["versions"]["jax"]
  tests = records["tests"]
  assert tests["counts"].get("passed", 0) > 0 and not tests["failed"] and not tests["timed_out"]
  kernel = records["kernel"]
  assert len(kernel["rows"]) == 2 and kernel["limits"]["copy_bytes_per_s"] > 0
  for row in kernel["rows"]:
    assert 0 < row["fwd_ms"] and 0 < row["limit_fwd_ms"] and math.isfinite(row["fwd_x_limit"])
    assert row["max_abs_err_vs_f64"] < 1e-3  # float32 level, not bf16/TF32
  speed = records["train_speed"]
  assert set(speed["rows"]) == {
    "vae_gaussian",
    "vae_rat",
    "vae_exact",
    "hvae_rat",
    "vae_rat_highest",
  }
  assert speed["rows"]["vae_rat_highest"]["matmul_precision"] == "highest"
  assert speed["rows"]["vae_rat"]["matmul_precision"] == "backend default"
  assert not speed["row_errors"]
  assert all(math.isfinite(r["epoch_s"]) and r["epoch_s"] > 0 for r in speed["rows"].values())
  ev = records["eval"]
  assert [r["max_queries"] for r in ev["rows"]] == [40, 80]
  assert all(r["s_per_point"] > 0 and math.isfinite(r["mean_log_px"]) for r in ev["rows"])
  run = records["train_run"]
  # Three epochs, unless a loaded machine made the run reach its deadline first.
  assert run["epochs_done"] == len(run["val_loss"]) >= 1
  assert run["stopped_at_deadline"] or run["epochs_done"] == 3
  assert all(math.isfinite(v) for v in run["val_loss"])
  assert "done in" in proc.stdout


def test_exhausted_budget_skips_sections_but_still_writes_them(tmp_path):
  proc, out = _run(tmp_path, "--smoke", "--budget_s", "1", "--sections", "env,kernel", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _load(out, "env")["status"] == "ok"
  kernel = _load(out, "kernel")
  assert kernel["status"] == "skipped" and "budget" in kernel["reason"]


def test_training_run_stops_at_its_deadline(tmp_path):
  """The training subprocess is stopped (SIGTERM, then SIGKILL) in time for the
  section to finish within the budget, and what it did is still recorded.
  (A run of 100000 epochs cannot finish first, however fast the machine.)"""
  proc, out = _run(
    tmp_path,
    "--smoke",
    "--budget_s",
    "35",
    "--sections",
    "train_run",
    "--run_epochs",
    "100000",
    timeout=200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  run = _load(out, "train_run")
  assert run["status"] == "ok" and run["stopped_at_deadline"], run
  assert run["wall_s"] < 35


def test_bad_run_epochs_is_an_error(tmp_path):
  proc, _ = _run(tmp_path, "--sections", "env", "--run_epochs", "0", timeout=120)
  assert proc.returncode != 0 and "--run_epochs must be >= 1" in proc.stderr


def test_unknown_section_is_an_error(tmp_path):
  proc, _ = _run(tmp_path, "--sections", "env,bogus", timeout=120)
  assert proc.returncode != 0 and "unknown sections" in proc.stderr


@pytest.fixture(scope="module")
def device_check():
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_the_gpu_test_selection_exists(device_check):
  """Every test the full check names still exists (a rename would otherwise only
  show on the GPU machine, as 'not found')."""
  full = device_check.FULL
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "--collect-only",
      "-q",
      "-p",
      "no:xdist",
      "-p",
      "no:cacheprovider",
      "-m",
      "",
      *full["tests"],
      "-k",
      full["tests_k"],
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
  assert len(collected) >= 50
  for spec in full["tests"]:
    assert any(ln.startswith(spec) for ln in collected), spec


def test_a_broken_section_is_recorded_and_the_next_one_runs(tmp_path, device_check):
  chk = device_check.Check(tmp_path, device_check.SMOKE, 60.0, True, None)

  def broken(chk, deadline):
    raise ValueError("planted failure")

  chk.mode = dict(
    chk.mode,
    minimums=dict(chk.mode["minimums"], broken=0),
    shares=dict(chk.mode["shares"], broken=10),
  )
  rec = chk.run("broken", broken)
  assert rec["status"] == "error" and "planted failure" in rec["error"]
  assert json.loads((tmp_path / "broken.json").read_text())["status"] == "error"
  assert chk.run("env", device_check.section_env)["status"] == "ok"


def test_float64_reference_matches_a_direct_sum(device_check):
  """The kernel section's float64 reference (centred matmul form, bank in pieces)."""
  import numpy as np
  from scipy.special import logsumexp

  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 40)).astype(np.float32) + 3.0
  bank = rng.normal(size=(120_000, 40)).astype(np.float32) + 3.0
  got = device_check._f64_lse(z, bank[:1000], -1.0)
  d = ((z[:, None].astype(np.float64) - bank[None, :1000]) ** 2).sum(-1)
  s2 = math.exp(-1.0)
  ref = logsumexp(-d / (2 * s2), axis=1) - 20 * math.log(2 * math.pi * s2)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
  # More than one piece of the bank: the pieces merge to the same sum.
  big = device_check._f64_lse(z, bank, -1.0)
  d_big = ((z[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
  ref_big = logsumexp(-d_big / (2 * s2), axis=1) - 20 * math.log(2 * math.pi * s2)
  np.testing.assert_allclose(big, ref_big, rtol=0, atol=1e-9)


def _git(cwd, *args):
  subprocess.run(
    ["git", *args],
    cwd=cwd,
    check=True,
    capture_output=True,
    env={
      "GIT_AUTHOR_NAME": "t",
      "GIT_AUTHOR_EMAIL": "t@t",
      "GIT_COMMITTER_NAME": "t",
      "GIT_COMMITTER_EMAIL": "t@t",
      "HOME": str(cwd),
      "PATH": "/usr/bin:/bin",
    },
  )


def test_travel_size_and_holding_the_run_archives(tmp_path):
  """``device_check.sh size`` counts what travels (tracked files and .carry/) against
  64 MiB; ``hold`` moves carry/'s archives out of it and ``restore`` brings them back."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  (repo / "carry").mkdir()
  script = repo / "scripts" / "device_check.sh"
  script.write_text((Path(ROOT) / "scripts" / "device_check.sh").read_text())
  (repo / ".gitignore").write_text("/.carry/\n/.carry-hold/\n")
  archive = repo / "carry" / "run.tar.gz"
  with open(archive, "wb") as f:  # 40 MiB, sparse
    f.truncate(40 * 2**20)
  (repo / "carry" / "run.json").write_text("{}")
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "commit", "-qm", "x")
  (repo / ".carry").mkdir()
  with open(repo / ".carry" / "data.bin", "wb") as f:  # 30 MiB: 70 MiB in all
    f.truncate(30 * 2**20)
  sh = lambda verb: subprocess.run(
    ["bash", str(script), verb], cwd=repo, capture_output=True, text=True, timeout=60
  )
  over = sh("size")
  assert over.returncode == 1 and "70.0 MiB" in over.stdout and "hold" in over.stderr
  held = sh("hold")
  assert held.returncode == 0 and not archive.exists()
  assert (repo / ".carry-hold" / "run.tar.gz").exists() and (repo / "carry" / "run.json").exists()
  under = sh("size")
  assert under.returncode == 0 and "30.0 MiB" in under.stdout
  back = sh("restore")
  assert back.returncode == 0 and archive.stat().st_size == 40 * 2**20
  assert not any((repo / ".carry-hold").iterdir())
