"""Fault campaign: trains small runs under random faults and checks that nothing goes silently wrong.

    python scripts/fault_campaign.py --faults=100            # a few minutes on a quiet machine
    python scripts/fault_campaign.py --faults=4 --per_episode=4   # a smoke run (the test)

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

Every episode ends with a run to completion.  The table counts the faults
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
OVERRIDES = ("--config.max_train=200", "--config.num_epochs=4", "--config.checkpoint_every_steps=3",
             "--config.log_every_steps=2", "--config.keep_checkpoints=2",
             "--config.num_picture_samples=4")


def _env(cache_dir: str) -> dict:
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", EXVAE_PROGRESS="0")


def _cmd(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/test.py",
          f"--workdir={workdir}", *OVERRIDES, *extra]


# absl's own line format for a warning or an info line (``W1202 05:07:40.726701 1402 f.py:202] ...``),
# which Orbax's warnings take once absl's handler is installed.
_ABSL_NATIVE = re.compile(r"^[WI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _extra_lines(stderr: str) -> list[str]:
  """stderr lines but absl's warnings (either format) and exvae's one-line warnings."""
  return [l for l in stderr.splitlines()
          if l.strip() and not l.startswith(("WARNING:absl", "warning:"))
          and not _ABSL_NATIVE.match(l)]


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _load_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_test", os.path.join(ROOT, "configs", "test.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for o in OVERRIDES:
    key, value = o[len("--config."):].split("=")
    c[key] = type(c[key])(value)
  return c


class Campaign:
  """One campaign: a reference run, then episodes with faults (see the module docstring)."""

  def __init__(self, root: str, seed: int, verbose: bool = False,
               kinds: tuple[str, ...] = KINDS):
    self.root = root
    self.kinds = tuple(kinds)
    self.weights = tuple(w for k, w in zip(KINDS, WEIGHTS) if k in self.kinds)
    self.rng = random.Random(seed)
    self.verbose = verbose
    self.cache = os.path.join(root, "jax_cache")
    self.counts = {k: 0 for k in KINDS + READER_FAULTS}
    self.skipped = {k: 0 for k in KINDS}
    self.stats = dict(resumed=0, episodes=0, bit_identical=0, corruptions=0, detected=0,
                      harmless=0, silent=0, records_lost=0, records_duplicated=0,
                      extra_lines=0, failed_runs=0, crashed_at_exit=0, reader_caught=0,
                      reader_silent=0)
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
    return subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True, cwd=ROOT,
                          env=_env(self.cache), timeout=timeout)

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
          step, self.template, self.template.params)
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
        out.setdefault(key, []).append({k: v for k, v in rec.items()
                                        if k not in ("time", "picture")})
    return out

  # -- faults ----------------------------------------------------------------

  def kill(self, workdir: str, sig: str) -> str:
    """Starts a resume and sends ``sig`` at a random time while it trains.

    Returns:
      ``"injected"``, or ``"finished"`` when the run ended before the signal.
    """
    steps = _steps(workdir)
    left = 1.0 - (steps[-1] / self.ref_final if steps else 0.0)
    p = subprocess.Popen(_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=_env(self.cache))
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:   # in main(): the writer lock is taken
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
      return False             # damage the newest step only while a good one is left
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
      self.stats["harmless"] += 1          # bytes no restore reads: the values are the saved ones
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
    used = sum(4096 * (1 + os.path.getsize(os.path.join(r, f)) // 4096)
               for r, _, fs in os.walk(workdir) for f in fs)
    mnt = tempfile.mkdtemp(dir=self.root, prefix="tmpfs-")
    size_kb = int(1.1 * used) // 1024 + 64 + self.rng.randint(40, 400)
    if not self._mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt):
      os.rmdir(mnt)
      return False
    try:
      try:
        shutil.copytree(workdir, os.path.join(mnt, "run"), symlinks=True)
      except (OSError, shutil.Error):
        return False                          # the tmpfs was too small for the copy itself
      r = self.run(os.path.join(mnt, "run"))
      if r.returncode not in (0, 1):
        self.problems.append(f"disk_full: exit {r.returncode}: {r.stderr[-500:]}")
        self.stats["failed_runs"] += 1
      lines = _extra_lines(r.stderr)
      if r.returncode == 1 and (len(lines) != 1 or "isk full" not in lines[0]):
        self.stats["extra_lines"] += max(0, len(lines) - 1)
        self.problems.append(f"disk_full: {lines[:3]}")
      shutil.rmtree(workdir)
      shutil.copytree(os.path.join(mnt, "run"), workdir, symlinks=True)   # space freed
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
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=ROOT, env=_env(self.cache),
                          timeout=600)

  def _eval(self, wd: str) -> subprocess.CompletedProcess:
    return self._reader("eval.py", f"--workdir={wd}", "--config.eval.num_importance_samples=4",
                        "--config.eval.max_test_examples=20",
                        f"--config.eval.out_dir={os.path.join(wd, 'eval')}")

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
      data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
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
    else:                 # scored again: the printed and stored NLL are the true ones
      r = self._eval(wd)
      got = json.load(open(metrics_path))["test_nll"] if os.path.exists(metrics_path) else None
      ok = (r.returncode == 0 and "already done" not in r.stdout and got == want
            and f"test NLL = {want:.2f}" in r.stdout)
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
    if got is not None and got[0] == self.ref_final and got[1] == self.ref_digests[self.ref_final] \
        and same_records and not dup and set(records) == set(self.ref_records):
      self.stats["bit_identical"] += 1
    else:
      self.problems.append(f"episode {i}: not bit-identical (step {got and got[0]}, "
                           f"records lost {lost}, duplicated {dup})")
    return injected

  def table(self) -> str:
    s = self.stats
    injected = sum(self.counts.values())
    rows = [("faults injected", f"{injected} ({', '.join(f'{k} {v}' for k, v in self.counts.items())})"),
            ("faults skipped (no root / nothing to damage yet)",
             str(sum(v for k, v in self.skipped.items() if k in ("disk_full", "read_only")))),
            ("runs resumed", str(s["resumed"])),
            ("episodes bit-identical to the reference", f"{s['bit_identical']} of {s['episodes']}"),
            ("corruptions detected", f"{s['detected']} of {s['corruptions']} "
                                     f"(harmless: {s['harmless']}, silent: {s['silent']})"),
            ("records lost / duplicated", f"{s['records_lost']} / {s['records_duplicated']}"),
            ("stderr lines beyond one", str(s["extra_lines"])),
            ("runs that failed unexpectedly", str(s["failed_runs"])),
            ("crashes at exit after the one line (SIGSEGV)", str(s["crashed_at_exit"])),
            ("reader faults caught (scored again or refused)",
             f"{s['reader_caught']} of {s['reader_caught'] + s['reader_silent']}")]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def run_campaign(faults: int, per_episode: int = 5, seed: int = 0, root: str | None = None,
                 verbose: bool = False, kinds: tuple[str, ...] = KINDS,
                 minutes: float = 0.0, readers: int = 0) -> Campaign:
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


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--faults", type=int, default=100)
  ap.add_argument("--per_episode", type=int, default=5, help="faults per trained workdir")
  ap.add_argument("--minutes", type=float, default=0, help="start no episode after this long")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default=None, help="keep the runs here (default: a temp dir)")
  ap.add_argument("--verbose", action="store_true")
  ap.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from")
  ap.add_argument("--readers", type=int, default=0,
                  help="faults in what eval.py and compare.py read back")
  a = ap.parse_args(argv)
  t0 = time.time()
  c = run_campaign(a.faults, a.per_episode, a.seed, a.root, a.verbose,
                   tuple(a.kinds.split(",")), a.minutes, a.readers)
  print(c.table())
  print(f"({time.time() - t0:.0f} s)")
  for p in c.problems:
    print("problem:", p)
  ok = (not c.stats["silent"] and not c.stats["records_lost"] and not c.stats["reader_silent"]
        and not c.problems)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
