"""Fault campaign: trains small runs under random faults and checks that nothing goes silently wrong.

    python scripts/fault_campaign.py --faults=100            # a few minutes on a quiet machine
    python scripts/fault_campaign.py --faults=4 --per_episode=4   # a smoke run (the test)
    python scripts/fault_campaign.py --faults=0 --surfaces=100 --record=results/integrity/readers.json

A reference run of a tiny ``configs/test.py`` config trains once without
faults (keeping every checkpoint).  Then each episode trains the same config
in its own workdir while faults are injected between and during the
``train.py`` invocations that resume it:

* kills at random times: SIGKILL, SIGINT (Ctrl-C), SIGTERM;
* 16 flipped bytes in, or a truncation of, a random file of the newest
  checkpoint step; the campaign then restores the run read-only, as
  ``eval.py`` does, and counts whether the damage was detected;
* a torn last line appended to ``metrics.jsonl`` (a kill during a write);
* a full disk: the run continues on a tmpfs with a few KB to spare, then the
  workdir is copied back (space freed); skipped without root;
* a read-only filesystem: a read-only bind mount of the workdir; skipped
  without root.

With ``--readers=N``, N faults in what the readers read back follow, each on a
copy of the reference run evaluated once: a changed number in
``eval_metrics.json`` or damaged bytes of ``per_example.npz`` (the next
``eval.py`` must score again, not reuse), an edited ``config.json`` (refused in
one line), and a NaN score given to ``compare.py`` (refused in one line).

With ``--surfaces=N``, N faults follow in what evaluation, the uses, published
models and compare read and write (:data:`SURFACE_FAULTS`, drawn in turn, each
round in a random order), on a copy of the reference run and of a model
published from it (``results/*/model`` originals are copied, never changed):

* ``eval.py``, ``uses.py knn``, ``uses.py augment`` (12 epochs, h = 16),
  ``uses.py generate`` and ``eval.py`` on the published copy killed at a random
  moment once the command runs (SIGKILL, SIGTERM, SIGINT), then run again;
* a changed number in, or a truncation of, ``eval_metrics.json``; flipped bytes
  in, or a truncation of, ``per_example.npz``; a changed ``test_error`` in a
  classifier's record; flipped bytes in ``eval_partial.npz`` or a classifier's
  ``.partial.npz`` (left by a SIGTERM); then the command again;
* an evaluation into a nearly full tmpfs (skipped without root), then again;
* an edited or truncated ``config.json`` and an edited ``model.json`` of a
  published model (the tiny copy and a copy of
  ``results/fashion_vae_exemplar_rat/model``), flipped bytes in its
  ``params.npz``, an edited or deleted ``config.json`` of a run;
* a NaN score, a score raised by 100, flipped bytes or a truncation of a
  ``per_example.npz`` given to ``compare.py``.

Each such episode ends in one of :data:`OUTCOMES`: the command's outputs
bit-identical to an undisturbed run's (``identical``; ``recomputed`` when the
damage was reported in one line and the outputs computed again), or the input
refused in one line with the documented exit code (``refused``); anything else
(``wrong_silent``, ``lost``, ``multi_line``, ``failed``) is a problem.
``--record=PATH`` writes the counts, the faults and every episode's outcome
(``results/integrity/``).

Every training episode ends with a run to completion.  The table counts the faults
injected, the resumes, the episodes whose final parameters and metrics are
bit-identical to the reference, corruptions detected (and any restored
silently with values that differ from the saved ones), records lost or
duplicated in ``metrics.jsonl``, and the stderr lines beyond the one line an
expected failure may print.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KILLS = ("SIGKILL", "SIGINT", "SIGTERM")
FILE_FAULTS = ("flip", "truncate")
KINDS = KILLS + FILE_FAULTS + ("tear", "disk_full", "read_only")
WEIGHTS = (3, 3, 2, 3, 2, 1, 1, 1)
READER_FAULTS = ("eval_edit", "eval_flip", "config_edit", "compare_nan")
# The campaign's run: 4 epochs of 10 steps, a checkpoint every 3 steps (about 8 MB).
OVERRIDES = (
  "--config.max_train=200",
  "--config.num_epochs=4",
  "--config.checkpoint_every_steps=3",
  "--config.log_every_steps=2",
  "--config.keep_checkpoints=2",
  "--config.num_picture_samples=4",
)


def _env(cache_dir: str) -> dict:
  return dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    EXVAE_PROGRESS="0",
  )


def _cmd(workdir: str, *extra: str) -> list[str]:
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={ROOT}/configs/test.py",
    f"--workdir={workdir}",
    *OVERRIDES,
    *extra,
  ]


# absl's own line format for a warning or an info line (``W1202 05:07:40.726701 1402 f.py:202] ...``),
# which Orbax's warnings take once absl's handler is installed.
_ABSL_NATIVE = re.compile(r"^[WI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _refusal_verdict(returncode: int, lines: list[str], want_code: int) -> str:
  """The outcome of a command that had to refuse its damaged input: one line with
  ``want_code`` is a refusal; exit 0 used the damage silently; anything else is a fault."""
  if returncode == want_code and len(lines) == 1:
    return "refused"
  if returncode == 0:
    return "wrong_silent"
  return "multi_line" if len(lines) > 1 else "failed"


def _extra_lines(stderr: str) -> list[str]:
  """stderr lines but absl's warnings (either format) and exvae's one-line warnings."""
  return [
    l
    for l in stderr.splitlines()
    if l.strip() and not l.startswith(("WARNING:absl", "warning:")) and not _ABSL_NATIVE.match(l)
  ]


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _load_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "cfg_test", os.path.join(ROOT, "configs", "test.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for o in OVERRIDES:
    key, value = o[len("--config.") :].split("=")
    c[key] = type(c[key])(value)
  return c


class Campaign:
  """One campaign: a reference run, then episodes with faults (see the module docstring)."""

  def __init__(self, root: str, seed: int, verbose: bool = False, kinds: tuple[str, ...] = KINDS):
    self.root = root
    self.kinds = tuple(kinds)
    self.weights = tuple(w for k, w in zip(KINDS, WEIGHTS) if k in self.kinds)
    self.rng = random.Random(seed)
    self.verbose = verbose
    self.cache = os.path.join(root, "jax_cache")
    self.counts = {k: 0 for k in KINDS + READER_FAULTS}
    self.skipped = {k: 0 for k in KINDS}
    self.stats = dict(
      resumed=0,
      episodes=0,
      bit_identical=0,
      corruptions=0,
      detected=0,
      harmless=0,
      silent=0,
      records_lost=0,
      records_duplicated=0,
      extra_lines=0,
      failed_runs=0,
      crashed_at_exit=0,
      reader_caught=0,
      reader_silent=0,
    )
    self.problems: list[str] = []
    from exvae import checkpoints, train_lib

    self._ck, self._tl = checkpoints, train_lib
    c = _load_config()
    splits = train_lib.load_data(c)
    setup = train_lib.make_setup(c, splits)
    self.template = train_lib.init_state(c, setup, splits.train_x.shape[0])

  # -- helpers ---------------------------------------------------------------

  def log(self, msg: str) -> None:
    if self.verbose:
      print(msg, flush=True)

  def run(self, workdir: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
      _cmd(workdir, *extra),
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=_env(self.cache),
      timeout=timeout,
    )

  def read(self, workdir: str):
    """``(step, state digest, fallbacks)`` of the newest good step, or None if none is good."""
    import contextlib
    import io

    m = self._ck.Manager(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
      with contextlib.redirect_stderr(io.StringIO()):
        out = m.restore_latest(self.template, self.template.params)
    except self._ck.CheckpointNotFoundError:
      return None
    finally:
      m.close()
    if out is None:
      return None
    return int(out[0].step), self._ck.tree_digest(out[0]), list(m.fallbacks)

  def reference(self) -> None:
    """The uninterrupted run: every step's state digest and the metrics records."""
    wd = os.path.join(self.root, "reference")
    t0 = time.time()
    r = self.run(wd, "--config.keep_checkpoints=1000")
    if r.returncode != 0:
      raise SystemExit(f"the reference run failed: {r.stderr[-2000:]}")
    self.duration = time.time() - t0
    self.ref_digests = {}
    for step in _steps(wd):
      out = self._ck.Manager(os.path.join(wd, "checkpoints"), read_only=True)._restore(
        step, self.template, self.template.params
      )
      self.ref_digests[step] = self._ck.tree_digest(out["state"])
    self.ref_final = max(self.ref_digests)
    self.ref_records = self._records(wd)
    self.train_time = max(r[0].get("time", 0.0) for r in self.ref_records.values())
    self.startup = max(1.0, self.duration - self.train_time)
    self.log(f"reference: {self.duration:.1f} s, steps {sorted(self.ref_digests)}")

  @staticmethod
  def _records(workdir: str) -> dict:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        rec = json.loads(line)
        if "summary" in rec:
          continue
        key = ("val" if "val_loss" in rec else "train", rec["step"])
        out.setdefault(key, []).append(
          {k: v for k, v in rec.items() if k not in ("time", "picture")}
        )
    return out

  # -- faults ----------------------------------------------------------------

  def kill(self, workdir: str, sig: str) -> str:
    """Starts a resume and sends ``sig`` at a random time while it trains.

    Returns:
      ``"injected"``, or ``"finished"`` when the run ended before the signal.
    """
    steps = _steps(workdir)
    left = 1.0 - (steps[-1] / self.ref_final if steps else 0.0)
    p = subprocess.Popen(
      _cmd(workdir),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=_env(self.cache),
    )
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:  # in main(): the writer lock is taken
      try:
        if f'"pid": {p.pid}' in open(lock).read():
          break
      except OSError:
        pass
      time.sleep(0.02)
    # The reference's startup counts the imports too, which end before the lock is taken.
    time.sleep(self.rng.uniform(0.0, 1.0) * (0.5 * self.startup + left * self.train_time))
    if p.poll() is None:
      p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=600)
    if p.returncode == 0:
      return "finished"
    # SIGTERM before the training loop has its handler: the default, a silent exit.
    expected = {"SIGKILL": (-9,), "SIGINT": (130,), "SIGTERM": (143, -15)}[sig]
    lines = _extra_lines(err)
    if p.returncode == -signal.SIGSEGV and lines and "stopped:" in lines[0]:
      # Decided and said, then the interpreter's teardown crashed: counted on its own row.
      self.stats["crashed_at_exit"] += 1
      self.problems.append(f"{sig}: the process crashed at exit after {lines[0]!r}")
      return "injected"
    if p.returncode not in expected:
      self.problems.append(f"{sig}: exit {p.returncode}: {err[-500:]}")
      self.stats["failed_runs"] += 1
    allowed = 0 if sig == "SIGKILL" else 1
    # A signal before the program got to its main loop (while importing) stops it silently.
    if len(lines) > allowed:
      self.stats["extra_lines"] += len(lines) - allowed
      self.problems.append(f"{sig}: {len(lines)} stderr lines: {lines[:3]}")
    return "injected"

  def damage(self, workdir: str, kind: str) -> bool:
    """Flips 16 bytes in, or truncates, a random file of the newest step; checks detection."""
    steps = _steps(workdir)
    if len(steps) < 2:
      return False  # damage the newest step only while a good one is left
    newest = steps[-1]
    d = os.path.join(workdir, "checkpoints", str(newest))
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
      return False
    path = self.rng.choice(files)
    data = bytearray(open(path, "rb").read())
    if kind == "flip":
      at = self.rng.randrange(0, max(1, len(data) - 16))
      for i in range(at, min(at + 16, len(data))):
        data[i] ^= 0xFF
    else:
      data = data[: self.rng.randrange(0, len(data))]
    with open(path, "wb") as f:
      f.write(bytes(data))
    self.stats["corruptions"] += 1
    got = self.read(workdir)
    if got is None or newest in got[2]:
      self.stats["detected"] += 1
    elif got[1] == self.ref_digests.get(got[0]):
      self.stats["harmless"] += 1  # bytes no restore reads: the values are the saved ones
    else:
      self.stats["silent"] += 1
      self.problems.append(f"{kind} of {os.path.relpath(path, workdir)} restored silently")
    return True

  def tear(self, workdir: str) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
      return False
    with open(path, "a") as f:
      f.write('{"loss": 12.5, "step"')
    return True

  def _mount(self, *args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0

  def disk_full(self, workdir: str) -> bool:
    """Continues the run on a tmpfs with a few KB to spare, then copies it back."""
    # What the files take on a disk (whole pages), and a few KB to spare.
    used = sum(
      4096 * (1 + os.path.getsize(os.path.join(r, f)) // 4096)
      for r, _, fs in os.walk(workdir)
      for f in fs
    )
    mnt = tempfile.mkdtemp(dir=self.root, prefix="tmpfs-")
    size_kb = int(1.1 * used) // 1024 + 64 + self.rng.randint(40, 400)
    if not self._mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt):
      os.rmdir(mnt)
      return False
    try:
      try:
        shutil.copytree(workdir, os.path.join(mnt, "run"), symlinks=True)
      except (OSError, shutil.Error):
        return False  # the tmpfs was too small for the copy itself
      r = self.run(os.path.join(mnt, "run"))
      if r.returncode not in (0, 1):
        self.problems.append(f"disk_full: exit {r.returncode}: {r.stderr[-500:]}")
        self.stats["failed_runs"] += 1
      lines = _extra_lines(r.stderr)
      if r.returncode == 1 and (len(lines) != 1 or "isk full" not in lines[0]):
        self.stats["extra_lines"] += max(0, len(lines) - 1)
        self.problems.append(f"disk_full: {lines[:3]}")
      shutil.rmtree(workdir)
      shutil.copytree(os.path.join(mnt, "run"), workdir, symlinks=True)  # space freed
    finally:
      subprocess.run(["umount", mnt], capture_output=True)
      os.rmdir(mnt)
    return True

  def read_only(self, workdir: str) -> bool:
    """A resume on a read-only bind mount: one line, nothing changed."""
    mnt = tempfile.mkdtemp(dir=self.root, prefix="ro-")
    if not self._mount("--bind", workdir, mnt):
      os.rmdir(mnt)
      return False
    try:
      if not self._mount("-o", "remount,ro,bind", mnt):
        return False
      r = self.run(mnt)
      lines = _extra_lines(r.stderr)
      if r.returncode != 1 or len(lines) != 1 or "Read-only" not in lines[0]:
        self.stats["extra_lines"] += max(0, len(lines) - 1)
        self.problems.append(f"read_only: exit {r.returncode}: {lines[:3]}")
    finally:
      subprocess.run(["umount", mnt], capture_output=True)
      os.rmdir(mnt)
    return True

  # -- what readers read back -------------------------------------------------

  def _reader(self, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      [sys.executable, os.path.join(ROOT, script), *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=_env(self.cache),
      timeout=600,
    )

  def _eval(self, wd: str) -> subprocess.CompletedProcess:
    return self._reader(
      "eval.py",
      f"--workdir={wd}",
      "--config.eval.num_importance_samples=4",
      "--config.eval.max_test_examples=20",
      f"--config.eval.out_dir={os.path.join(wd, 'eval')}",
    )

  def reader_fault(self, i: int, kind: str) -> None:
    """One fault in a reader's input on a copy of the reference run (see the docstring)."""
    import numpy as np

    wd = os.path.join(self.root, f"reader{i:03d}")
    shutil.copytree(os.path.join(self.root, "reference"), wd)
    out = os.path.join(wd, "eval")
    first = self._eval(wd)
    if first.returncode != 0:
      self.stats["failed_runs"] += 1
      self.problems.append(f"{kind}: the first evaluation failed: {first.stderr[-500:]}")
      return
    metrics_path, npz = os.path.join(out, "eval_metrics.json"), os.path.join(out, "per_example.npz")
    want = json.load(open(metrics_path))["test_nll"]
    if kind == "eval_edit":
      m = json.load(open(metrics_path))
      m["test_nll"] = want + 0.01 * self.rng.choice((-1, 1))
      with open(metrics_path, "w") as f:
        json.dump(m, f, indent=2)
    elif kind == "eval_flip":
      data = bytearray(open(npz, "rb").read())
      at = self.rng.randrange(0, len(data) - 16)
      data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
      open(npz, "wb").write(bytes(data))
    elif kind == "config_edit":
      c = json.load(open(os.path.join(wd, "config.json")))
      c["exemplar"]["binarize_exemplars"] = not c["exemplar"]["binarize_exemplars"]
      json.dump(c, open(os.path.join(wd, "config.json"), "w"))
    if kind == "compare_nan":
      with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
      arrays["log_px"][self.rng.randrange(arrays["log_px"].shape[0])] = np.nan
      os.makedirs(os.path.join(wd, "nan"))
      np.savez(os.path.join(wd, "nan", "per_example.npz"), **arrays)
      r = self._reader("compare.py", out, os.path.join(wd, "nan"))
      lines = _extra_lines(r.stderr)
      ok = r.returncode == 2 and len(lines) == 1 and "non-finite" in lines[0]
    elif kind == "config_edit":
      r = self._eval(wd)
      lines = _extra_lines(r.stderr)
      ok = r.returncode == 1 and len(lines) == 1 and "edited" in lines[0]
    else:  # scored again: the printed and stored NLL are the true ones
      r = self._eval(wd)
      got = json.load(open(metrics_path))["test_nll"] if os.path.exists(metrics_path) else None
      ok = (
        r.returncode == 0
        and "already done" not in r.stdout
        and got == want
        and f"test NLL = {want:.2f}" in r.stdout
      )
    self.counts[kind] += 1
    self.stats["reader_caught" if ok else "reader_silent"] += 1
    if not ok:
      self.problems.append(f"{kind}: not caught (exit {r.returncode}): {r.stderr[-300:]}")
    shutil.rmtree(wd, ignore_errors=True)

  # -- episodes --------------------------------------------------------------

  def episode(self, i: int, faults: int) -> int:
    """Trains one workdir to completion under up to ``faults`` faults.

    Returns:
      The number of faults injected (fewer when the run finished first).
    """
    wd = os.path.join(self.root, f"episode{i:03d}")
    injected = attempts = 0
    while injected < faults and attempts < 4 * faults:
      attempts += 1
      kind = self.rng.choices(self.kinds, self.weights)[0]
      if kind in KILLS:
        if _steps(wd):
          self.stats["resumed"] += 1
        if self.kill(wd, kind) == "finished":
          break
        done = True
      elif kind in FILE_FAULTS:
        done = self.damage(wd, kind)
      elif kind == "tear":
        done = self.tear(wd)
      elif kind == "disk_full":
        done = bool(_steps(wd)) and self.disk_full(wd)
      else:
        done = bool(_steps(wd)) and self.read_only(wd)
      if not done:
        self.skipped[kind] += 1
        continue
      self.counts[kind] += 1
      injected += 1
      self.log(f"episode {i}: {kind} (steps {_steps(wd)})")
    if _steps(wd):
      self.stats["resumed"] += 1
    r = self.run(wd)
    self.stats["episodes"] += 1
    if r.returncode != 0:
      self.stats["failed_runs"] += 1
      self.problems.append(f"episode {i}: the final run failed: {r.stderr[-800:]}")
      return injected
    got = self.read(wd)
    records = self._records(wd)
    lost = sum(1 for k in self.ref_records if k not in records)
    dup = sum(len(v) - 1 for v in records.values())
    self.stats["records_lost"] += lost
    self.stats["records_duplicated"] += dup
    same_records = all(records.get(k, [None])[0] == v[0] for k, v in self.ref_records.items())
    if (
      got is not None
      and got[0] == self.ref_final
      and got[1] == self.ref_digests[self.ref_final]
      and same_records
      and not dup
      and set(records) == set(self.ref_records)
    ):
      self.stats["bit_identical"] += 1
    else:
      self.problems.append(
        f"episode {i}: not bit-identical (step {got and got[0]}, "
        f"records lost {lost}, duplicated {dup})"
      )
    return injected

  def table(self) -> str:
    s = self.stats
    injected = sum(self.counts.values())
    rows = [
      ("faults injected", f"{injected} ({', '.join(f'{k} {v}' for k, v in self.counts.items())})"),
      (
        "faults skipped (no root / nothing to damage yet)",
        str(sum(v for k, v in self.skipped.items() if k in ("disk_full", "read_only"))),
      ),
      ("runs resumed", str(s["resumed"])),
      ("episodes bit-identical to the reference", f"{s['bit_identical']} of {s['episodes']}"),
      (
        "corruptions detected",
        f"{s['detected']} of {s['corruptions']} (harmless: {s['harmless']}, silent: {s['silent']})",
      ),
      ("records lost / duplicated", f"{s['records_lost']} / {s['records_duplicated']}"),
      ("stderr lines beyond one", str(s["extra_lines"])),
      ("runs that failed unexpectedly", str(s["failed_runs"])),
      ("crashes at exit after the one line (SIGSEGV)", str(s["crashed_at_exit"])),
      (
        "reader faults caught (scored again or refused)",
        f"{s['reader_caught']} of {s['reader_caught'] + s['reader_silent']}",
      ),
    ]
    if getattr(self, "surfaces", None) is not None:
      rows += self.surfaces.table_rows()
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


# -- the readers: evaluation, the uses, published models, compare ------------------------

# (surface, fault) pairs, drawn in turn (each round in a random order) by --surfaces=N.
SURFACE_FAULTS = (
  ("eval", "SIGKILL"),
  ("eval", "SIGTERM"),
  ("eval", "SIGINT"),
  ("eval", "metrics_edit"),
  ("eval", "metrics_truncate"),
  ("eval", "npz_flip"),
  ("eval", "npz_truncate"),
  ("eval", "partial_flip"),
  ("eval", "disk_full"),
  ("knn", "SIGKILL"),
  ("knn", "SIGTERM"),
  ("knn", "SIGINT"),
  ("augment", "SIGKILL"),
  ("augment", "SIGTERM"),
  ("augment", "SIGINT"),
  ("augment", "record_edit"),
  ("augment", "partial_flip"),
  ("generate", "SIGKILL"),
  ("generate", "SIGTERM"),
  ("generate", "SIGINT"),
  ("published", "SIGKILL"),
  ("published", "config_edit"),
  ("published", "config_truncate"),
  ("published", "model_json_edit"),
  ("published", "params_flip"),
  ("published_real", "config_edit"),
  ("published_real", "model_json_edit"),
  ("run", "config_edit"),
  ("run", "config_delete"),
  ("compare", "nan"),
  ("compare", "npz_flip"),
  ("compare", "score_edit"),
  ("compare", "npz_truncate"),
)
# Outcomes of one surface episode; the first three are correct.
OUTCOMES = ("identical", "recomputed", "refused", "wrong_silent", "lost", "multi_line", "failed")
_EXPECTED_EXIT = {"SIGKILL": (-9,), "SIGINT": (130,), "SIGTERM": (143,)}
_EVAL_ARGS = ("--config.eval.num_importance_samples=32", "--config.eval.max_test_examples=100")
_AUGMENT_ARGS = ("--epochs=12", "--hidden=16")  # a partial state every 10 epochs
_SURFACE_COMMANDS = {
  "eval": "eval",
  "published": "eval",
  "knn": "knn",
  "augment": "augment",
  "generate": "generate",
}


def _flip(rng: random.Random, path: str, n: int = 16) -> None:
  data = bytearray(open(path, "rb").read())
  at = rng.randrange(0, max(1, len(data) - n))
  for i in range(at, min(at + n, len(data))):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate(rng: random.Random, path: str) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[: rng.randrange(0, len(data))])


def _arrays(path: str) -> dict | None:
  import numpy as np

  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except Exception:  # noqa: BLE001
    return None


def _same_arrays(a: dict | None, b: dict | None) -> bool:
  import numpy as np

  return (
    a is not None
    and b is not None
    and set(a) == set(b)
    and all(
      np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind in "fc" and b[k].dtype.kind in "fc")
      for k in a
    )
  )


def _flat(obj, prefix: str = "") -> dict:
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  if isinstance(obj, list):
    out = {}
    for i, v in enumerate(obj):
      out.update(_flat(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: obj}


def _reported(stderr: str) -> list[str]:
  """stderr lines but absl's own (exvae's ``warning:`` lines count)."""
  return [
    l
    for l in stderr.splitlines()
    if l.strip() and not l.startswith("WARNING:absl") and not _ABSL_NATIVE.match(l)
  ]


def _catches_sigterm(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(mask >> (signal.SIGTERM - 1) & 1)


class Surfaces:
  """Faults in what eval.py, uses.py and compare.py read and write (``--surfaces=N``).

  The readers run on a copy of the reference run (``readers/run``), each command into
  one fixed output directory that every episode of its surface starts again from
  (empty, or a copy of the undisturbed outputs), so that outputs match bit for bit.
  Undisturbed outputs: each command runs twice; keys that differ between the two
  (times, dates) are not compared.
  """

  def __init__(self, campaign: Campaign):
    self.c = campaign
    self.rng = campaign.rng
    self.base = os.path.join(campaign.root, "readers")
    self.run_dir = os.path.join(self.base, "run")
    self.episodes: list[dict] = []

  # -- commands ----------------------------------------------------------------

  def argv(self, command: str, out: str, workdir: str | None = None) -> list[str]:
    wd = workdir or self.run_dir
    if command == "eval":
      return [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        f"--workdir={wd}",
        *_EVAL_ARGS,
        f"--config.eval.out_dir={out}",
      ]
    extra = _AUGMENT_ARGS if command == "augment" else ()
    return [
      sys.executable,
      os.path.join(ROOT, "uses.py"),
      command,
      f"--workdir={wd}",
      f"--out={out}",
      *extra,
    ]

  def call(self, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
      argv, capture_output=True, text=True, cwd=ROOT, env=_env(self.c.cache), timeout=900
    )

  def outputs(self, command: str, out: str) -> dict:
    """What a command's outputs hold: flattened JSON values and the arrays / bytes."""
    got: dict = {}
    if not os.path.isdir(out):
      return got
    for name in sorted(os.listdir(out)):
      path = os.path.join(out, name)
      if name.endswith(".json"):
        try:
          got[name] = _flat(json.load(open(path)))
        except (OSError, ValueError):
          got[name] = "unreadable"
      elif name.endswith(".npz"):
        got[name] = _arrays(path)
      elif name.endswith(".png"):
        got[name] = open(path, "rb").read()
      elif name == "augment_runs":
        got[name] = self.outputs(command, path)
    return got

  def same(self, command: str, got: dict) -> bool:
    want = self.want[command]
    if set(got) != set(want):
      return False
    for name, w in want.items():
      g = got[name]
      if name in self.volatile[command]:  # differed between two undisturbed runs
        continue
      if name == "augment_runs":
        if not self.same_runs(g, w):
          return False
      elif name.endswith(".json"):
        skip = self.volatile[command]
        if not isinstance(g, dict) or {
          k: v for k, v in g.items() if k not in skip and not k.startswith("reused")
        } != {k: v for k, v in w.items() if k not in skip and not k.startswith("reused")}:
          return False
      elif name.endswith(".npz"):
        if not _same_arrays(g, w):
          return False
      elif g != w:
        return False
    return True

  def same_runs(self, got: dict, want: dict) -> bool:
    if set(got) != set(want):
      return False
    skip = self.volatile.get("augment_runs", set())
    return all(
      {k: v for k, v in got[n].items() if k not in skip}
      == {k: v for k, v in want[n].items() if k not in skip}
      for n in want
    )

  # -- the undisturbed outputs ------------------------------------------------------

  @staticmethod
  def needs(faults) -> set[str]:
    """The undisturbed outputs that the (surface, fault) pairs are checked against."""
    out = set()
    for surface, kind in faults:
      if surface in ("eval", "knn", "augment", "generate"):
        out.add(surface)
      elif surface in ("compare", "run"):
        out.add("eval")
      elif surface == "published" and kind in _EXPECTED_EXIT:
        out.add("published")
    return out

  def reference(self, needed=("eval", "knn", "augment", "generate", "published")) -> None:
    from exvae import published, rundir

    shutil.copytree(os.path.join(self.c.root, "reference"), self.run_dir)
    pub = os.path.join(self.base, "published_model")
    trained = self._restore_best()
    published.save(pub, trained, rundir.read_stored_config(self.run_dir), {"best_epoch": 1})
    self.published = pub
    self.want, self.volatile, self.ref_dirs = {}, {}, {}
    self.duration = {}
    for command in [c for c in ("eval", "knn", "augment", "generate", "published") if c in needed]:
      runs = []
      for n in (1, 2):
        out = os.path.join(self.base, f"ref_{command}{n}")
        wd = pub if command == "published" else None
        p = subprocess.Popen(
          self.argv(_SURFACE_COMMANDS[command], out, wd),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          cwd=ROOT,
          env=_env(self.c.cache),
        )
        t0 = time.time()
        while p.poll() is None and not _catches_sigterm(p.pid):
          time.sleep(0.01)
        t1 = time.time()
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
          raise SystemExit(f"the undisturbed {command} failed: {err[-2000:]}")
        runs.append(self.outputs(command, out))
        self.c.log(
          f"undisturbed {command}: {time.time() - t0:.1f} s, "
          f"{time.time() - t1:.1f} s of it with its SIGTERM handler"
        )
      # The kills land in the part of the second run that handles SIGTERM.
      self.duration[command] = time.time() - t1
      a, b = runs
      # What a reuse changes: the list of the classifiers read back instead of trained.
      vol = {k for v in a.values() if isinstance(v, dict) for k in v if k.startswith("reused")}
      for name, v in a.items():
        if (
          not name.endswith(".json")
          and name != "augment_runs"
          and not (_same_arrays(v, b.get(name)) if name.endswith(".npz") else v == b.get(name))
        ):
          vol.add(name)
        if name.endswith(".json") and isinstance(v, dict):
          w = b.get(name, {})
          vol |= {k for k in set(v) | set(w) if v.get(k) != w.get(k)}
        if name == "augment_runs":
          for n, rec in v.items():
            w = b["augment_runs"].get(n, {})
            self.volatile.setdefault("augment_runs", set()).update(
              k for k in set(rec) | set(w) if rec.get(k) != w.get(k)
            )
      self.volatile[command] = vol
      self.want[command] = a
      self.ref_dirs[command] = os.path.join(self.base, f"ref_{command}1")
      # Paths name the output directory; each episode writes into ref_<command>1's own path.
    self.c.log(f"volatile keys: { {k: sorted(v) for k, v in self.volatile.items()} }")

  def _restore_best(self):
    from exvae import bank as bank_lib
    from exvae import config_registry

    config = config_registry.from_json(os.path.join(self.run_dir, "config.json"))
    return bank_lib.restore_trained(config, self.run_dir).params

  # -- one episode -------------------------------------------------------------------

  def fresh(self, command: str, with_outputs: bool) -> str:
    """The command's output directory (the first undisturbed run's path), made anew."""
    out = self.ref_dirs[command]
    keep = out + ".kept"
    if not os.path.exists(keep):
      os.rename(out, keep)
    shutil.rmtree(out, ignore_errors=True)
    if with_outputs:
      shutil.copytree(keep, out)
    return out

  def record(
    self, surface: str, kind: str, outcome: str, note: str = "", landed: bool = True
  ) -> None:
    """One episode's outcome; ``landed``: False when the command ended before the fault
    (a kill after it finished, no partial file to damage, a tmpfs that had room)."""
    self.episodes.append(
      dict(surface=surface, fault=kind, outcome=outcome, landed=landed, note=note[-400:])
    )
    if outcome not in ("identical", "recomputed", "refused"):
      self.c.problems.append(f"{surface} {kind}: {outcome}: {note[-300:]}")
    self.c.log(f"readers {len(self.episodes)}: {surface} {kind}: {outcome} ({note[-200:]})")

  def episode(self, surface: str, kind: str) -> None:
    try:
      if surface == "compare":
        self.compare(kind)
      elif surface in ("published", "published_real", "run") and kind not in _EXPECTED_EXIT:
        self.refusal(surface, kind)
      elif kind in _EXPECTED_EXIT:
        self.kill(surface, kind)
      else:
        self.damaged(surface, kind)
    except subprocess.TimeoutExpired as e:
      self.record(surface, kind, "failed", f"timeout: {e}")

  def rerun_verdict(
    self, surface: str, command: str, out: str, r, disturbed: bool, note: str
  ) -> str:
    """After a fault: the rerun must end with the undisturbed outputs (one line at most)."""
    lines = _reported(r.stderr)
    if r.returncode != 0:
      return "failed"
    if len(lines) > 1:
      return "multi_line"
    got = self.outputs(surface, out)
    if not self.same(surface, got):
      missing = set(self.want[surface]) - set(got)
      return "lost" if missing else "wrong_silent"
    if surface in ("eval", "published"):
      want = self.want[surface]["eval_metrics.json"]["test_nll"]
      if f"test NLL = {want:.2f}" not in r.stdout:
        return "wrong_silent"
      if not any(n.startswith("events.out.tfevents") for n in os.listdir(out)):
        return "lost"  # the TensorBoard scalars of the evaluation
      if os.path.exists(os.path.join(out, "eval_partial.npz")):
        return "wrong_silent"
    if surface == "knn":
      import hashlib

      rec = json.load(open(os.path.join(out, "knn.json")))
      sha = hashlib.sha256(open(os.path.join(out, "knn_per_example.npz"), "rb").read()).hexdigest()
      if rec.get("per_example_sha256") != sha:
        return "wrong_silent"
    return "recomputed" if disturbed and lines else "identical"

  def kill(self, surface: str, sig: str) -> None:
    """Starts the command, sends ``sig`` at a random moment once it runs, then reruns it."""
    command = _SURFACE_COMMANDS[surface]
    wd = self.published if surface == "published" else None
    out = self.fresh(surface, with_outputs=False)
    argv = self.argv(command, out, wd)
    p = subprocess.Popen(
      argv,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
      env=_env(self.c.cache),
    )
    deadline = time.time() + 600
    while p.poll() is None and not _catches_sigterm(p.pid) and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(self.rng.uniform(0.0, 1.0) * self.duration[surface])
    if p.poll() is None:
      p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=900)
    lines = _reported(err)
    note = f"exit {p.returncode}"
    if p.returncode not in (0,) + _EXPECTED_EXIT[sig]:
      self.record(surface, sig, "failed", f"exit {p.returncode}: {err[-500:]}")
      return
    if len(lines) > (0 if sig == "SIGKILL" else 1):
      self.record(surface, sig, "multi_line", f"{len(lines)} lines: {lines[:3]}")
      return
    if p.returncode == 0:
      note += " (finished before the signal)"
    r = self.call(argv)
    self.record(
      surface,
      sig,
      self.rerun_verdict(surface, surface, out, r, False, note),
      f"{note}; rerun exit {r.returncode}: {' | '.join(_reported(r.stderr))[:300]}",
      landed=p.returncode != 0,
    )

  def damaged(self, surface: str, kind: str) -> None:
    """Damages an output the command reads back, then reruns it: scored again, never reused."""
    command = _SURFACE_COMMANDS[surface]
    if kind == "disk_full":
      return self.disk_full(surface)
    if kind == "partial_flip":
      out = self.fresh(surface, with_outputs=False)
      argv = self.argv(command, out)
      partial = (
        os.path.join(out, "eval_partial.npz")
        if surface == "eval"
        else os.path.join(out, "augment_runs", "seed0_without.partial.npz")
      )
      # A partial file to damage: SIGTERM at a random moment saves one.
      p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(self.c.cache),
      )
      deadline = time.time() + 600
      while p.poll() is None and not _catches_sigterm(p.pid) and time.time() < deadline:
        time.sleep(0.01)
      time.sleep(self.rng.uniform(0.0, 1.0) * self.duration[surface])
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
      _, err = p.communicate(timeout=900)
      if p.returncode not in (0, 143) or len(_extra_lines(err)) > 1:
        self.record(
          surface,
          kind,
          "failed" if p.returncode not in (0, 143) else "multi_line",
          f"the SIGTERM before the damage: exit {p.returncode}: {err[-400:]}",
        )
        return
      if not os.path.exists(partial):
        note = "no partial file left (the run finished first); nothing damaged"
      else:
        _flip(self.rng, partial)
        note = f"flipped 16 bytes of {os.path.basename(partial)}"
    else:
      out = self.fresh(surface, with_outputs=True)
      argv = self.argv(command, out)
      if kind == "metrics_edit":
        path = os.path.join(out, "eval_metrics.json")
        m = json.load(open(path))
        key = self.rng.choice(["test_nll", "test_elbo", "test_kl"])
        m[key] = m[key] + self.rng.choice((-1, 1)) * 10 ** self.rng.randint(-6, 0)
        json.dump(m, open(path, "w"), indent=2)
        note = f"{key} changed"
      elif kind == "metrics_truncate":
        _truncate(self.rng, os.path.join(out, "eval_metrics.json"))
        note = "eval_metrics.json truncated"
      elif kind == "npz_flip":
        _flip(self.rng, os.path.join(out, "per_example.npz"))
        note = "per_example.npz: 16 bytes flipped"
      elif kind == "npz_truncate":
        _truncate(self.rng, os.path.join(out, "per_example.npz"))
        note = "per_example.npz truncated"
      elif kind == "record_edit":
        name = self.rng.choice(["seed0_without.json", "seed0_with.json"])
        path = os.path.join(out, "augment_runs", name)
        rec = json.load(open(path))
        rec["result"]["test_error"] = rec["result"]["test_error"] + self.rng.choice((-0.01, 0.01))
        json.dump(rec, open(path, "w"), indent=1)
        note = f"{name}: test_error changed"
      else:
        raise ValueError(kind)
    r = self.call(argv)
    verdict = self.rerun_verdict(surface, command, out, r, True, note)
    if (
      verdict in ("identical", "recomputed")
      and "already done" in r.stdout
      and "nothing damaged" not in note
    ):
      verdict = "wrong_silent"
    if verdict == "identical" and "nothing damaged" not in note:
      verdict = "recomputed"  # scored again without a word: still the true numbers
    self.record(
      surface,
      kind,
      verdict,
      f"{note}; rerun exit {r.returncode}: {' | '.join(_reported(r.stderr))[:300]}",
      landed="nothing damaged" not in note,
    )

  def disk_full(self, surface: str) -> None:
    """The evaluation writes into a tmpfs that is nearly full: one line, exit 1; the next
    run on a disk with space ends with the undisturbed outputs."""
    out = self.fresh(surface, with_outputs=False)
    os.makedirs(out)
    size_kb = self.rng.randint(4, 48)
    if not self.c._mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", out):
      self.c.skipped.setdefault("eval:disk_full", 0)
      os.rmdir(out)
      return
    try:
      r = self.call(self.argv("eval", out))
      lines = _extra_lines(r.stderr)
    finally:
      subprocess.run(["umount", out], capture_output=True)
    note = f"{size_kb} KB tmpfs: exit {r.returncode}, {lines[:1]}"
    if (
      r.returncode not in (0, 1)
      or len(lines) > 1
      or (r.returncode == 1 and "isk full" not in lines[0])
    ):
      self.record(surface, "disk_full", "multi_line" if len(lines) > 1 else "failed", note)
      return
    shutil.rmtree(out, ignore_errors=True)
    r2 = self.call(self.argv("eval", out))
    verdict = self.rerun_verdict(surface, "eval", out, r2, False, note)
    if verdict == "identical" and r.returncode == 1:
      verdict = "refused"
    self.record(surface, "disk_full", verdict, note, landed=r.returncode == 1)

  def refusal(self, surface: str, kind: str) -> None:
    """An edited config.json / model.json or damaged parameters: refused in one line."""
    if surface == "run":
      wd = os.path.join(self.base, "run_edit")
      shutil.rmtree(wd, ignore_errors=True)
      shutil.copytree(self.run_dir, wd, ignore=shutil.ignore_patterns("eval*", "per_example*"))
    else:
      src = (
        self.published
        if surface == "published"
        else os.path.join(ROOT, "results", "fashion_vae_exemplar_rat", "model")
      )
      wd = os.path.join(self.base, f"{surface}_copy")
      shutil.rmtree(wd, ignore_errors=True)
      shutil.copytree(src, wd)  # a copy: the published originals are never touched
    cfg = os.path.join(wd, "config.json")
    extra: list[str] = []
    want_code = 1
    if kind == "config_edit":
      c = json.load(open(cfg))
      key = self.rng.choice(["exemplar.binarize_exemplars", "max_train", "latent_dim"])
      if key == "exemplar.binarize_exemplars":
        c["exemplar"]["binarize_exemplars"] = not c["exemplar"]["binarize_exemplars"]
      elif key == "max_train":
        c["max_train"] = int(c.get("max_train") or 0) + 30
      else:
        c["latent_dim"] = int(c["latent_dim"]) + 1
      json.dump(c, open(cfg, "w"), indent=2)
      note = f"config.json: {key} edited"
    elif kind == "config_truncate":
      _truncate(self.rng, cfg)
      note = "config.json truncated"
    elif kind == "config_delete":
      # The reader checks --config against the values the checkpoint records.
      os.remove(cfg)
      other = self.rng.random() < 0.5
      extra = [f"--config={ROOT}/configs/test.py", *OVERRIDES] + (
        ["--config.exemplar.binarize_exemplars=True"] if other else []
      )
      want_code = 1 if other else 0
      note = (
        "config.json deleted, --config given with another exemplar.binarize_exemplars"
        if other
        else "config.json deleted, the run's --config given"
      )
    elif kind == "model_json_edit":
      path = os.path.join(wd, "model.json")
      m = json.load(open(path))
      key = self.rng.choice(["config_sha256", "params_sha256"])
      m[key] = m[key][:-4] + ("0000" if not m[key].endswith("0000") else "1111")
      json.dump(m, open(path, "w"), indent=2)
      note = f"model.json: {key} edited"
    elif kind == "params_flip":
      _flip(self.rng, os.path.join(wd, "params.npz"))
      note = "params.npz: 16 bytes flipped"
    else:
      raise ValueError(kind)
    out = os.path.join(self.base, f"{surface}_out")
    shutil.rmtree(out, ignore_errors=True)
    argv = self.argv("eval", out, wd) + extra
    r = self.call(argv)
    lines = _extra_lines(r.stderr)
    note += f"; exit {r.returncode}: {' | '.join(lines)[:300]}"
    said = [l for l in _reported(r.stderr) if l not in lines]  # warning lines
    if want_code == 0:  # checked against what the checkpoint records: the run's numbers
      got = self.outputs("eval", out).get("eval_metrics.json", {})
      want = self.want["eval"]["eval_metrics.json"]
      if r.returncode != 0:
        verdict = "failed"
      elif lines or len(said) > 1:
        verdict = "multi_line"
      elif got.get("test_nll") != want["test_nll"]:
        verdict = "wrong_silent"
      else:
        verdict = "recomputed" if said else "identical"
    else:
      verdict = _refusal_verdict(r.returncode, lines, want_code)
    self.record(surface, kind, verdict, note)
    shutil.rmtree(wd, ignore_errors=True)

  def compare(self, kind: str) -> None:
    """A damaged per_example.npz given to compare.py: refused in one line, exit 2."""
    import numpy as np

    src = (
      self.ref_dirs["eval"] + ".kept"
      if os.path.exists(self.ref_dirs["eval"] + ".kept")
      else self.ref_dirs["eval"]
    )
    a = os.path.join(self.base, "compare_a")
    b = os.path.join(self.base, "compare_b")
    for d in (a, b):
      shutil.rmtree(d, ignore_errors=True)
      shutil.copytree(src, d)
    npz = os.path.join(b, "per_example.npz")
    if kind == "nan":
      arrays = _arrays(npz)
      arrays["log_px"][self.rng.randrange(arrays["log_px"].shape[0])] = np.nan
      np.savez(npz, **arrays)
      note = "one NaN score"
    elif kind == "score_edit":
      arrays = _arrays(npz)
      arrays["log_px"][self.rng.randrange(arrays["log_px"].shape[0])] += 100.0
      np.savez(npz, **arrays)
      note = "one score raised by 100 (eval_metrics.json records another digest)"
    elif kind == "npz_flip":
      _flip(self.rng, npz)
      note = "16 bytes flipped"
    elif kind == "npz_truncate":
      _truncate(self.rng, npz)
      note = "truncated"
    else:
      raise ValueError(kind)
    r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "compare.py"), a, b],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=_env(self.c.cache),
      timeout=600,
    )
    lines = _extra_lines(r.stderr)
    note += f"; exit {r.returncode}: {' | '.join(lines)[:300]}"
    self.record("compare", kind, _refusal_verdict(r.returncode, lines, 2), note)

  def summary(self) -> dict:
    """Per surface and fault, the outcomes; the totals the guarantees are stated in."""
    per: dict = {}
    for e in self.episodes:
      per.setdefault(e["surface"], {}).setdefault(e["fault"], {})
      per[e["surface"]][e["fault"]][e["outcome"]] = (
        per[e["surface"]][e["fault"]].get(e["outcome"], 0) + 1
      )
    total = {o: sum(1 for e in self.episodes if e["outcome"] == o) for o in OUTCOMES}
    landed = {}
    for e in self.episodes:
      landed[e["surface"]] = landed.get(e["surface"], 0) + int(e["landed"])
    return {
      "episodes": len(self.episodes),
      "faults_landed": sum(landed.values()),
      "faults_landed_per_surface": landed,
      "outcomes": total,
      "per_surface": per,
    }

  def table_rows(self) -> list[tuple[str, str]]:
    by_surface: dict[str, dict[str, int]] = {}
    for e in self.episodes:
      by_surface.setdefault(e["surface"], {o: 0 for o in OUTCOMES})[e["outcome"]] += 1
    rows = []
    for s, o in by_surface.items():
      n = sum(int(e["landed"]) for e in self.episodes if e["surface"] == s)
      rows.append(
        (
          f"readers: {s}",
          f"{sum(o.values())} episodes, {n} faults landed: "
          + ", ".join(f"{k} {v}" for k, v in o.items() if v),
        )
      )
    bad = sum(
      1 for e in self.episodes if e["outcome"] not in ("identical", "recomputed", "refused")
    )
    rows.append(("readers: episodes not correct", f"{bad} of {len(self.episodes)}"))
    return rows


def run_campaign(
  faults: int,
  per_episode: int = 5,
  seed: int = 0,
  root: str | None = None,
  verbose: bool = False,
  kinds: tuple[str, ...] = KINDS,
  minutes: float = 0.0,
  readers: int = 0,
  surfaces: int = 0,
  surface_faults: tuple = SURFACE_FAULTS,
) -> Campaign:
  """Runs episodes until ``faults`` faults are injected (or ``minutes`` have passed).

  Args:
    faults: faults to inject in all.
    per_episode: faults per episode (a workdir trained to completion).
    seed: the campaign's random choices.
    root: a directory for the runs (a temporary one, removed, if None).
    verbose: print each fault as it is injected.
    kinds: the fault kinds to draw from (default: all of :data:`KINDS`).
    minutes: stop starting episodes after this long (0: no limit).
    readers: faults in what readers read back (:data:`READER_FAULTS` in turn).
    surfaces: faults in evaluation, the uses, published models and compare
      (:data:`SURFACE_FAULTS`, each round in a random order; :class:`Surfaces`).
    surface_faults: the (surface, fault) pairs to draw from.

  Returns:
    The campaign (``stats``, ``counts``, ``problems``, ``table()``).
  """
  own = root is None
  root = root or tempfile.mkdtemp(prefix="exvae-faults-")
  t0 = time.time()
  try:
    c = Campaign(root, seed, verbose, kinds)
    c.reference()
    for i in range(readers):
      c.reader_fault(i, READER_FAULTS[i % len(READER_FAULTS)])
    c.surfaces = None
    if surfaces:
      c.surfaces = Surfaces(c)
      order: list = []
      while len(order) < surfaces:
        batch = list(surface_faults)
        c.rng.shuffle(batch)
        order += batch
      order = order[:surfaces]
      c.surfaces.reference(Surfaces.needs(order))
      for surface, kind in order:
        if minutes and time.time() - t0 > 60 * minutes:
          break
        c.surfaces.episode(surface, kind)
    injected, i, idle = 0, 0, 0
    # An episode can inject nothing (every kill landed after its run finished, which a
    # change in the machine's load makes likely); ten such episodes in a row end it.
    while injected < faults and idle < 10 and (not minutes or time.time() - t0 < 60 * minutes):
      n = c.episode(i, min(per_episode, faults - injected))
      injected, i, idle = injected + n, i + 1, 0 if n else idle + 1
    return c
  finally:
    if own:
      shutil.rmtree(root, ignore_errors=True)


def write_record(path: str, c: Campaign, args: list[str], started: str, seconds: float) -> None:
  """The campaign's record: what was injected where, each episode's outcome, the totals."""
  import platform
  from exvae import runinfo

  rec = {
    "command": " ".join(["scripts/fault_campaign.py", *args]),
    "commit": runinfo.code_commit(),
    "started": started,
    "wall_clock_s": round(seconds, 1),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "training": {"faults": {k: v for k, v in c.counts.items() if v}, "stats": c.stats}
    if sum(c.counts.values())
    else None,
    "readers": c.surfaces.summary() if getattr(c, "surfaces", None) else None,
    "problems": c.problems,
    "table": c.table().splitlines(),
    "episodes": c.surfaces.episodes if getattr(c, "surfaces", None) else [],
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rec, f, indent=1)
    f.write("\n")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--faults", type=int, default=100)
  ap.add_argument("--per_episode", type=int, default=5, help="faults per trained workdir")
  ap.add_argument("--minutes", type=float, default=0, help="start no episode after this long")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default=None, help="keep the runs here (default: a temp dir)")
  ap.add_argument("--verbose", action="store_true")
  ap.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from")
  ap.add_argument(
    "--readers", type=int, default=0, help="faults in what eval.py and compare.py read back"
  )
  ap.add_argument(
    "--surfaces",
    type=int,
    default=0,
    help="faults in evaluation, the uses, published models and compare",
  )
  ap.add_argument(
    "--surface_faults",
    default="",
    help="surface:fault pairs to draw from (default: all of SURFACE_FAULTS), "
    "e.g. generate:SIGINT,knn:SIGTERM",
  )
  ap.add_argument(
    "--record",
    default=None,
    help="write the campaign's record (JSON) here, e.g. results/integrity/NAME.json",
  )
  a = ap.parse_args(argv)
  # Started in the background (nohup, `&`), the campaign and the commands it starts would
  # ignore Ctrl-C: a SIGINT would never land. The commands inherit the default.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  t0 = time.time()
  started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  c = run_campaign(
    a.faults,
    a.per_episode,
    a.seed,
    a.root,
    a.verbose,
    tuple(a.kinds.split(",")),
    a.minutes,
    a.readers,
    a.surfaces,
    tuple(tuple(p.split(":")) for p in a.surface_faults.split(","))
    if a.surface_faults
    else SURFACE_FAULTS,
  )
  print(c.table())
  print(f"({time.time() - t0:.0f} s)")
  for p in c.problems:
    print("problem:", p)
  if a.record:
    write_record(a.record, c, argv if argv is not None else sys.argv[1:], started, time.time() - t0)
  ok = (
    not c.stats["silent"]
    and not c.stats["records_lost"]
    and not c.stats["reader_silent"]
    and not c.problems
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
