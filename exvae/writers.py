"""TensorBoard summaries of a training run, next to the plain ``metrics.jsonl``.

Every record the trainer appends to ``<workdir>/metrics.jsonl`` is also
written as TensorBoard summaries into ``<workdir>`` (one event file per
training session), so ``tensorboard --logdir runs/`` shows every run under
``runs/`` by its workdir name:

* ``train/<key>`` for the train scalars (``loss``, ``elbo``, ``recon``,
  ``kl``, ``beta``, the prior's ``describe()`` scalars such as
  ``prior_log_var``, plus ``prior_var`` = exp(prior_log_var)) and
  ``train/steps_per_sec`` (between consecutive records);
* ``val/loss``, ``val/recon``, ``val/kl``, ``val/best`` once per validated epoch;
* ``val/samples_and_reconstructions``: the epoch's picture (prior samples
  above validation images and their reconstructions).

The writer is tensorboardX: it writes the event protocol buffers itself
with numpy and protobuf, so neither TensorFlow nor PyTorch is needed (clu's
``metric_writers`` write TensorBoard summaries through ``tf.summary``, i.e.
TensorFlow). ``config.tensorboard = False`` turns it off; only process 0
writes. :func:`read_scalars` reads the scalars back with TensorBoard's own
loader when it is installed (``pip install exvae[tensorboard]``).
"""

from __future__ import annotations

import atexit
import math
import os
from typing import Any

from absl import logging

_OPEN: dict[str, "RunWriter"] = {}
_SKIP = {"step", "epoch", "time", "picture", "summary", "bad_epochs"}


class RunWriter:
  """Writes one run's metric records as TensorBoard summaries.

  Attributes:
    logdir: the directory of the event files (the workdir).
  """

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter
    self.logdir = logdir
    self._writer = SummaryWriter(logdir=logdir, flush_secs=30)
    self._last = None                       # (step, time) of the previous train record

  def write(self, record: dict[str, Any]) -> None:
    """Writes one ``metrics.jsonl`` record (train, validation or summary)."""
    if "summary" in record or "step" not in record:
      return
    step = int(record["step"])
    w = self._writer
    if "val_loss" in record:
      for key in ("val_loss", "val_recon", "val_kl"):
        if key in record:
          w.add_scalar("val/" + key[4:], float(record[key]), step)
      if record.get("best_val") is not None:
        w.add_scalar("val/best", float(record["best_val"]), step)
      if record.get("picture") and os.path.isfile(record["picture"]):
        import numpy as np
        from PIL import Image
        img = np.asarray(Image.open(record["picture"]).convert("RGB"))
        w.add_image("val/samples_and_reconstructions", img, step, dataformats="HWC")
    else:
      for key, value in record.items():
        if key in _SKIP or not isinstance(value, (int, float)):
          continue
        w.add_scalar("train/" + key, float(value), step)
        if key.endswith("log_var"):
          w.add_scalar("train/" + key[:-len("log_var")] + "var", math.exp(float(value)), step)
      if "epoch" in record:
        w.add_scalar("train/epoch", float(record["epoch"]), step)
      t = record.get("time")
      if t is not None and self._last is not None and step > self._last[0] and t > self._last[1]:
        w.add_scalar("train/steps_per_sec", (step - self._last[0]) / (t - self._last[1]), step)
      self._last = (step, t) if t is not None else None
    w.flush()

  def close(self) -> None:
    self._writer.close()


def open_run(workdir: str, enabled: bool = True) -> RunWriter | None:
  """Starts TensorBoard summaries for ``workdir`` (closing a previous writer there).

  Args:
    workdir: the run directory (the event files go there).
    enabled: False (``config.tensorboard``, or not process 0): write nothing.

  Returns:
    The writer, or None when disabled or tensorboardX is missing (logged).
  """
  key = os.path.abspath(workdir)
  close(workdir)
  if not enabled:
    return None
  try:
    writer = RunWriter(workdir)
  except ImportError as e:                   # a declared dependency; say why if it is missing
    logging.warning("TensorBoard summaries off: %s (pip install tensorboardX).", e)
    return None
  _OPEN[key] = writer
  return writer


def write(metrics_path: str, record: dict[str, Any]) -> None:
  """Forwards a record appended to ``<workdir>/metrics.jsonl`` to that run's open writer."""
  writer = _OPEN.get(os.path.dirname(os.path.abspath(metrics_path)))
  if writer is not None:
    writer.write(record)


def close(workdir: str) -> None:
  """Closes the writer of ``workdir``, if one is open."""
  writer = _OPEN.pop(os.path.abspath(workdir), None)
  if writer is not None:
    writer.close()


@atexit.register
def _close_all() -> None:
  for key in list(_OPEN):
    _OPEN.pop(key).close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads back the scalars of the event files in ``logdir`` with TensorBoard's loader.

  Returns:
    ``{tag: [(step, value), ...]}`` in the order written.

  Raises:
    ImportError: the ``tensorboard`` package is not installed.
  """
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(logdir: str) -> dict[str, int]:
  """``{tag: number of images}`` of the event files in ``logdir`` (TensorBoard's loader)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0})
  acc.Reload()
  return {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}
