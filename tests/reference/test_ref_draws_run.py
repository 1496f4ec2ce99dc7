"""reference/ref_draws_run.py: exvae's draws reach the reference's process intact.

The reference side needs the authors' code (not installed in CI); what is
checked here is exvae's half: the per-epoch file holds exactly the draws
``ref_step_check.exvae_draws`` made (which tests/test_ref_step_check.py ties
to exvae's own loss), in the dtypes the reader expects, written atomically,
and the command line refuses what would lose or mix results.
"""

import os

import numpy as np
import pytest

from reference import ref_draws_run


def _draws(rng, t=3, b=4, d=5, m=7):
  return {
    "x": (rng.uniform(size=(t, b, 12)) < 0.4).astype(np.float32),
    "ids": rng.integers(0, 50000, (t, b)).astype(np.int32),
    "eps": rng.normal(size=(t, b, d)).astype(np.float32),
    "cand": rng.integers(0, 50000, (t, m)).astype(np.int32),
  }


def test_epoch_file_round_trip(tmp_path):
  d = _draws(np.random.default_rng(0))
  path = ref_draws_run.write_epoch_draws(str(tmp_path), 3, d)
  assert path == ref_draws_run.draws_path(str(tmp_path), 3)
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left
  got = np.load(path)
  assert got["x"].dtype == np.uint8 and got["cand"].dtype == np.int32
  for k, v in d.items():
    np.testing.assert_array_equal(got[k].astype(v.dtype), v)


def test_non_binary_batch_is_refused(tmp_path):
  d = _draws(np.random.default_rng(1))
  d["x"][0, 0, 0] = 0.5  # a grey pixel would be truncated to 0 as uint8
  with pytest.raises(ValueError, match="binarised"):
    ref_draws_run.write_epoch_draws(str(tmp_path), 1, d)
  assert os.listdir(tmp_path) == []


def test_command_line_refusals(tmp_path, capsys):
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "summary.json").write_text("{}")
  with pytest.raises(SystemExit) as e:
    ref_draws_run.main(["--seed", "15", "--out", str(tmp_path / "old")])
  assert e.value.code == 2 and "is not empty" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    ref_draws_run.main(["--seed", "15", "--epochs", "0", "--out", str(tmp_path / "new")])
  assert e.value.code == 2 and "--epochs must be >= 1" in capsys.readouterr().err


def test_exvae_inputs_parsing(capsys):
  assert ref_draws_run.parse_inputs("batch,order,eps,cand") == frozenset(ref_draws_run.INPUTS)
  assert ref_draws_run.parse_inputs("order") == frozenset({"order"})
  assert ref_draws_run.parse_inputs(" eps ") == frozenset({"eps"})
  assert ref_draws_run.parse_inputs("none") == frozenset()
  with pytest.raises(ValueError, match="unknown --exvae_inputs"):
    ref_draws_run.parse_inputs("eps,bits")
  with pytest.raises(SystemExit) as e:
    ref_draws_run.main(["--seed", "15", "--exvae_inputs", "perm", "--out", "/tmp/unused"])
  assert e.value.code == 2 and "choose from" in capsys.readouterr().err


@pytest.mark.slow
def test_reseed_reaches_the_reference_side(tmp_path, monkeypatch):
  """--reseed / --stream_seed reach the reference's process as the seed it re-seeds torch with
  after building the model (it decides whether their run is reproduced)."""
  seen = {}

  class _Stop(Exception):
    pass

  def fake_popen(cmd, **kw):
    seen["cmd"] = cmd
    raise _Stop

  monkeypatch.setattr(ref_draws_run.subprocess, "Popen", fake_popen)
  import bench.vs_reference as vr

  monkeypatch.setattr(vr, "require_reference", lambda: ("py", "src", "drv.py"))
  for i, (flag, want) in enumerate(
    (
      (["--reseed"], "15"),
      ([], None),
      (["--stream_seed", "40"], "40"),
      (["--reseed", "--stream_seed", "41"], "41"),
    )
  ):
    with pytest.raises(_Stop):
      ref_draws_run.main(
        [
          "--seed",
          "15",
          "--epochs",
          "1",
          "--exvae_inputs",
          "none",
          "--out",
          str(tmp_path / f"o{i}"),
        ]
        + flag
      )
    cmd = seen["cmd"]
    got = cmd[cmd.index("--stream_seed") + 1] if "--stream_seed" in cmd else None
    assert got == want, (flag, cmd)
    assert seen["cmd"][seen["cmd"].index("--exvae_inputs") + 1] == "none"
