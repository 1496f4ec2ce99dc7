"""``exvae-eval`` puts its scalars into TensorBoard next to the training curves.

The scalars ``eval/test_nll``, ``eval/test_elbo``, ``eval/test_recon`` and
``eval/test_kl`` (nats, at the evaluated checkpoint's step) go into an event
file in the run directory, or in ``config.eval.out_dir`` when that is set, so
``tensorboard --logdir runs/`` shows the test NLL with the run.
``config.tensorboard = False`` turns it off.

The file is named after the evaluation (``...eval-<identity>``: its parameters,
test images and settings, see :mod:`exvae.eval_lib`) and written atomically, so
an evaluation that is reused writes its scalars only when they are missing (a
kill right after ``eval_metrics.json`` appeared, a full disk at this write), and a
failed write leaves no empty file behind.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Mapping

from absl import logging

SCALARS = ("test_nll", "test_elbo", "test_recon", "test_kl")
_SUFFIX = ".eval-"


def event_file(logdir: str, metrics: Mapping[str, Any]) -> str | None:
  """The event file in ``logdir`` that holds the scalars of this evaluation, or None."""
  tag = _SUFFIX + str(metrics.get("identity_sha256") or "")[:16]
  if not os.path.isdir(logdir) or tag == _SUFFIX:
    return None
  for name in sorted(os.listdir(logdir)):
    p = os.path.join(logdir, name)
    if name.startswith("events.out.tfevents.") and name.endswith(tag) and os.path.getsize(p):
      return p
  return None


def _events_bytes(metrics: Mapping[str, Any], step: int) -> bytes:
  """The TFRecord bytes of a version event and one event per scalar."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c as masked
  from tensorboardX.summary import scalar

  now = time.time()
  events = [event_pb2.Event(wall_time=now, step=0, file_version="brain.Event:2")]
  values = [(f"eval/{k}", metrics[k]) for k in SCALARS if metrics.get(k) is not None]
  values.append(("eval/num_importance_samples", metrics["num_importance_samples"]))
  for tag, v in values:
    events.append(event_pb2.Event(wall_time=now, step=step, summary=scalar(tag, float(v))))
  out = []
  for e in events:
    data = e.SerializeToString()
    header = struct.pack("Q", len(data))
    out += [header, struct.pack("I", masked(header)), data, struct.pack("I", masked(data))]
  return b"".join(out)


def write(metrics: Mapping[str, Any], config, workdir: str) -> str | None:
  """Writes the evaluation scalars as TensorBoard summaries, unless they are there already.

  Args:
    metrics: what :func:`exvae.eval_lib.evaluate` returns (``test_nll``, ...,
      ``checkpoint_step``, ``num_importance_samples``, ``identity_sha256``).
    config: the evaluated config (``tensorboard``, ``eval.out_dir``).
    workdir: the run directory.

  Returns:
    The event file (written now or before), or None (turned off, not process 0, or no
    tensorboardX).

  Raises:
    errors.DiskFullError, errors.ReadOnlyError: the file could not be written (nothing
      is left behind; the next evaluation writes it).
  """
  from exvae import atomic, distributed

  if not bool(config.get("tensorboard", True)) or not distributed.is_primary():
    return None
  logdir = str(config.eval.get("out_dir", "")) or workdir
  try:
    import tensorboardX  # noqa: F401
  except ImportError as e:
    logging.warning("eval scalars not written to TensorBoard: %s", e)
    return None
  done = event_file(logdir, metrics)
  if done is not None:
    return done
  data = _events_bytes(metrics, int(metrics.get("checkpoint_step", 0)))
  name = (
    f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    f"{_SUFFIX}{str(metrics.get('identity_sha256') or 'unknown')[:16]}"
  )
  return atomic.write_bytes(os.path.join(logdir, name), data)
