"""The run directory: one writer, readers that change nothing, and errors a person can read.

A workdir belongs to the run that started it:

* **One writer.**  ``train.py`` takes an exclusive ``flock`` on
  ``<workdir>/.lock`` (:class:`WorkdirLock`) before it reads or writes
  anything in the run directory; a second writer gets a
  :class:`WorkdirLockedError` naming the holder.  The kernel drops the lock
  when the process exits, however it exits (a crash or SIGKILL leaves no
  stale lock).
* **The config a run started with.**  ``config.json`` is written when a run
  starts from scratch and kept afterwards.  A resume compares the new config
  with it (:func:`check_config_drift`): keys in :data:`MAY_CHANGE` (length of
  training, logging, checkpoint cadence, evaluation settings, devices) may
  change and are recorded in ``config_changes.jsonl``; any other difference
  changes the model, the data or the optimisation and is a
  :class:`ConfigDriftError` naming the keys, unless the writer is told to
  allow it (then ``config.json`` takes the new values and the change is
  recorded).  Keys that ``config.json`` does not know (written by an older
  version) are accepted with a warning.
* **metrics.jsonl without duplicates.**  A resume from step s drops the
  records of steps after s (:func:`trim_metrics`), which the resumed run
  writes again.
* **Typed errors.**  Expected failures raise :class:`RunDirError` subclasses
  (each with its ``exit_code``); the command-line programs report them in one
  line (:mod:`exvae.cli.errors`).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import math
import os
import socket
import sys
import time
import warnings
from typing import Any

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = ".lock"

# Keys (fnmatch patterns on dotted names) that may differ between the config a
# run started with and the one it is resumed or read with: how long to train,
# what to log and when to checkpoint, evaluation settings, where the data
# lives, devices and performance knobs that do not change the model, the data
# or the optimisation.  Every other key must match (so new keys need no edit).
MAY_CHANGE = (
    "num_epochs", "max_steps", "early_stopping_patience",
    "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "val_every_epochs",
    "num_picture_samples", "progress", "tensorboard",
    "eval.*",
    "data_dir", "num_devices", "pool_sharding",
    "exemplar.chunk_size", "exemplar.encode_chunk", "exemplar.encode_remat_mb",
)
# Readers (eval.py, uses.py) restore parameters; the seed only initialises a template,
# and the parameters are float32 whatever matmul_dtype trained them (a run trained with
# bfloat16 products can be evaluated with float32 ones, and the other way round). The
# fixed binarisation of the test images is the reader's choice (eval_binarize=reference
# scores the paper's images); a resume may not change it: early stopping watches the
# validation images it binarises.
MAY_DIFFER_FOR_READERS = MAY_CHANGE + ("seed", "matmul_dtype", "eval_binarize",
                                       "eval_binarize_seed")


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


class RunDirError(Exception):
  """An expected error about a run directory (reported in one line by :mod:`exvae.cli.errors`)."""

  exit_code = 1


class ConfigError(RunDirError, ValueError):
  """A config value that cannot work (found before any work starts)."""


class WorkdirLockedError(RunDirError):
  """Another process holds the workdir's writer lock."""


class ConfigDriftError(RunDirError, ValueError):
  """The config differs from the one the run started with in keys that may not change."""


class DiskFullError(RunDirError, OSError):
  """No space left while writing into the run directory."""


class NonFiniteMetricsError(RunDirError, FloatingPointError):
  """Evaluation produced non-finite metrics (nothing was written)."""


class Interrupted(RunDirError):
  """Training stopped by SIGTERM after saving a checkpoint (exit code 143)."""

  exit_code = 128 + 15


# ----------------------------------------------------------------------------
# Config checks (before any data is loaded, and once the training set size is known)
# ----------------------------------------------------------------------------


def check_config(config, num_train: int | None = None) -> None:
  """Rejects config values that cannot work, before any work starts.

  Args:
    config: the run's ConfigDict.
    num_train: the training set size, once known (checks ``num_exemplars``
      and ``rat_k`` against it).

  Raises:
    ConfigError: naming the key, its value and what would work.
  """
  def at_least_one(key, value):
    if int(value) < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}: set --config.{key}=<n> with n >= 1.")

  for key in ("checkpoint_every_steps", "log_every_steps", "val_every_epochs",
              "early_stopping_patience"):
    at_least_one(key, config[key])
  at_least_one("eval.max_queries", config.eval.max_queries)
  if int(config.keep_checkpoints) < 1:
    raise ConfigError(
        f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}: 0 would delete every "
        "checkpoint of the workdir, including earlier ones. Set --config.keep_checkpoints=1 or more.")
  if not math.isfinite(float(config.learning_rate)):
    raise ConfigError(f"learning_rate must be finite, got {config.learning_rate}.")
  if int(config.num_epochs) < 0 or int(config.max_steps) < 0:
    raise ConfigError(f"num_epochs and max_steps must be >= 0, got {config.num_epochs} and "
                      f"{config.max_steps}.")
  if num_train is None or config.prior != "exemplar" or "exemplar" not in config:
    return
  m = int(config.exemplar.num_exemplars)
  if m > num_train:
    raise ConfigError(
        f"exemplar.num_exemplars={m} exceeds the {num_train} training images: set "
        f"--config.exemplar.num_exemplars={num_train} or 0 (all of them).")
  candidates = num_train if m <= 0 else m
  if bool(config.exemplar.rat) and int(config.exemplar.rat_k) > candidates:
    raise ConfigError(
        f"exemplar.rat_k={config.exemplar.rat_k} exceeds the {candidates} exemplar candidates "
        f"per step: set --config.exemplar.rat_k to at most {candidates}.")


# ----------------------------------------------------------------------------
# The writer lock
# ----------------------------------------------------------------------------


class WorkdirLock:
  """An exclusive, advisory ``flock`` on ``<workdir>/.lock`` held by the one writer.

  The lock file records the holder (pid, host, start time, command line) so
  a second writer can say who holds it.  The kernel releases the lock when
  the holder's process ends, so a crash never leaves a stale lock.  (NFS
  without lock support: a warning, and no lock.)
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (without waiting).

    Raises:
      WorkdirLockedError: another process holds it.
    """
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = ""
      try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        holder = (f" (pid {info.get('pid')} on {info.get('host')}, since "
                  f"{info.get('since')})")
      except (OSError, ValueError):
        pass
      os.close(fd)
      raise WorkdirLockedError(
          f"{self.workdir} is being written by another train.py{holder}. Wait for it to "
          "finish (or stop it), or use another --workdir.") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      warnings.warn(f"{self.path}: this filesystem does not support locks ({e}); "
                    "nothing stops a second writer in this workdir.")
      os.close(fd)
      return self
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Drops the lock (idempotent)."""
    if self._fd is not None:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      finally:
        os.close(self._fd)
        self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------------
# The config a run started with
# ----------------------------------------------------------------------------


def config_dict(config) -> dict:
  """The config as JSON values (tuples become lists), as ``config.json`` stores it."""
  return json.loads(config.to_json_best_effort())


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, name + "."))
    else:
      out[name] = v
  return out


def may_change(key: str, patterns=MAY_CHANGE) -> bool:
  """Whether the dotted key ``key`` may differ from the run's stored config."""
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def diff_configs(stored: dict, current: dict, patterns=MAY_CHANGE):
  """Compares two (nested) config dicts.

  Returns:
    ``(allowed, forbidden, unknown)``: dicts ``key -> (stored, current)`` of the
    keys that differ and may change, that differ and may not, and a sorted list
    of keys only one side has (new keys an older ``config.json`` lacks, or keys
    this version no longer has).
  """
  a, b = flatten(stored), flatten(current)
  allowed, forbidden = {}, {}
  for key in sorted(set(a) & set(b)):
    if a[key] != b[key]:
      (allowed if may_change(key, patterns) else forbidden)[key] = (a[key], b[key])
  return allowed, forbidden, sorted(set(a) ^ set(b))


def _changes_text(changes: dict) -> str:
  return ", ".join(f"{k} {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in changes.items())


def read_stored_config(workdir: str) -> dict | None:
  """The run's ``config.json``, or None if there is none (or it is unreadable, with a warning)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    warnings.warn(f"{path} is unreadable ({e}); the config cannot be checked against it.")
    return None


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def has_checkpoint(workdir: str) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a finished step (a directory named by a number)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def check_config_drift(workdir: str, config, *, resuming: bool, allow_change: bool = False,
                       write: bool = True) -> dict:
  """The writer's config check: records the config of a new run, compares on resume.

  Args:
    workdir: the run directory.
    config: the config of this invocation.
    resuming: the workdir holds a checkpoint this invocation will resume.
    allow_change: accept differences in keys outside :data:`MAY_CHANGE`
      (``config.json`` takes the new values; the change is recorded).
    write: write ``config.json`` / ``config_changes.jsonl`` (the primary
      process; others only check).

  Returns:
    The differing keys, ``key -> (stored, current)``.

  Raises:
    ConfigDriftError: a resume changes keys that may not change, without
      ``allow_change``.
  """
  current = config_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  stored = read_stored_config(workdir) if resuming else None
  if not resuming or stored is None:
    if resuming:
      warnings.warn(f"{path} is missing (a run written by an older version): the config "
                    "cannot be checked; recording this one.")
    if write:
      _write_json_atomic(path, current)
    return {}
  allowed, forbidden, unknown = diff_configs(stored, current)
  if unknown:
    warnings.warn(f"{path} and this config differ in keys only one of them has ({unknown}); "
                  "accepted unchecked (a config.json written by another version?).")
  if forbidden and not allow_change:
    raise ConfigDriftError(
        f"Resuming {workdir} with a config that changes the model, data or optimisation: "
        f"{_changes_text(forbidden)}. Resume with the run's config (see {path}), use a new "
        "--workdir, or pass --allow_config_change to continue with the new values.")
  changes = dict(allowed, **forbidden)
  if changes and write:
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "override": bool(forbidden),
              "changes": {k: list(v) for k, v in changes.items()}}
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    if forbidden:
      _write_json_atomic(path, current)
  if changes:
    kind = "overriding" if forbidden else "with changed settings"
    print(f"Resuming {kind}: {_changes_text(changes)} (recorded in {CHANGES_FILE}).", flush=True)
  return changes


def check_reader_config(workdir: str, config) -> None:
  """A reader's check: the config must match the run's ``config.json`` (model, data).

  Raises:
    ConfigDriftError: keys outside :data:`MAY_DIFFER_FOR_READERS` differ.
  """
  stored = read_stored_config(workdir)
  if stored is None:
    return
  _, forbidden, _ = diff_configs(stored, config_dict(config), MAY_DIFFER_FOR_READERS)
  if forbidden:
    raise ConfigDriftError(
        f"This config differs from the one {workdir} was trained with in "
        f"{_changes_text(forbidden)} (stored -> given): the numbers would not be this run's. "
        f"Pass the run's config and overrides (see {os.path.join(workdir, CONFIG_FILE)}).")


def _steps(workdir: str) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _read_bytes(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


class Writer:
  """The writer's hold on a workdir: the lock (primary process) and the config check.

  Use as a context manager around a training run::

      with rundir.Writer(workdir, config, primary=True, allow_config_change=False):
        ...

  An invocation that fails before it wrote a checkpoint leaves ``config.json``
  and ``config_changes.jsonl`` as it found them.
  """

  def __init__(self, workdir: str, config, *, primary: bool = True,
               allow_config_change: bool = False):
    self.workdir = workdir
    self.config = config
    self.primary = primary
    self.allow_config_change = allow_config_change
    self.lock = WorkdirLock(workdir) if primary else None
    self.changes: dict = {}

  def __enter__(self) -> "Writer":
    os.makedirs(self.workdir, exist_ok=True)
    if self.lock is not None:
      self.lock.acquire()
    self._config_path = os.path.join(self.workdir, CONFIG_FILE)
    self._changes_path = os.path.join(self.workdir, CHANGES_FILE)
    self._before = (_steps(self.workdir), _read_bytes(self._config_path),
                    _read_bytes(self._changes_path))
    try:
      self.changes = check_config_drift(
          self.workdir, self.config, resuming=has_checkpoint(self.workdir),
          allow_change=self.allow_config_change, write=self.primary)
    except BaseException as e:
      self.__exit__(type(e))
      raise
    return self

  def __exit__(self, exc_type=None, *_):
    try:
      if exc_type is not None and self.primary and _steps(self.workdir) == self._before[0]:
        self._roll_back()
    finally:
      if self.lock is not None:
        self.lock.release()

  def _roll_back(self) -> None:
    """Restores config.json and config_changes.jsonl as this invocation found them."""
    for path, content in ((self._config_path, self._before[1]),
                          (self._changes_path, self._before[2])):
      if _read_bytes(path) == content:
        continue
      if content is None:
        os.remove(path)
      else:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
          f.write(content)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------


def trim_metrics(path: str, step: int) -> int:
  """Drops the records of steps after ``step`` (and torn lines) from a metrics file.

  A run resumed from step ``step`` writes those steps again, so without this
  they would appear twice.

  Returns:
    The number of records dropped.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
        s = rec["summary"].get("step", 0) if "summary" in rec else rec.get("step", 0)
        ok = line.endswith("\n") and int(s) <= step
      except (ValueError, TypeError, AttributeError):
        ok = False
      if ok:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


# ----------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
  """A full disk or exhausted quota, also when wrapped by another library's error."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
      return True
    text = str(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


cli_main = lambda main: __import__("exvae.cli.errors").cli.errors.cli_main(main)  # noqa: E731  (the CLI's handler: exvae/cli/errors.py)
