"""Signals to ``uses.py``: SIGTERM is one line and exit 143 (a classifier in training saves
its state and the next run continues from it); Ctrl-C is one line and exit 130."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

PY = sys.executable


def _sigint_default():
  """In the child: Ctrl-C's default, also where the tests run with SIGINT ignored
  (started in the background), which a child would inherit."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env():
  env = dict(os.environ, EXVAE_PROGRESS="0")
  env.pop("EXVAE_TRACEBACK", None)
  return env


def _probe_env():
  """The environment of a probe script: this checkout importable, no traceback asked for."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("EXVAE_TRACEBACK", None)
  return env


def _run_probe(script, what):
  """Runs a probe script (``python -c``) with ``what`` as its argument, to its end."""
  return subprocess.run(
    [PY, "-c", script, what],
    capture_output=True,
    text=True,
    env=_probe_env(),
    timeout=120,
    preexec_fn=_sigint_default,
  )


def _uses(trained_dir, out, *args):
  return [PY, os.path.join(ROOT, "uses.py"), *args, f"--workdir={trained_dir}", f"--out={out}"]


def _lines(stderr):
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING:absl")]


def _catches(pid, sig):
  """True once the process has its own handler for ``sig`` (Linux: /proc/PID/status)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(mask >> (sig - 1) & 1)


_AUGMENT = ("augment", "--epochs=30", "--hidden=16", "--arms=without")


@pytest.mark.slow
def test_sigterm_stops_augment_with_its_classifier_saved_and_the_next_run_continues(
  trained_dir, tmp_path
):
  ref = subprocess.run(
    _uses(trained_dir, str(tmp_path / "ref"), *_AUGMENT),
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=_env(),
    timeout=600,
  )
  assert ref.returncode == 0, ref.stderr[-2000:]
  out = str(tmp_path / "out")
  p = subprocess.Popen(
    _uses(trained_dir, out, *_AUGMENT),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=_env(),
    preexec_fn=_sigint_default,
  )
  for line in p.stdout:  # a line every 10 classifier epochs
    if "epoch 10/30" in line:
      break
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 143, (p.returncode, err[-2000:])
  lines = _lines(err)
  assert len(lines) == 1 and lines[0].startswith("exvae-uses: stopped: SIGTERM"), lines
  partial = os.path.join(out, "augment_runs", "seed0_without.partial.npz")
  assert "saved in" in lines[0] and partial in lines[0] and os.path.exists(partial)
  again = subprocess.run(
    _uses(trained_dir, out, *_AUGMENT),
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=_env(),
    timeout=600,
  )
  assert again.returncode == 0 and "continuing after epoch" in again.stdout, again.stderr[-2000:]
  want = json.load(open(tmp_path / "ref" / "augment.json"))
  got = json.load(open(os.path.join(out, "augment.json")))
  assert got["runs"][0]["test_error_without"] == want["runs"][0]["test_error_without"]
  assert got["runs"][0]["final_loss_without"] == want["runs"][0]["final_loss_without"]
  assert not os.path.exists(partial)


@pytest.mark.slow
def test_sigterm_stops_knn_in_one_line(trained_dir, tmp_path):
  """Once the command runs (its handler set), SIGTERM is one line and exit 143, and no
  half-written output is left."""
  out = str(tmp_path / "knn")
  p = subprocess.Popen(
    _uses(trained_dir, out, "knn"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=_env(),
    preexec_fn=_sigint_default,
  )
  deadline = time.time() + 300
  while p.poll() is None and not _catches(p.pid, signal.SIGTERM) and time.time() < deadline:
    time.sleep(0.005)
  assert p.poll() is None, "knn ended without ever handling SIGTERM"
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=600)
  if p.returncode == 0:  # finished before the signal: nothing to check
    pytest.skip("knn finished before the signal arrived")
  assert p.returncode == 143, (p.returncode, err[-2000:])
  lines = _lines(err)
  assert len(lines) == 1 and lines[0].startswith("exvae-uses: stopped: SIGTERM"), lines
  if os.path.exists(os.path.join(out, "knn.json")):
    assert os.path.exists(os.path.join(out, "knn_per_example.npz"))


@pytest.mark.slow
def test_ctrl_c_during_augment_is_one_line_and_exit_130_every_time(trained_dir, tmp_path):
  """Ctrl-C at random moments of an augmentation, eight times: exit 130 with one line
  (or 0 when it came too late to stop anything), never a crash (a negative code)."""
  rng = random.Random(0)
  codes = []
  for i in range(8):
    p = subprocess.Popen(
      _uses(trained_dir, str(tmp_path / f"a{i}"), "augment", "--epochs=60", "--hidden=16"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=_env(),
      preexec_fn=_sigint_default,
    )
    deadline = time.time() + 300  # the command's SIGTERM handler: it is running
    while p.poll() is None and not _catches(p.pid, signal.SIGTERM) and time.time() < deadline:
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 4.0))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=600)
    codes.append(p.returncode)
    lines = _lines(err)
    assert p.returncode in (0, 130), (i, p.returncode, err[-2000:])
    assert len(lines) == (1 if p.returncode == 130 else 0), (i, lines)
    if p.returncode == 130:
      assert lines[0] == "exvae-uses: stopped: interrupted (Ctrl-C).", lines
  assert 130 in codes, codes


_SWALLOWED_SCRIPT = r"""
import gc, sys, time
from exvae import stopping
from exvae.cli import command

def main(inv):
  # The signal's exception raised where Python swallows exceptions: a gc callback (as in
  # JAX's _xla_gc_callback), as when Ctrl-C or the uses' SIGTERM lands there.
  exc = KeyboardInterrupt() if inv.args == ["int"] else stopping.stopped("in a gc callback")
  fired = []
  def callback(phase, info):
    if not fired:
      fired.append(1)
      raise exc
  gc.callbacks.append(callback)
  with stopping.on_sigterm():
    gc.collect()
    for _ in range(3000):          # the command's own work, where the stop belongs (up to
      time.sleep(0.01)             # 30 s: a loaded machine may start the re-sender late)
  print("finished", flush=True)

command.run(command.Spec(name="probe", module="__main__", summary="", usage="",
                         config="none", positional=(1, 1)), main, ["exvae-probe", *sys.argv[1:]])
"""


@pytest.mark.parametrize(
  "what,code,line",
  [
    ("int", 130, "exvae-probe: stopped: interrupted (Ctrl-C)."),
    ("term", 143, "exvae-probe: stopped: SIGTERM"),
  ],
)
def test_a_stop_that_lands_in_a_gc_callback_still_stops_the_command(what, code, line):
  """Python prints an exception raised in a gc callback as "Exception ignored" and goes
  on: the command would finish (exit 0) with a traceback. The stop is delivered again."""
  r = _run_probe(_SWALLOWED_SCRIPT, what)
  assert r.returncode == code, (r.returncode, r.stderr[-2000:])
  assert "finished" not in r.stdout
  lines = _lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith(line), lines


def test_drain_waits_for_the_computations_jax_still_runs():
  """A command that stops (or ends) waits for its dispatched computations: none may
  still run on XLA's threads while the interpreter tears down."""
  import jax.numpy as jnp
  from exvae.cli import exits

  x = jnp.ones((1200, 1200), jnp.float32)
  x.block_until_ready()
  ys = [x @ (x + i) for i in range(6)]  # dispatched, not waited for
  exits.drain()
  assert all(y.is_ready() for y in ys)


_WRAPPED_SCRIPT = r"""
import sys
from exvae import stopping
from exvae.cli import command

def main(inv):
  # What Orbax's restore does with a Ctrl-C (or the uses' SIGTERM) that lands in it:
  # it catches every exception and raises a plain one from it.
  stop = KeyboardInterrupt() if inv.args == ["int"] else stopping.stopped("in a restore")
  try:
    raise stop
  except BaseException as e:
    raise Exception("Encountered error while reading array index: 0.") from e

command.run(command.Spec(name="probe", module="__main__", summary="", usage="",
                         config="none", positional=(1, 1)), main, ["exvae-probe", *sys.argv[1:]])
"""


@pytest.mark.parametrize(
  "what,code,line",
  [
    ("int", 130, "exvae-probe: stopped: interrupted (Ctrl-C)."),
    ("term", 143, "exvae-probe: stopped: SIGTERM in a restore"),
  ],
)
def test_a_stop_that_a_library_wraps_in_another_error_is_still_a_stop(what, code, line):
  r = _run_probe(_WRAPPED_SCRIPT, what)
  assert r.returncode == code, (r.returncode, r.stderr[-2000:])
  assert _lines(r.stderr) == [line], r.stderr[-2000:]


_CAUGHT_SCRIPT = r"""
import sys, time, warnings
from exvae import stopping
from exvae.cli import command

def main(inv):
  with stopping.on_sigterm():
    print("running", flush=True)
    try:                          # a library that turns any Exception into a warning
      time.sleep(60)
    except Exception as e:        # noqa: BLE001
      warnings.warn(f"ignored: {e}")
    print("finished", flush=True)

command.run(command.Spec(name="probe", module="__main__", summary="", usage="",
                         config="none", positional=(0, 0)), main, ["exvae-probe"])
"""


def test_sigterm_passes_through_a_library_that_catches_every_exception():
  """The uses' SIGTERM is raised as Ctrl-C's KeyboardInterrupt is: an ``except Exception``
  in a library (which would warn and go on) does not take it; one line, exit 143."""
  p = subprocess.Popen(
    [PY, "-c", _CAUGHT_SCRIPT],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_probe_env(),
  )
  assert p.stdout.readline().strip() == "running"
  time.sleep(0.5)  # inside the library's try
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 143 and "finished" not in out, (p.returncode, err[-2000:])
  lines = _lines(err)
  assert len(lines) == 1 and lines[0].startswith("exvae-probe: stopped: SIGTERM before"), lines


_ECHO_SCRIPT = r"""
import signal, sys, time
from exvae.cli import command

class Closing:
  # A coroutine closed half-way by the stop, as Orbax's restore coroutines are: its
  # clean-up raises another exception, which Python prints as "Exception ignored in".
  def __del__(self):
    raise Exception("Encountered error while reading array index: 0.")

def main(inv):
  held = Closing()
  print("running", flush=True)
  try:
    time.sleep(60)
  finally:
    del held

command.run(command.Spec(name="probe", module="__main__", summary="", usage="",
                         config="none", positional=(0, 0)), main, ["exvae-probe"])
"""


def test_the_echoes_of_a_ctrl_c_are_not_printed():
  """After Ctrl-C, an exception Python cannot raise (a clean-up the stop interrupted) is
  not printed: the one line says why the command stopped."""
  p = subprocess.Popen(
    [PY, "-c", _ECHO_SCRIPT],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_probe_env(),
    preexec_fn=_sigint_default,
  )
  assert p.stdout.readline().strip() == "running"
  time.sleep(0.3)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 130, (p.returncode, err[-2000:])
  assert _lines(err) == ["exvae-probe: stopped: interrupted (Ctrl-C)."], err[-2000:]
