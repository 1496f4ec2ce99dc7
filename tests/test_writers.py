"""TensorBoard summaries (read back with TensorBoard's own loader) and when progress bars show."""

import glob
import io
import json
import math
import os

import numpy as np
import pytest

from conftest import load_config
from exvae import progress, train_lib, writers


@pytest.mark.slow
def test_tensorboard_scalars_and_pictures_read_back(tmp_path):
  pytest.importorskip("tensorboard")
  wd = str(tmp_path / "run")
  c = load_config("test", max_train=200, num_epochs=2, log_every_steps=2)
  train_lib.train_and_evaluate(c, wd)
  assert glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  tb = writers.read_scalars(wd)
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train = [l for l in lines if "loss" in l]
  val = [l for l in lines if "val_loss" in l]
  assert len(train) >= 5 and len(val) == 2
  for key in ("loss", "elbo", "recon", "kl", "beta", "prior_log_var"):
    got = tb[f"train/{key}"]
    assert [s for s, _ in got] == [l["step"] for l in train]
    np.testing.assert_allclose([v for _, v in got], [l[key] for l in train], rtol=1e-6)
  np.testing.assert_allclose(
    [v for _, v in tb["train/prior_var"]], [math.exp(l["prior_log_var"]) for l in train], rtol=1e-5
  )
  sps = tb["train/steps_per_sec"]
  assert len(sps) == len(train) - 1 and all(v > 0 for _, v in sps)
  t = [l["time"] for l in train]
  np.testing.assert_allclose(
    sps[0][1], (train[1]["step"] - train[0]["step"]) / (t[1] - t[0]), rtol=1e-5
  )
  for key in ("loss", "recon", "kl"):
    got = tb[f"val/{key}"]
    assert [s for s, _ in got] == [l["step"] for l in val]
    np.testing.assert_allclose([v for _, v in got], [l[f"val_{key}"] for l in val], rtol=1e-6)
  assert writers.read_image_tags(wd) == {"val/samples_and_reconstructions": 2}
  # A second session (here: a resumed run that has nothing left to do) reads back the same.
  train_lib.train_and_evaluate(c, wd)
  assert writers.read_scalars(wd)["val/loss"] == tb["val/loss"]


def test_tensorboard_off(tmp_path):
  wd = str(tmp_path / "run")
  train_lib.train_and_evaluate(load_config("test", max_steps=3, tensorboard=False), wd)
  assert os.path.exists(os.path.join(wd, "metrics.jsonl"))
  assert not glob.glob(os.path.join(wd, "events.out.tfevents.*"))


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_only_on_a_terminal_outside_ci(monkeypatch):
  monkeypatch.delenv("EXVAE_PROGRESS", raising=False)
  monkeypatch.delenv("CI", raising=False)
  assert progress.enabled(True, _Tty())
  assert not progress.enabled(True, io.StringIO())  # redirected: quiet
  assert not progress.enabled(False, _Tty())  # config.progress=False
  monkeypatch.setenv("CI", "true")
  assert not progress.enabled(True, _Tty())
  monkeypatch.setenv("EXVAE_PROGRESS", "1")
  assert progress.enabled(True, io.StringIO())
  assert not progress.enabled(False, io.StringIO())
  monkeypatch.setenv("EXVAE_PROGRESS", "0")
  assert not progress.enabled(True, _Tty())
  post = progress.train_postfix({"loss": 12.345, "beta": 0.5}, 150, 100, 11.0)
  assert post == {"epoch": "1.50", "loss": "12.35", "beta": "0.50", "best_val": "11.00"}


@pytest.mark.slow
def test_train_bar_shows_epoch_rate_loss_and_validation(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("EXVAE_PROGRESS", "1")
  c = load_config("test", max_train=200, num_epochs=2, log_every_steps=2, progress=True)
  train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  err = capsys.readouterr().err
  assert "train:" in err and "20/20" in err
  assert "step/s" in err or "s/step" in err  # tqdm's rate (and ETA while running)
  assert "epoch=2.00" in err and "loss=" in err and "best_val=" in err


def test_progress_lines_when_no_bar_is_drawn(monkeypatch):
  """A redirected run (no terminal) gets a plain line at most every every_s seconds."""
  t = [0.0]
  out = io.StringIO()
  rep = progress.LineReporter(
    100, "test NLL (S=5000)", every_s=60.0, stream=out, clock=lambda: t[0]
  )
  for _ in range(10):  # 10 examples every 30 s: a line at 60, 120, ... s
    t[0] += 30.0
    rep.update(10)
  rep.close()
  lines = out.getvalue().splitlines()
  assert lines[0] == "test NLL (S=5000): 20/100 examples, 60 s elapsed, about 240 s left"
  assert len(lines) == 5 and lines[-1].startswith("test NLL (S=5000): 100/100 examples, 300 s")
  # A resumed job counts what it had done but takes its rate from this process alone.
  t[0] = 0.0
  out = io.StringIO()
  rep = progress.LineReporter(
    100, "test NLL", every_s=60.0, stream=out, clock=lambda: t[0], initial=60
  )
  t[0] = 60.0
  rep.update(10)
  assert out.getvalue() == "test NLL: 70/100 examples, 60 s elapsed, about 180 s left\n"
  quiet = io.StringIO()
  fast = progress.LineReporter(100, "x", every_s=60.0, stream=quiet, clock=lambda: 0.0)
  fast.update(100)
  fast.close()
  assert quiet.getvalue() == ""  # a short job prints nothing
  monkeypatch.setenv("EXVAE_PROGRESS", "0")
  assert not progress.lines_enabled(True)
  monkeypatch.delenv("EXVAE_PROGRESS")
  assert progress.lines_enabled(True) and not progress.lines_enabled(False)
