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
writes. :func:`read_scalars` and :func:`read_image_tags` read the scalars and
the pictures back with TensorBoard's own loader when it is installed
(``pip install exvae[tensorboard]``; ``docs/api.md``).
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
    self._last = None  # (step, time) of the previous train record

  def path(self) -> str | None:
    """The event file this writer writes."""
    try:
      return self._writer._get_file_writer().event_writer._ev_writer._file_name
    except AttributeError:
      return None

  def flush(self) -> None:
    self._writer.flush()

  def write(self, record: dict[str, Any], flush: bool = True) -> None:
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
          w.add_scalar("train/" + key[: -len("log_var")] + "var", math.exp(float(value)), step)
      if "epoch" in record:
        w.add_scalar("train/epoch", float(record["epoch"]), step)
      t = record.get("time")
      if t is not None and self._last is not None and step > self._last[0] and t > self._last[1]:
        w.add_scalar("train/steps_per_sec", (step - self._last[0]) / (t - self._last[1]), step)
      self._last = (step, t) if t is not None else None
    if flush:
      w.flush()

  def close(self) -> None:
    self._writer.close()


EVENTS_PREFIX = "events.out.tfevents."


def event_files(logdir: str) -> list[str]:
  """The TensorBoard event files directly in ``logdir``."""
  if not os.path.isdir(logdir):
    return []
  return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if n.startswith(EVENTS_PREFIX))


def open_run(
  workdir: str, enabled: bool = True, replay: list[dict[str, Any]] | None = None
) -> RunWriter | None:
  """Starts TensorBoard summaries for ``workdir`` (closing a previous writer there).

  TensorBoard events are made from ``metrics.jsonl``, the run's record: with
  ``replay`` (the records a resumed run keeps), the new event file first gets
  every one of them and the earlier event files are removed, so the events
  hold each step of ``metrics.jsonl`` exactly once, whatever stopped the
  earlier sessions (a kill between the two writes, records dropped on resume).

  Args:
    workdir: the run directory (the event files go there).
    enabled: False (``config.tensorboard``, or not process 0): write nothing.
    replay: the ``metrics.jsonl`` records to write first (None: keep the
      earlier event files as they are).

  Returns:
    The writer, or None when disabled or tensorboardX is missing (logged).
  """
  key = os.path.abspath(workdir)
  close(workdir)
  if not enabled:
    return None
  earlier = event_files(workdir) if replay is not None else []
  try:
    writer = RunWriter(workdir)
  except ImportError as e:  # a declared dependency; say why if it is missing
    logging.warning("TensorBoard summaries off: %s (pip install tensorboardX).", e)
    return None
  if replay is not None:
    for record in replay:
      writer.write(record, flush=False)
    writer.flush()
    mine = os.path.abspath(writer.path()) if writer.path() else None
    for path in earlier:  # derived from metrics.jsonl, now rewritten
      if os.path.abspath(path) != mine:
        try:
          os.remove(path)
        except OSError:
          pass
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
    try:
      _OPEN.pop(key).close()
    except Exception:  # noqa: BLE001  (a full or read-only disk at exit: the run said why)
      pass


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads back the scalars of the event files in ``logdir`` with TensorBoard's loader.

  Returns:
    ``{tag: [(step, value), ...]}`` in the order written.

  Raises:
    ImportError: the ``tensorboard`` package is not installed.
  """
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(
    logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(logdir: str) -> dict[str, int]:
  """``{tag: number of images}`` of the event files in ``logdir`` (TensorBoard's loader).

  Raises:
    ImportError: the ``tensorboard`` package is not installed.
  """
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0})
  acc.Reload()
  return {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}
