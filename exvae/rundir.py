"""The run directory: one writer, readers that change nothing, a history that never shrinks.

A workdir belongs to the run that started it:

* **One writer.**  ``train.py`` takes an exclusive ``flock`` on
  ``<workdir>/.lock`` (:class:`WorkdirLock`) before it reads or writes
  anything in the run directory; a second writer gets a
  :class:`~exvae.errors.WorkdirLockedError` naming the holder.  The kernel drops the lock
  when the process exits, however it exits (a crash or SIGKILL leaves no
  stale lock).
* **The config a run started with.**  ``config.json`` is written when a run
  starts from scratch and kept afterwards.  A resume compares the new config
  with it (:func:`check_config_drift`): keys in :data:`MAY_CHANGE` (length of
  training, logging, checkpoint cadence, evaluation settings, devices) may
  change and are recorded in ``config_changes.jsonl``; any other difference
  changes the model, the data or the optimisation and is a
  :class:`~exvae.errors.ConfigDriftError` naming the keys, unless the writer is told to
  allow it (then ``config.json`` takes the new values and the change is
  recorded).  A missing or unreadable ``config.json`` cannot be checked and
  counts as drift too; when allowed, the unreadable file is kept aside
  (renamed), never overwritten.  Keys that ``config.json`` does not know
  (written by an older version) are accepted with a warning.
* **The data a run started with.**  A user's data set (``npz:PATH`` or a
  plug-in) is recorded in ``data_identity.json``: its path (or plug-in spec)
  and the SHA-256 of its arrays.  A resume whose data holds other arrays is a
  :class:`~exvae.errors.ConfigDriftError` unless allowed (then recorded), and a reader
  (evaluation, the uses) on other arrays is refused
  (:func:`check_data_identity`, :func:`check_reader_data`).  The built-in data
  sets are named by the config alone.
* **A history that never shrinks.**  A fresh start in a workdir whose files
  show that a run there had saved checkpoints (records past the first save,
  evaluation outputs, recorded config changes) is a :class:`~exvae.errors.HistoryError`
  unless told to overwrite; then the earlier files move into
  ``previous/<time>/`` (:func:`check_history`).
* **metrics.jsonl without duplicates.**  A resume from step s sets aside
  the records of steps after s (:func:`trim_metrics`), which the resumed run
  writes again, and torn, non-finite and duplicated lines, into
  ``metrics.rejected.jsonl`` (never deleted); the damaged lines and a file
  that ends before the checkpoint are reported in one line.
* **Typed errors.**  Expected failures raise :class:`~exvae.errors.RunDirError`
  subclasses (each with its ``exit_code``: a bad config, a second writer, a
  full disk, a read-only filesystem, a corrupt checkpoint or bank, SIGTERM);
  the classes live in :mod:`exvae.errors`, the one module to import them
  from, and the command-line programs report them in one line
  (:mod:`exvae.cli.exits`).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import socket
import sys
import time
import warnings
from typing import Any

from exvae import atomic, errors

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = ".lock"
DATA_FILE = "data_identity.json"  # a user's data set: its path (or plug-in) and SHA-256

# Keys (fnmatch patterns on dotted names) that may differ between the config a
# run started with and the one it is resumed or read with: how long to train,
# what to log and when to checkpoint, evaluation settings, where the data
# lives, devices and performance knobs that do not change the model, the data
# or the optimisation.  Every other key must match (so new keys need no edit).
MAY_CHANGE = (
  "num_epochs",
  "max_steps",
  "early_stopping_patience",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "log_every_steps",
  "val_every_epochs",
  "num_picture_samples",
  "progress",
  "tensorboard",
  "eval.*",
  "data_dir",
  "num_devices",
  "pool_sharding",
  "exemplar.chunk_size",
  "exemplar.encode_chunk",
  "exemplar.encode_remat_mb",
  "exemplar.rat_compact",
  "exemplar.rat_compact_chunk",
)
# Readers (eval.py, uses.py) restore parameters; the seed only initialises a template,
# and the parameters are float32 whatever matmul_dtype trained them (a run trained with
# bfloat16 products can be evaluated with float32 ones, and the other way round). The
# fixed binarisation of the test images is the reader's choice (eval_binarize=reference
# scores the paper's images); a resume may not change it: early stopping watches the
# validation images it binarises.
MAY_DIFFER_FOR_READERS = MAY_CHANGE + (
  "seed",
  "matmul_dtype",
  "eval_binarize",
  "eval_binarize_seed",
)


# ----------------------------------------------------------------------------
# The writer lock
# ----------------------------------------------------------------------------


def take_flock(directory: str, path: str, flags: int, what: str) -> tuple[str, int | None]:
  """Opens ``path`` (creating ``directory``) and tries an exclusive ``flock`` without waiting.

  The kernel drops the lock when the process ends, however it ends.

  Args:
    directory: created if missing.
    path: what to open and lock (a lock file, or ``directory`` itself).
    flags: ``os.open`` flags (``os.O_RDONLY`` suffices for a directory).
    what: names the place in a typed write error.

  Returns:
    ``("locked", fd)``; ``("held", fd)`` when another process holds it (the caller may
    read ``fd``, then closes it); ``("unsupported", None)`` on a filesystem without locks.

  Raises:
    errors.ReadOnlyError, errors.DiskFullError: ``directory`` or ``path`` cannot be created.
  """
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, flags, 0o644)
  except OSError as e:
    typed = errors.as_write_error(e, what)
    if typed is e:
      raise
    raise typed from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return "held", fd
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      return "unsupported", None
    raise
  return "locked", fd


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
      errors.WorkdirLockedError: another process holds it.
      errors.ReadOnlyError: the workdir cannot be written.
      errors.DiskFullError: no space left to create it.
    """
    state, fd = take_flock(
      self.workdir, self.path, os.O_RDWR | os.O_CREAT, f"the run directory {self.workdir}"
    )
    if state == "held":
      holder, info = "", {}
      try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        info = info if isinstance(info, dict) else {}
        holder = f" (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"
      except (OSError, ValueError):
        pass
      os.close(fd)
      raise errors.WorkdirLockedError(
        f"{self.workdir} is being written by another train.py{holder}. Wait for it to "
        "finish (or stop it), or use another --workdir.",
        info,
      ) from None
    if state == "unsupported":
      warnings.warn(
        f"{self.path}: this filesystem does not support locks; "
        "nothing stops a second writer in this workdir.",
        stacklevel=2,
      )
      return self
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "since": time.strftime("%Y-%m-%d %H:%M:%S"),
      "argv": sys.argv[:8],
    }
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


def writer_of(workdir: str) -> dict | None:
  """Who is writing ``workdir`` now, without taking its lock or changing anything.

  Probes the lock with a shared, non-blocking ``flock`` on a read-only
  descriptor of ``<workdir>/.lock``: a writer's exclusive lock refuses it.

  Args:
    workdir: a run directory.

  Returns:
    None when no process holds the writer lock (or the run has never had a
    writer), else what the lock file says of the holder (``pid``, ``host``,
    ``since``, ``argv``; an empty dict when it cannot be read).
  """
  try:
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
      except (OSError, ValueError):
        info = {}
      return info if isinstance(info, dict) else {}
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        return None  # no locks on this filesystem: no writer to name
      raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


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
    this version no longer has), less those that may change anyway (a new
    evaluation setting, say, changes nothing a run has trained).
  """
  a, b = flatten(stored), flatten(current)
  allowed, forbidden = {}, {}
  for key in sorted(set(a) & set(b)):
    if a[key] != b[key]:
      (allowed if may_change(key, patterns) else forbidden)[key] = (a[key], b[key])
  return allowed, forbidden, sorted(k for k in set(a) ^ set(b) if not may_change(k, patterns))


def _changes_text(changes: dict) -> str:
  return ", ".join(f"{k} {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in changes.items())


def _load_stored_config(workdir: str) -> tuple[dict | None, str | None]:
  """``(config, problem)``: the run's ``config.json``, or None and why (missing, unreadable)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None, "missing"
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    return None, f"unreadable ({' '.join(str(e).split())[:120]})"
  if not isinstance(stored, dict):
    return None, "unreadable (not a JSON object)"
  return stored, None


def read_stored_config(workdir: str) -> dict | None:
  """The run's ``config.json``, or None if there is none (or it is unreadable, with a warning)."""
  stored, problem = _load_stored_config(workdir)
  if stored is None and problem != "missing":
    warnings.warn(
      f"{os.path.join(workdir, CONFIG_FILE)} is {problem}; the config cannot be "
      "checked against it.",
      stacklevel=2,
    )
  return stored


def has_checkpoint(workdir: str) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a finished step (a directory named by a number)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def set_aside(path: str, why: str) -> str:
  """Renames a file that cannot be used to ``<path>.<why>-<time>``; never deletes it.

  Returns:
    The new path.
  """
  dst = f"{path}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  os.replace(path, dst)
  return dst


def _record_change(workdir: str, record: dict) -> None:
  atomic.append_line(os.path.join(workdir, CHANGES_FILE), atomic.dumps(record))


def recorded_run_config(workdir: str) -> dict | None:
  """What the run's ``config.json`` must be: the digest its model or checkpoint records.

  A published model records it in ``model.json`` (``config_sha256``); a run directory
  in the ``digest`` item of each checkpoint step (with the values, so that a
  difference can be named; :func:`exvae.checkpoints.recorded_config`).

  Returns:
    ``{"where", "config_sha256", "config"}`` (``config`` None when only the digest is
    recorded), or None when nothing is recorded (a model or checkpoints written
    before these records existed: accepted unchecked).
  """
  from exvae import checkpoints, published

  if published.is_published(workdir):
    try:
      meta = published.read_meta(workdir)
    except published.PublishedModelError:
      return None  # the reader's load reports it
    sha = meta.get("config_sha256") if isinstance(meta, dict) else None
    return (
      None
      if sha is None
      else {
        "where": os.path.join(workdir, published.META_FILE),
        "config_sha256": sha,
        "config": None,
      }
    )
  rec = checkpoints.recorded_config(os.path.join(workdir, "checkpoints"))
  if rec is None or rec["config_sha256"] is None:
    return None
  return {
    "where": f"checkpoint step {rec['step']}",
    "config_sha256": rec["config_sha256"],
    "config": rec["config"],
  }


def _edit_text(changes: dict) -> str:
  if list(changes) == [None]:  # only a digest is recorded: the keys are unknown
    return "its values differ from the recorded digest"
  return f"{_changes_text(changes)}; recorded -> file"


def _edited_keys(recorded: dict, stored: dict, patterns) -> tuple[dict, dict]:
  """``(allowed, forbidden)`` differences between the recorded config and the file's
  (``{None: ...}`` when only a digest is recorded)."""
  if recorded.get("config") is None:
    return {}, {None: (None, None)}
  allowed, forbidden, unknown = diff_configs(recorded["config"], stored, patterns)
  a, b = flatten(recorded["config"]), flatten(stored)
  forbidden.update({k: (a.get(k), b.get(k)) for k in unknown})
  return allowed, forbidden


def check_edited_config(workdir: str, *, allow_change: bool, write: bool) -> dict:
  """A resume's check that ``config.json`` is the file the newest checkpoint was saved with.

  An edit to keys in :data:`MAY_CHANGE` is accepted and recorded in
  ``config_changes.jsonl``; any other edit is refused unless ``allow_change``
  (then it is recorded as an override). A missing record (checkpoints saved before
  it existed) or a missing/unreadable file (:func:`check_config_drift`) passes here.

  Returns:
    The edited keys, ``key -> (recorded, file)``.

  Raises:
    errors.ConfigDriftError: keys outside :data:`MAY_CHANGE` were edited, without ``allow_change``.
  """
  rec = recorded_run_config(workdir)
  stored, _ = _load_stored_config(workdir)
  if rec is None or stored is None or atomic.json_digest(stored) == rec["config_sha256"]:
    return {}
  path = os.path.join(workdir, CONFIG_FILE)
  allowed, forbidden = _edited_keys(rec, stored, MAY_CHANGE)
  if forbidden and not allow_change:
    raise errors.ConfigDriftError(
      f"{path} is not the config {rec['where']} was saved with: it was edited since "
      f"({_edit_text(forbidden)}). Restore the saved values, or pass "
      "--allow_config_change to resume with the edited file (recorded)."
    )
  changes = dict(allowed, **forbidden)
  if write:
    _record_change(
      workdir,
      {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "override": bool(forbidden),
        "edited_config_json": True,
        "changes": {k or CONFIG_FILE: list(v) for k, v in changes.items()},
      },
    )
  print(
    f"Resuming with {CONFIG_FILE} edited since {rec['where']}: {_edit_text(changes)} "
    f"({_recorded_note()}).",
    flush=True,
  )
  return changes


def _recorded_note() -> str:
  # A resume that fails before it saves a checkpoint rolls the record back (Writer).
  return f"recorded in {CHANGES_FILE} once this run saves a checkpoint"


def check_config_drift(
  workdir: str, config, *, resuming: bool, allow_change: bool = False, write: bool = True
) -> dict:
  """The writer's config check: records the config of a new run, compares on resume.

  A resume whose ``config.json`` is missing or unreadable cannot be checked:
  that counts as drift.  With ``allow_change`` an unreadable file is kept
  aside (renamed, see :func:`set_aside`) and this config is recorded.

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
    errors.ConfigDriftError: a resume changes keys that may not change, or the
      stored config is missing or unreadable, without ``allow_change``.
  """
  current = config_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if not resuming:
    if write:
      atomic.write_json(path, current)
    return {}
  edited = check_edited_config(workdir, allow_change=allow_change, write=write)
  stored, problem = _load_stored_config(workdir)
  if stored is None:
    if not allow_change:
      raise errors.ConfigDriftError(
        f"Resuming {workdir}, whose {CONFIG_FILE} is {problem}: this config cannot be checked "
        "against the one the run started with. Restore the file, use a new --workdir, or pass "
        "--allow_config_change to continue with this config (recorded; an unreadable file "
        "is kept aside)."
      )
    if write:
      kept = set_aside(path, "unreadable") if problem != "missing" else None
      atomic.write_json(path, current)
      _record_change(
        workdir,
        {
          "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "override": True,
          "stored_config": problem,
          "kept_as": kept,
          "changes": {},
        },
      )
      print(
        f"Resuming with a config that could not be checked ({CONFIG_FILE} {problem}"
        f"{'; kept as ' + kept if kept else ''}); {_recorded_note()}.",
        flush=True,
      )
    return {}
  allowed, forbidden, unknown = diff_configs(stored, current)
  if unknown:
    warnings.warn(
      f"{path} and this config differ in keys only one of them has ({unknown}); "
      "accepted unchecked (a config.json written by another version?).",
      stacklevel=2,
    )
  if forbidden and not allow_change:
    raise errors.ConfigDriftError(
      f"Resuming {workdir} with a config that changes the model, data or optimisation: "
      f"{_changes_text(forbidden)}. Resume with the run's config (see {path}), use a new "
      "--workdir, or pass --allow_config_change to continue with the new values."
    )
  changes = dict(allowed, **forbidden)
  if changes and write:
    _record_change(
      workdir,
      {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "override": bool(forbidden),
        "changes": {k: list(v) for k, v in changes.items()},
      },
    )
    if forbidden:
      atomic.write_json(path, current)
  if changes:
    kind = "overriding" if forbidden else "with changed settings"
    print(f"Resuming {kind}: {_changes_text(changes)} ({_recorded_note()}).", flush=True)
  return dict(edited, **changes)


def check_reader_config(workdir: str, config, hints: dict[str, str] | None = None) -> None:
  """A reader's check: the config must match the run's ``config.json`` (model, data).

  ``config.json`` itself must be the file the run's newest checkpoint (or a published
  model's ``model.json``) records: an edited file is refused where it changes keys
  outside :data:`MAY_DIFFER_FOR_READERS`. Without ``config.json``, ``config`` is
  checked against the values the checkpoint records, or, where nothing is recorded,
  one line on stderr says that it could not be checked.

  Args:
    workdir: the run directory (or published model) being read.
    config: the reader's config.
    hints: per key, a sentence the error adds when that key differs (what the
      reader most likely wanted instead), e.g. :data:`EVAL_HINTS`.

  Raises:
    errors.ConfigDriftError: keys outside :data:`MAY_DIFFER_FOR_READERS` differ.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  stored, problem = _load_stored_config(workdir)
  rec = recorded_run_config(workdir)
  if stored is None:
    if rec is None or rec["config"] is None:
      print(
        f"warning: {path} is {problem}: the run's config could not be checked; using "
        "the given --config as it is.",
        file=sys.stderr,
        flush=True,
      )
      return
    stored, path = rec["config"], f"the config {rec['where']} records"
  elif rec is not None and atomic.json_digest(stored) != rec["config_sha256"]:
    _, forbidden = _edited_keys(rec, stored, MAY_DIFFER_FOR_READERS)
    if forbidden:
      raise errors.ConfigDriftError(
        f"{path} is not the config {rec['where']} records: it was edited since "
        f"({_edit_text(forbidden)}), and the numbers would not be this run's. Restore "
        "the recorded values."
      )
  _, forbidden, _ = diff_configs(stored, config_dict(config), MAY_DIFFER_FOR_READERS)
  if forbidden:
    hints = hints or {}
    hint = "".join(f" {hints[k]}" for k in forbidden if k in hints)
    raise errors.ConfigDriftError(
      f"This config differs from the one {workdir} was trained with in "
      f"{_changes_text(forbidden)} (stored -> given): the numbers would not be this run's. "
      f"Pass the run's config and overrides (see {path}).{hint}"
    )


def read_data_identity(workdir: str) -> dict | None:
  """The data identity a run recorded (``data_identity.json``), or None (none, or unreadable)."""
  try:
    with open(os.path.join(workdir, DATA_FILE)) as f:
      stored = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    warnings.warn(
      f"{os.path.join(workdir, DATA_FILE)} is unreadable ({e}); the data cannot be "
      "checked against it.",
      stacklevel=2,
    )
    return None
  return stored if isinstance(stored, dict) else None


def _data_text(identity: dict) -> str:
  where = identity.get("path") or identity.get("plugin")
  return f"{where} (arrays SHA-256 {str(identity.get('sha256'))[:12]})"


def _data_change(stored: dict, identity: dict | None) -> str:
  """What changed between the recorded data identity and this invocation's, in words."""
  if identity is None:
    return f"the run trained on {_data_text(stored)}, this config names a built-in data set"
  where = stored.get("path") or stored.get("plugin")
  if where == (identity.get("path") or identity.get("plugin")):
    return (
      f"{where} holds other arrays than the run trained on (SHA-256 "
      f"{str(stored.get('sha256'))[:12]} then, {str(identity.get('sha256'))[:12]} now)"
    )
  return f"the run trained on {_data_text(stored)}, this config reads {_data_text(identity)}"


def check_data_identity(
  workdir: str,
  identity: dict | None,
  *,
  resuming: bool,
  allow_change: bool = False,
  write: bool = True,
) -> None:
  """The writer's data check: records a user data set's identity; a resume must find it again.

  Args:
    workdir: the run directory.
    identity: ``Splits.identity`` (``{"path" or "plugin", "sha256"}``), None
      for a built-in data set (nothing to record or check).
    resuming: this invocation resumes a checkpoint.
    allow_change: accept other arrays on resume (recorded in ``config_changes.jsonl``).
    write: write ``data_identity.json`` (the primary process).

  Raises:
    errors.ConfigDriftError: a resume on other arrays (or another file) without ``allow_change``.
  """
  if identity is None:
    return
  stored = read_data_identity(workdir)
  if resuming and stored is not None and stored != identity:
    if not allow_change:
      raise errors.ConfigDriftError(
        f"Resuming {workdir} on other data: {_data_change(stored, identity)}. Restore the "
        "data set, use a new --workdir, or pass --allow_config_change to continue on this "
        "data (recorded)."
      )
    if write:
      _record_change(
        workdir,
        {
          "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "override": True,
          "changes": {"data": [stored, identity]},
        },
      )
    print(
      f"Resuming on other data: {_data_text(stored)} -> {_data_text(identity)} (recorded "
      f"in {CHANGES_FILE}).",
      flush=True,
    )
  if write and stored != identity:
    atomic.write_json(os.path.join(workdir, DATA_FILE), identity)


def check_reader_data(workdir: str, identity: dict | None) -> None:
  """A reader's data check: a user's data set must hold the arrays the run was trained on.

  Raises:
    errors.ConfigDriftError: the run recorded a data identity and ``identity`` differs.
  """
  stored = read_data_identity(workdir)
  if stored is None or stored == identity:
    return
  raise errors.ConfigDriftError(
    f"Reading {workdir} on other data: {_data_change(stored, identity)}: the numbers would "
    "not be this run's. Restore the data the run trained on, or train a new run."
  )


# What an evaluation given one of these keys most likely wanted instead.
EVAL_HINTS = {
  "max_test": "To score only the first n test images, pass --config.eval.max_test_examples=n "
  "(max_test also shrinks the validation split the run was trained with).",
}


# ----------------------------------------------------------------------------
# A run's history is append-only
# ----------------------------------------------------------------------------


METRICS_FILE = "metrics.jsonl"
MACHINES_FILE = "machines.jsonl"  # one line per training segment: its step, CPU, backend
PREVIOUS_DIR = "previous"
# What only a run that saved a checkpoint (or was evaluated) leaves in its workdir.
_SAVED_RUN_FILES = (
  CHANGES_FILE,
  "eval_metrics.json",
  "per_example.npz",
  "eval_samples.png",
  "unreadable_checkpoints",
  "uses",
)


def _metric_lines(path: str) -> tuple[list[tuple[bytes, dict]], int]:
  """``([(line, record), ...], bad)``: the complete records of a metrics file and its torn lines."""
  out, bad = [], 0
  if not os.path.exists(path):
    return out, bad
  with open(path, "rb") as f:
    for raw in f:
      try:
        rec = json.loads(raw.decode())
        if not raw.endswith(b"\n") or not isinstance(rec, dict):
          raise ValueError("torn")
        _record_step(rec)
      except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        bad += 1
        continue
      out.append((raw, rec))
  return out, bad


def read_metrics(path: str) -> tuple[list[dict], int]:
  """The records of a ``metrics.jsonl`` and the number of torn or unreadable lines.

  Returns:
    ``(records, bad)``: the parsed records in order (dicts) and how many
    lines were not complete JSON objects (a torn last line after a kill).
  """
  lines, bad = _metric_lines(path)
  return [rec for _, rec in lines], bad


def _record_step(rec: dict) -> int:
  s = rec["summary"].get("step", 0) if isinstance(rec.get("summary"), dict) else rec.get("step", 0)
  return int(s)


def history_after_a_save(workdir: str, checkpoint_every_steps: int) -> list[str]:
  """What in a workdir without checkpoints shows that a run there had saved one.

  A run killed before its first save leaves only records up to that save
  (the smaller of ``checkpoint_every_steps`` and one epoch), pictures and
  event files; starting again replaces them.  Anything more is the history
  of a run whose checkpoints are gone.

  Returns:
    The names of the files that prove it (empty: nothing to protect).
  """
  found = [n for n in _SAVED_RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  records, _ = read_metrics(os.path.join(workdir, METRICS_FILE))
  first_save = int(checkpoint_every_steps)
  for rec in records:
    if rec.get("epoch") and rec.get("step") and "val_loss" not in rec:
      first_save = min(first_save, int(round(rec["step"] / rec["epoch"])))  # steps per epoch
      break
  if any("summary" in r or _record_step(r) > first_save for r in records):
    found.insert(0, METRICS_FILE)
  return found


def move_history_aside(workdir: str) -> str | None:
  """Moves everything of a workdir but its lock and checkpoints into ``previous/<time>/``.

  Returns:
    The folder the files went to, or None if there was nothing to move.
  """
  keep = {LOCK_FILE, "checkpoints", PREVIOUS_DIR}
  names = [n for n in sorted(os.listdir(workdir)) if n not in keep]
  if not names:
    return None
  dst = os.path.join(workdir, PREVIOUS_DIR, time.strftime("%Y%m%d-%H%M%S"))
  while os.path.exists(dst):
    dst += "-1"
  os.makedirs(dst)
  for n in names:
    os.replace(os.path.join(workdir, n), os.path.join(dst, n))
  return dst


def check_history(workdir: str, config, *, overwrite: bool) -> None:
  """A fresh start may not erase or mix with an earlier run's history.

  Args:
    workdir: the run directory (holds no checkpoint).
    config: this run's config (``checkpoint_every_steps``).
    overwrite: move the earlier files into ``previous/<time>/`` and start afresh.

  Raises:
    errors.HistoryError: the workdir holds another run's history and ``overwrite`` is False.
  """
  found = history_after_a_save(workdir, int(config.checkpoint_every_steps))
  if not found:
    return
  if not overwrite:
    raise errors.HistoryError(
      f"{workdir} holds the history of an earlier run ({', '.join(found)}) but no checkpoint "
      "to resume: starting afresh would mix with it. Use a new --workdir, restore the "
      "checkpoints, or pass --overwrite to move the earlier files into "
      f"{os.path.join(workdir, PREVIOUS_DIR)}/<time>/."
    )
  dst = move_history_aside(workdir)
  print(f"Moved the earlier history of {workdir} to {dst}.", flush=True)


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

  A fresh start in a workdir that holds an earlier run's history is refused
  unless ``overwrite`` (:func:`check_history`).  An invocation that fails
  before it wrote a checkpoint leaves ``config.json`` and
  ``config_changes.jsonl`` as it found them.
  """

  def __init__(
    self,
    workdir: str,
    config,
    *,
    primary: bool = True,
    allow_config_change: bool = False,
    overwrite: bool = False,
  ):
    self.workdir = workdir
    self.config = config
    self.primary = primary
    self.allow_config_change = allow_config_change
    self.overwrite = overwrite
    self.lock = WorkdirLock(workdir) if primary else None
    self.changes: dict = {}

  def __enter__(self) -> "Writer":
    if self.lock is not None:
      self.lock.acquire()  # creates the workdir (a one-line error if it cannot)
    else:
      os.makedirs(self.workdir, exist_ok=True)
    try:
      resuming = has_checkpoint(self.workdir)
      if self.primary and not resuming:
        check_history(self.workdir, self.config, overwrite=self.overwrite)
      self._config_path = os.path.join(self.workdir, CONFIG_FILE)
      self._changes_path = os.path.join(self.workdir, CHANGES_FILE)
      self._data_path = os.path.join(self.workdir, DATA_FILE)
      self._before = (
        _steps(self.workdir),
        _read_bytes(self._config_path),
        _read_bytes(self._changes_path),
        _read_bytes(self._data_path),
      )
      self.changes = check_config_drift(
        self.workdir,
        self.config,
        resuming=resuming,
        allow_change=self.allow_config_change,
        write=self.primary,
      )
    except BaseException as e:
      self.__exit__(type(e))
      raise
    return self

  def __exit__(self, exc_type=None, *_):
    try:
      if (
        exc_type is not None
        and self.primary
        and hasattr(self, "_before")
        and _steps(self.workdir) == self._before[0]
      ):
        self._roll_back()
    finally:
      if self.lock is not None:
        self.lock.release()

  def _roll_back(self) -> None:
    """Restores config.json, config_changes.jsonl and data_identity.json as found."""
    for path, content in (
      (self._config_path, self._before[1]),
      (self._changes_path, self._before[2]),
      (self._data_path, self._before[3]),
    ):
      try:
        if _read_bytes(path) == content:
          continue
        if content is None:
          os.remove(path)
        else:
          atomic.write_bytes(path, content)
      except OSError:
        pass  # a full or read-only disk: the original error is the one to report


# ----------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------


REJECTED_FILE = "metrics.rejected.jsonl"  # lines a resume set aside, never deleted


class _NonFinite(ValueError):
  pass


def _refuse_constant(name):
  raise _NonFinite(name)


def _record_kind(rec: dict) -> str:
  return "summary" if "summary" in rec else "val" if "val_loss" in rec else "train"


def _sort_lines(raw_lines: list[bytes], step: int) -> tuple[list[bytes], list[dict]]:
  """``(kept lines, rejected)`` of a metrics file resumed from checkpoint step ``step``.

  Rejected: torn or unreadable lines, lines with a non-finite number (not JSON),
  a second record of the same kind (train, validation, summary) and step, and
  records after ``step`` (trained and logged again).
  """
  kept, rejected, seen = [], [], set()
  for i, raw in enumerate(raw_lines, 1):
    reason = None
    try:
      rec = json.loads(raw.decode(), parse_constant=_refuse_constant)
      if not raw.endswith(b"\n") or not isinstance(rec, dict):
        raise ValueError("torn")
      key = (_record_kind(rec), _record_step(rec))
    except _NonFinite:
      reason = "non-finite"
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
      reason = "torn"
    else:
      if key[1] > step:
        reason = "after_checkpoint"
      elif key in seen:
        reason = "duplicate"
      seen.add(key)
    if reason is None:
      kept.append(raw)
    else:
      rejected.append(
        {"line": i, "reason": reason, "text": raw.decode(errors="replace").rstrip("\n")}
      )
  return kept, rejected


def trim_metrics(path: str, step: int) -> int:
  """Makes a metrics file one strict JSON record per step up to ``step``; sets the rest aside.

  A run resumed from step ``step`` writes the later steps again, so their records
  would appear twice; a torn line (a kill in the middle of a write), a line with a
  non-finite number (not strict JSON) or a second record of the same step would stay
  in the history. Every such line moves to ``metrics.rejected.jsonl`` beside it
  (:data:`REJECTED_FILE`, one JSON object per line: its line number, the reason and
  its text), never deleted; damaged, non-finite and duplicated lines are reported in
  one line on stderr.

  Returns:
    The number of lines set aside.
  """
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    raw_lines = f.read().splitlines(keepends=True)
  kept, rejected = _sort_lines(raw_lines, step)
  if not rejected:
    return 0
  aside = os.path.join(os.path.dirname(os.path.abspath(path)), REJECTED_FILE)
  stamp = time.strftime("%Y-%m-%d %H:%M:%S")
  for r in rejected:
    atomic.append_line(
      aside, atomic.dumps(dict(r, time=stamp, resumed_from_step=step)), fsync=False
    )
  atomic.write_bytes(path, b"".join(kept))
  counts = {k: sum(r["reason"] == k for r in rejected) for k in ("torn", "non-finite", "duplicate")}
  if any(counts.values()):
    what = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(
      f"warning: {path}: set aside {what} line(s) (torn or unreadable: a write cut short "
      f"by a kill or a full disk; non-finite: not JSON) in {aside}; the file keeps one "
      "record per step.",
      file=sys.stderr,
      flush=True,
    )
  return len(rejected)


def check_metrics_cover(path: str, step: int, log_every_steps: int, steps_per_epoch: int) -> bool:
  """Whether ``metrics.jsonl`` holds the train record of the last logged step up to ``step``.

  A copy of the run directory that lost the end of the file (restored from
  an older backup, cut short) is reported in one line on stderr.

  Returns:
    True when the file is complete up to ``step`` (or nothing was logged yet).
  """
  last = max(step - step % int(log_every_steps), step - step % int(steps_per_epoch))
  if last == 0:
    return True
  records, _ = read_metrics(path)
  logged = max((int(r["step"]) for r in records if "loss" in r and "step" in r), default=0)
  if logged >= last:
    return True
  print(
    f"warning: {path} ends at step {logged}, the checkpoint is at step {step}: the records "
    f"of steps {logged + 1}..{step} are lost (training goes on from step {step}).",
    file=sys.stderr,
    flush=True,
  )
  return False
