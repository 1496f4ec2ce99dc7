"""Orbax checkpoints: atomic saves, resume from the latest readable step.

Each checkpoint step holds three items:
  ``state``  the full :class:`~exvae.train_lib.TrainState` (params, optimiser
             state, RAT cache, base key, step),
  ``best``   the best-on-validation parameters so far,
  ``meta``   JSON: epochs validated, best validation loss and epoch, early
             stopping counter, finished flag.
Orbax writes a step into a temporary directory and renames it when complete,
so a kill mid-save never leaves a half-written step that looks complete.  If
the newest step still cannot be read (disk corruption, a truncated file), we
fall back to the previous one and say so.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointNotFoundError(FileNotFoundError):
  """No (readable) checkpoint in a workdir."""


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Manager:
  """Thin wrapper around ``ocp.CheckpointManager`` for exvae's three items."""

  def __init__(self, directory: str, max_to_keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(
          f"No checkpoint directory {self.directory}: train first with "
          "`python train.py --config=... --workdir=...` (same workdir).")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "best", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, best_params, meta: dict[str, Any]) -> None:
    """Saves (asynchronously) unless ``step`` is already saved."""
    if step in self._mngr.all_steps():
      return
    # Host copies first: the save is asynchronous, and the caller's device
    # buffers are donated to the next train step right after this returns.
    state, best_params = jax.device_get((state, best_params))
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best_params),
        meta=ocp.args.JsonSave(meta)), force=True)

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
    steps = self.all_steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        out = self._restore(step, state_template if need_state else None, best_template)
      except Exception as e:  # noqa: BLE001  (any read failure means: try the previous step)
        msg = (f"Checkpoint step {step} in {self.directory} could not be restored "
               f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous step.")
        warnings.warn(msg)
        print("WARNING: " + msg, flush=True)
        errors.append(step)
        continue
      if errors:
        print(f"Restored step {step} (newer unreadable steps: {errors}).", flush=True)
      return out.get("state") if need_state else None, out["best"], dict(out["meta"])
    raise CheckpointNotFoundError(
        f"None of the checkpoints {steps} in {self.directory} could be restored "
        "(see the warnings above). If they were written with a different config "
        "(model size, prior, data set), pass the same config or use a new --workdir.")

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()
