"""Orbax checkpoints: atomic saves, resume from the latest readable step.

Each checkpoint step holds three items:
  ``state``  the full :class:`~exvae.train_lib.TrainState` (params, optimiser
             state, RAT cache, base key, step),
  ``best``   the best-on-validation parameters so far,
  ``meta``   JSON: epochs validated, best validation loss and epoch, early
             stopping counter, finished flag.
Orbax writes a step into a temporary directory and renames it when complete,
so a kill mid-save never leaves a half-written step that looks complete.  If
the newest step still cannot be read (disk corruption, a truncated file, or a
state saved after non-finite steps by an older version), we fall back to the
previous one and say so; the writer then moves the unreadable steps aside
(``<workdir>/unreadable_checkpoints/``) so that the retrained steps replace them.

Only the writer (holding the workdir lock, see :mod:`exvae.rundir`) opens a
manager that creates, deletes or cleans up anything; readers (``eval.py``,
``uses.py``) open it with ``read_only=True`` and never touch the directory, so
they can run while training is saving.  Saves are waited for, so a failed
save (a full disk) stops training at once.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from exvae import rundir


# How long a save may wait on its commit threads (see Manager.__init__).
_COMMIT_TIMEOUT_S = 7 * 24 * 3600


class CheckpointNotFoundError(FileNotFoundError):
  """No (readable) checkpoint in a workdir."""


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


def _human(nbytes: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(nbytes) < 1024 or unit == "TB":
      return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
    nbytes /= 1024
  return f"{nbytes:.1f} TB"


class Manager:
  """Thin wrapper around ``ocp.CheckpointManager`` for exvae's three items."""

  def __init__(self, directory: str, max_to_keep: int = 3, create: bool = True,
               read_only: bool = False):
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
    self._unreadable: set[int] = set()
    if (not create or read_only) and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(
          f"No checkpoint directory {self.directory}: train first with "
          "`python train.py --config=... --workdir=...` (same workdir).")
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             save_interval_steps=0,
                                             cleanup_tmp_directories=False)
      for attempt in range(3):     # a step the writer rotates away while we list it
        try:
          with _quiet_read_only():
            self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                               item_names=("state", "best", "meta"))
          break
        except FileNotFoundError:
          if attempt == 2:
            raise
      return
    if int(max_to_keep) < 1:
      raise rundir.ConfigError(
          f"keep_checkpoints must be >= 1, got {max_to_keep}: 0 would delete every checkpoint "
          f"in {self.directory}.")
    # Orbax's commit threads time out after 1200 s by default, counted on a clock
    # that runs on while the process is stopped: a run paused longer than that
    # (SIGSTOP, a suspended VM) died in the middle of a save on continuing.
    # save() waits for every save anyway: save synchronously, and let the threads
    # Orbax still starts wait up to a week.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(max_to_keep), create=create, cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
        async_options=ocp.AsyncOptions(timeout_secs=_COMMIT_TIMEOUT_S))
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "best", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, best_params, meta: dict[str, Any]) -> None:
    """Saves ``step`` and waits for it, unless a readable ``step`` is already saved.

    Raises:
      ValueError: ``state`` or ``best_params`` holds non-finite values, or
        ``state.nonfinite`` counts skipped steps (nothing is written).
      rundir.DiskFullError: no space left; the step is not written (the
        previous steps are intact).
    """
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only")
    if step in self._mngr.all_steps():
      if step not in self._unreadable:
        return
      self._set_aside([step])               # a step that failed to restore: replace it
    # Host copies first: the caller's device buffers are donated to the next
    # train step right after this returns.
    state, best_params = jax.device_get((state, best_params))
    _check_finite(state, best_params)
    try:
      with _quiet_failed_save():
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best_params),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()
    except Exception as e:
      if rundir.is_disk_full(e):
        need = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves((state, best_params)))
        free = shutil.disk_usage(self.directory).free
        raise rundir.DiskFullError(
            f"Disk full while saving checkpoint step {step} in {self.directory}: "
            f"{_human(free)} free, a checkpoint needs about {_human(need)}. Free some space "
            "and run the same command again: training resumes from the last good checkpoint "
            f"(steps kept: {self.all_steps() or 'none'}).") from e
      raise

  def _restore(self, step: int, state_template=None, best_template=None):
    items = {"meta": ocp.args.JsonRestore()}
    if state_template is not None:
      items["state"] = ocp.args.StandardRestore(_abstract(state_template))
    if best_template is not None:
      items["best"] = ocp.args.StandardRestore(_abstract(best_template))
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    for name in items:
      if out[name] is None:
        raise ValueError(f"item {name!r} missing")
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
    return out

  def restore_latest(self, state_template, best_template, *, need_state: bool = True):
    """Restores the newest readable step; falls back to older ones with a warning.

    Args:
      state_template: a TrainState with the right structure/shapes (or None to
        skip restoring the train state).
      best_template: a params pytree with the right structure/shapes.
      need_state: restore the full train state (False: only best + meta).

    Returns:
      ``(state, best_params, meta)``, or None when the directory holds no step.

    Raises:
      CheckpointNotFoundError: steps exist but none can be read.
    """
    for attempt in range(3):
      steps = self.all_steps()
      if not steps:
        return None
      try:
        return self._restore_newest(steps, state_template, best_template, need_state)
      except CheckpointNotFoundError:
        # A writer may have rotated every step we listed away while we read them.
        self._mngr.reload()
        if attempt == 2 or self.all_steps() == steps:
          raise
    raise AssertionError("unreachable")

  def _restore_newest(self, steps, state_template, best_template, need_state):
    """The newest readable step of ``steps`` (see :meth:`restore_latest`)."""
    errors = []
    for step in reversed(steps):
      try:
        out = self._restore(step, state_template if need_state else None, best_template)
      except Exception as e:  # noqa: BLE001  (any read failure means: try the previous step)
        if not os.path.isdir(os.path.join(self.directory, str(step))):
          continue                 # deleted by the writer's rotation: not a corrupt step
        msg = (f"Checkpoint step {step} in {self.directory} could not be restored "
               f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous step.")
        warnings.warn(msg)
        print("WARNING: " + msg, flush=True)
        errors.append(step)
        continue
      self._unreadable.update(errors)
      if errors:
        print(f"Restored step {step} (newer unreadable steps: {errors}).", flush=True)
        if not self.read_only:
          self._set_aside(errors)
      return out.get("state") if need_state else None, out["best"], dict(out["meta"])
    raise CheckpointNotFoundError(
        f"None of the checkpoints {steps} in {self.directory} could be restored "
        "(see the warnings above). If they were written with a different config "
        "(model size, prior, data set), pass the same config or use a new --workdir.")

  def _set_aside(self, steps) -> None:
    """Writer only: moves unreadable steps to ``<workdir>/unreadable_checkpoints/``.

    The retrained steps then replace them: a corrupt step never stays the
    newest one, which readers would skip in favour of older parameters.
    """
    aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        dst = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(src, dst)
        print(f"Moved unreadable checkpoint step {step} to {dst}; training writes it again.",
              flush=True)
      self._unreadable.discard(step)
    self._mngr.reload()

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
