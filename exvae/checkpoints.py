"""Orbax checkpoints: atomic saves, verified restores, resume from the newest good step.

Each checkpoint step holds four items:
  ``state``  the full :class:`~exvae.train_lib.TrainState` (params, optimiser
             state, RAT cache, base key, step),
  ``best``   the best-on-validation parameters so far,
  ``meta``   JSON: epochs validated, best validation loss and epoch, early
             stopping counter, finished flag,
  ``digest`` JSON: dtype, shape and a blake2b-128 hash of every array of
             ``state`` and ``best``, and a hash of ``meta``.
Orbax writes a step into a temporary directory and renames it when complete,
so a kill mid-save never leaves a half-written step that looks complete, and
the digest is part of the same step.  Every restore (readers and resume)
checks the restored values against the digest: a step that cannot be read,
or whose values differ from what was saved (a flipped byte, a truncated
file), is skipped for the previous good one with one line on stderr; the
writer then moves the bad steps aside (``<workdir>/unreadable_checkpoints/``,
never deleted) so that the retrained steps replace them.  A step saved
without a digest restores unverified.  Checkpoints of another model (other
array shapes) are an error, not a corruption.

Only the writer (holding the workdir lock, see :mod:`exvae.rundir`) opens a
manager that creates, deletes or cleans up anything; readers (``eval.py``,
``uses.py``) open it with ``read_only=True`` and never touch the directory, so
they can run while training is saving.  Saves are waited for, so a failed
save (a full disk) stops training at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import logging as py_logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from exvae import atomic, errors
from exvae.errors import CheckpointMismatchError, CheckpointNotFoundError  # noqa: F401


# How long a save may wait on its commit threads (see Manager.__init__).
_COMMIT_TIMEOUT_S = 7 * 24 * 3600
_LIST_ATTEMPTS = 5  # a reader lists the steps this often while a writer rotates them


# The items of a step.  ``digest`` (JSON) holds a hash of every saved array and of
# ``meta``, written in the same atomic save as the arrays; steps written before it
# existed have none and restore unverified.
ITEMS = ("state", "best", "meta", "digest")
DIGEST_FORMAT = 1


class IntegrityError(ValueError):
  """A restored array (or ``meta``) differs from the digest recorded when it was saved."""


def _hash(data: bytes) -> str:
  return hashlib.blake2b(data, digest_size=16).hexdigest()


def tree_digest(tree) -> dict[str, list]:
  """``{tree path: [dtype, shape, blake2b-128 hex of the bytes]}`` of every leaf of ``tree``.

  Args:
    tree: a pytree of arrays (host or device).

  Returns:
    A JSON-able dict keyed by ``jax.tree_util.keystr`` of each leaf's path.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not getattr(leaf, "is_fully_addressable", True):
      continue  # another host's shards: that host checks them
    a = np.asarray(leaf)  # tobytes(): C order, whatever the layout
    out[jax.tree_util.keystr(path)] = [str(a.dtype), list(a.shape), _hash(a.tobytes())]
  return out


def meta_digest(meta: dict) -> str:
  """blake2b-128 hex of ``meta`` as canonical JSON."""
  return _hash(json.dumps(meta, sort_keys=True).encode())


FILES_DIGEST = "file_digests.json"


def _file_hash(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def step_files_digest(step_dir: str) -> dict[str, str]:
  """``{relative path: blake2b-128 hex}`` of every file of a saved step (but this record)."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != FILES_DIGEST:
        out[rel] = _file_hash(os.path.join(root, name))
  return dict(sorted(out.items()))


def _template_shapes(tree) -> dict[str, list]:
  return {
    jax.tree_util.keystr(p): list(np.shape(x)) if not hasattr(x, "shape") else list(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class _DropReadOnlyChatter(py_logging.Filter):
  """Orbax warns about every read-only option it sets; a reader means it."""

  def filter(self, record):
    msg = record.getMessage()
    return not ("read_only=True" in msg or "read only" in msg)


class _DropOrbaxErrors(py_logging.Filter):
  """A failed save is raised to the caller (one line); Orbax also logs its traceback."""

  def filter(self, record):
    return not (record.levelno >= py_logging.ERROR and "orbax" in (record.pathname or ""))


@contextlib.contextmanager
def _quiet_failed_save():
  logger, f = py_logging.getLogger("absl"), _DropOrbaxErrors()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


@contextlib.contextmanager
def _quiet_read_only():
  logger, f = py_logging.getLogger("absl"), _DropReadOnlyChatter()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


class _DropLibraryRecords(py_logging.Filter):
  """After the decision to stop, Orbax's and TensorStore's threads have nothing to add."""

  def filter(self, record):
    path = record.pathname or ""
    return not ("orbax" in path or "tensorstore" in path or "etils" in path)


_SILENCED = []


def silence_background_threads(crash_dumps: bool = False) -> None:
  """Keeps library threads quiet once the program has decided to stop (idempotent).

  Args:
    crash_dumps: also turn faulthandler's stack dumps off (Ctrl-C: the process ends).

  A stop (Ctrl-C, SIGTERM, a full disk) can interrupt a save while Orbax's
  commit threads still run; their tracebacks and log records would follow
  the one line that says why the program stopped.  Records from Orbax and
  TensorStore are dropped and exceptions in threads other than the main one
  are not printed.
  """
  if crash_dumps:
    # absl's app.run turns on faulthandler; a crash of a library thread during the
    # interpreter's teardown would print every thread's stack after the one line.
    faulthandler.disable()
  if _SILENCED:
    return
  f = _DropLibraryRecords()
  for name in ("absl", ""):
    py_logging.getLogger(name).addFilter(f)
    for h in py_logging.getLogger(name).handlers:
      h.addFilter(f)
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda args: None  # asyncio loops of Orbax closed at exit
  _SILENCED.append(f)


def _human(nbytes: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(nbytes) < 1024 or unit == "TB":
      return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
    nbytes /= 1024
  return f"{nbytes:.1f} TB"


def _list_steps(list_fn):
  """Calls ``list_fn``, an Orbax call that lists the steps, until a listing completes.

  A running writer may rotate a step away while a reader's Orbax lists the steps.
  Orbax then fails with FileNotFoundError, or with NotADirectoryError when the step
  vanishes between its exists() and is_dir() checks. Listing again sees the
  directory as it is now; after ``_LIST_ATTEMPTS`` tries the error is raised.
  """
  for attempt in range(_LIST_ATTEMPTS):
    try:
      return list_fn()
    except (FileNotFoundError, NotADirectoryError):
      if attempt == _LIST_ATTEMPTS - 1:
        raise
      time.sleep(0.05 * (attempt + 1))
  raise AssertionError("unreachable")


class Manager:
  """Thin wrapper around ``ocp.CheckpointManager`` for exvae's three items."""

  def __init__(
    self, directory: str, max_to_keep: int = 3, create: bool = True, read_only: bool = False
  ):
    """Opens the checkpoint directory.

    Args:
      directory: ``<workdir>/checkpoints``.
      max_to_keep: newest steps kept by a writer (>= 1).
      create: create the directory (writers).
      read_only: a reader: never saves, deletes or cleans up temporary
        directories (an in-progress save of a running writer stays intact).
    """
    self.directory = os.path.abspath(directory)
    self.read_only = bool(read_only)
    # The run's config.json as this writer found it (checked and settled by rundir.Writer):
    # every step it saves records its digest and values (see recorded_config).
    self._config = {} if read_only else _config_record(os.path.dirname(self.directory))
    self._unreadable: set[int] = set()
    self.fallbacks: list[int] = []  # steps skipped by the last restore
    self.verified: bool | None = None  # the last restore checked digests (None: none)
    if (not create or read_only) and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(
        f"No checkpoint directory {self.directory}: train first with "
        "`exvae-train --config=... --workdir=...` (same workdir)."
      )
    if read_only:
      options = ocp.CheckpointManagerOptions(
        read_only=True,
        create=False,
        max_to_keep=None,
        save_interval_steps=0,
        cleanup_tmp_directories=False,
      )

      def open_manager():
        with _quiet_read_only(), _quiet_failed_save():
          return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

      self._mngr = _list_steps(open_manager)
      return
    if int(max_to_keep) < 1:
      raise errors.ConfigError(
        f"keep_checkpoints must be >= 1, got {max_to_keep}: 0 would delete every checkpoint "
        f"in {self.directory}."
      )
    # Orbax's commit threads time out after 1200 s by default, counted on a clock
    # that runs on while the process is stopped: a run paused longer than that
    # (SIGSTOP, a suspended VM) died in the middle of a save on continuing.
    # save() waits for every save anyway: save synchronously, and let the threads
    # Orbax still starts wait up to a week.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(max_to_keep),
      create=create,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=False,
      async_options=ocp.AsyncOptions(timeout_secs=_COMMIT_TIMEOUT_S),
    )
    with _quiet_failed_save():  # a damaged step's metadata: restore_latest says it in one line
      self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, best_params, meta: dict[str, Any]) -> None:
    """Saves ``step`` with the digest of its arrays and waits for it.

    Nothing happens if a readable ``step`` is already saved.

    Raises:
      ValueError: ``state`` or ``best_params`` holds non-finite values, or
        ``state.nonfinite`` counts skipped steps (nothing is written).
      errors.DiskFullError: no space left; the step is not written (the
        previous steps are intact).
      errors.ReadOnlyError: the checkpoint directory cannot be written.
    """
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only")
    if step in self._mngr.all_steps():
      if step not in self._unreadable:
        return
      self._set_aside([step])  # a step that failed to restore: replace it
    # Host copies first: the caller's device buffers are donated to the next
    # train step right after this returns.
    state, best_params = jax.device_get((state, best_params))
    _check_finite(state, best_params)
    digest = {
      "format": DIGEST_FORMAT,
      "hash": "blake2b-128",
      "state": tree_digest(state),
      "best": tree_digest(best_params),
      "meta": meta_digest(meta),
      **self._config,
    }
    try:
      with _quiet_failed_save():
        self._mngr.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best=ocp.args.StandardSave(best_params),
            meta=ocp.args.JsonSave(meta),
            digest=ocp.args.JsonSave(digest),
          ),
          force=True,
        )
        self._mngr.wait_until_finished()
    except Exception as e:
      if errors.is_disk_full(e):
        need = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves((state, best_params)))
        free = shutil.disk_usage(self.directory).free
        raise errors.DiskFullError(
          f"Disk full while saving checkpoint step {step} in {self.directory}: "
          f"{_human(free)} free, a checkpoint needs about {_human(need)}. Free some space "
          "and run the same command again: training resumes from the last good checkpoint "
          f"(steps kept: {self.all_steps() or 'none'})."
        ) from e
      typed = errors.as_write_error(e, f"checkpoint step {step} in {self.directory}")
      if typed is not e:
        raise typed from e
      raise
    # Every byte of the step, not only the values a restore reads back: written once
    # the step is complete (a step without this record still has its value digest).
    step_dir = os.path.join(self.directory, str(step))
    atomic.write_json(
      os.path.join(step_dir, FILES_DIGEST),
      {"format": DIGEST_FORMAT, "hash": "blake2b-128", "files": step_files_digest(step_dir)},
      indent=None,
    )

  def _read_digest(self, step: int) -> dict | None:
    """The step's recorded digest, or None for a step saved without one."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "digest")):
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(digest=ocp.args.JsonRestore()))
    digest = out["digest"]
    if not isinstance(digest, dict) or digest.get("format") != DIGEST_FORMAT:
      raise IntegrityError("its digest record is unreadable")
    return digest

  def _check_shapes(self, step: int, digest: dict, templates: dict) -> None:
    """Raises CheckpointMismatchError if the saved arrays have other paths or shapes."""
    for name, template in templates.items():
      want = _template_shapes(template)
      have = {k: v[1] for k, v in digest[name].items()}
      if want == have:
        continue
      diff = sorted(set(want) ^ set(have))
      if diff:
        detail = (
          f"{name}{diff[0]} is only in {'the checkpoint' if diff[0] in have else 'this config'}"
        )
      else:
        k = next(k for k in want if want[k] != have[k])
        detail = f"{name}{k} is {tuple(have[k])} there and {tuple(want[k])} here"
      raise CheckpointMismatchError(
        f"Checkpoint step {step} in {self.directory} holds another model than this config "
        f"builds ({detail}): a resume or an evaluation needs the config the run was trained "
        "with (an allowed config change cannot change the model's shapes). Pass the run's "
        "config, or use a new --workdir."
      )

  def _restore(self, step: int, state_template=None, best_template=None):
    """Restores one step and checks it (digest, finiteness).

    Raises:
      CheckpointMismatchError: the step holds arrays of other paths or shapes.
      IntegrityError: a restored value differs from its recorded digest.
      ValueError, OSError, ...: the step cannot be read.
    """
    items = {"meta": ocp.args.JsonRestore()}
    templates = {}
    if state_template is not None:
      items["state"] = ocp.args.StandardRestore(_abstract(state_template))
      templates["state"] = state_template
    if best_template is not None:
      items["best"] = ocp.args.StandardRestore(_abstract(best_template))
      templates["best"] = best_template
    _verify_files(os.path.join(self.directory, str(step)))
    digest = self._read_digest(step)
    if digest is not None:
      try:
        self._check_shapes(step, digest, templates)
      except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise IntegrityError(f"its digest record is malformed ({e!r})") from e
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    for name in items:
      if out[name] is None:
        raise ValueError(f"item {name!r} missing")
    if digest is not None:
      _verify(out, digest, list(templates))
    # Written by an older version, which could save a state after skipped steps.
    if "state" in items and int(getattr(out["state"], "nonfinite", 0)) > 0:
      raise ValueError("the state was saved after non-finite (skipped) steps")
    # A checkpoint whose arrays are not finite is as unusable as a torn one.
    for name in ("state", "best"):
      if name in items:
        for leaf in jax.tree.leaves(out[name]):
          if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
              raise ValueError(f"item {name!r} holds non-finite values")
    self.verified = digest is not None
    return out

  def restore_latest(self, state_template, best_template, *, need_state: bool = True):
    """Restores the newest good step; falls back to older ones with one line on stderr.

    A step is good when it can be read, its arrays match the digest recorded
    when it was saved (steps saved without a digest are accepted unverified)
    and they are finite.  A writer moves the bad steps it skipped aside
    (``<workdir>/unreadable_checkpoints/``, never deleted); a reader leaves
    them where they are.

    Args:
      state_template: a TrainState with the right structure/shapes (or None to
        skip restoring the train state).
      best_template: a params pytree with the right structure/shapes.
      need_state: restore the full train state (False: only best + meta).

    Returns:
      ``(state, best_params, meta)``, or None when the directory holds no step.

    Raises:
      CheckpointNotFoundError: steps exist but none is good.
      CheckpointMismatchError: the checkpoints hold another model (other shapes).
    """
    for attempt in range(3):
      steps = self.all_steps()
      if not steps:
        return None
      try:
        with _quiet_failed_save():  # a bad step is reported in one line, not Orbax's log
          return self._restore_newest(steps, state_template, best_template, need_state)
      except CheckpointNotFoundError:
        # A writer may have rotated every step we listed away while we read them.
        _list_steps(self._mngr.reload)
        if attempt == 2 or self.all_steps() == steps:
          raise
    raise AssertionError("unreachable")

  def _restore_newest(self, steps, state_template, best_template, need_state):
    """The newest good step of ``steps`` (see :meth:`restore_latest`)."""
    bad: dict[int, str] = {}
    for step in reversed(steps):
      try:
        out = self._restore(step, state_template if need_state else None, best_template)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001  (any read failure means: try the previous step)
        if not os.path.isdir(os.path.join(self.directory, str(step))):
          continue  # deleted by the writer's rotation: not a corrupt step
        bad[step] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        continue
      self.fallbacks = list(bad)
      self._unreadable.update(bad)
      if bad:
        where = ""
        if not self.read_only:
          moved = self._set_aside(list(bad))
          where = f"; moved to {os.path.dirname(moved[0])}" if moved else ""
        first = next(iter(bad))
        print(
          f"warning: checkpoint step{'s' if len(bad) > 1 else ''} "
          f"{', '.join(map(str, bad))} in {self.directory} failed to restore or verify "
          f"(step {first}: {bad[first]}){where}; using step {step}.",
          file=sys.stderr,
          flush=True,
        )
      return out.get("state") if need_state else None, out["best"], dict(out["meta"])
    first = next(iter(bad), None)
    detail = f" (step {first}: {bad[first]})" if first is not None else ""
    raise CheckpointNotFoundError(
      f"None of the checkpoints {steps} in {self.directory} can be used: each fails to "
      f"restore or to match its digest{detail}. Nothing was changed; restore the run "
      "directory from a copy, or train again in a new --workdir."
    )

  def _set_aside(self, steps) -> list[str]:
    """Writer only: moves bad steps to ``<workdir>/unreadable_checkpoints/`` (never deletes).

    The retrained steps then replace them: a corrupt step never stays the
    newest one, which readers would skip in favour of older parameters.

    Returns:
      Where the steps went.
    """
    aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
    os.makedirs(aside, exist_ok=True)
    moved = []
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        dst = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(src, dst)
        moved.append(dst)
      self._unreadable.discard(step)
    self._mngr.reload()
    return moved

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def _check_finite(state, best_params) -> None:
  """Raises ValueError if a float leaf is not finite or ``state.nonfinite`` > 0."""
  if int(np.asarray(getattr(state, "nonfinite", 0))) > 0:
    raise ValueError("refusing to save a state after non-finite (skipped) steps")
  for name, tree in (("state", state), ("best", best_params)):
    for leaf in jax.tree.leaves(tree):
      a = np.asarray(leaf)
      if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"refusing to save non-finite values in {name!r}")


def _verify(out, digest: dict, names) -> None:
  """Raises IntegrityError if a restored item differs from the digest saved with it."""
  for name in names:
    got = tree_digest(out[name])
    for key, (dtype, _shape, h) in digest[name].items():
      if key not in got and any(
        jax.tree_util.keystr(p) == key and not getattr(x, "is_fully_addressable", True)
        for p, x in jax.tree_util.tree_flatten_with_path(out[name])[0]
      ):
        continue
      g = got.get(key)
      if g is None or g[2] != h or g[0] != dtype:
        raise IntegrityError(f"{name}{key} differs from the digest recorded at save time")
  if meta_digest(dict(out["meta"])) != digest["meta"]:
    raise IntegrityError("meta differs from the digest recorded at save time")


CONFIG_FILE = "config.json"


def _config_record(workdir: str) -> dict:
  """``{"config_sha256", "config"}`` of ``<workdir>/config.json``, or {} if it cannot be read."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(config, dict):
    return {}
  return {"config_sha256": atomic.json_digest(config), "config": config}


def recorded_config(directory: str) -> dict | None:
  """The config the newest step of ``<workdir>/checkpoints`` was saved with.

  Reads the step's ``digest`` item (JSON, written in the same atomic save as its
  arrays) directly, without restoring anything; a step whose record cannot be read
  gives way to the one before.

  Args:
    directory: ``<workdir>/checkpoints``.

  Returns:
    ``{"step", "config_sha256", "config"}``, the last two None for steps saved before
    they were recorded; None when no step has a readable record.
  """
  if not os.path.isdir(directory):
    return None
  for step in sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True):
    try:
      with open(os.path.join(directory, str(step), "digest", "metadata")) as f:
        digest = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(digest, dict) and digest.get("format") == DIGEST_FORMAT:
      config = digest.get("config")
      return {
        "step": step,
        "config_sha256": digest.get("config_sha256"),
        "config": config if isinstance(config, dict) else None,
      }
  return None


def _verify_files(step_dir: str) -> None:
  """Raises IntegrityError if a file of the step differs from the record written after its save."""
  path = os.path.join(step_dir, FILES_DIGEST)
  if not os.path.exists(path):
    return  # saved before this record existed, or killed just after
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise IntegrityError(f"{FILES_DIGEST} is unreadable ({type(e).__name__})") from e
  for rel, h in recorded.items():
    p = os.path.join(step_dir, rel)
    if not os.path.isfile(p):
      raise IntegrityError(f"file {rel} is missing")
    if _file_hash(p) != h:
      raise IntegrityError(f"file {rel} differs from its digest recorded at save time")
