"""``exvae-eval`` puts its scalars into TensorBoard next to the training curves.

The scalars ``eval/test_nll``, ``eval/test_elbo``, ``eval/test_recon`` and
``eval/test_kl`` (nats, at the evaluated checkpoint's step) go into a new
event file in the run directory, or in ``config.eval.out_dir`` when that is
set, so ``tensorboard --logdir runs/`` shows the test NLL with the run.
``config.tensorboard = False`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging

SCALARS = ("test_nll", "test_elbo", "test_recon", "test_kl")


def write(metrics: Mapping[str, Any], config, workdir: str) -> str | None:
  """Writes the evaluation scalars as TensorBoard summaries.

  Args:
    metrics: what :func:`exvae.eval_lib.evaluate` returns (``test_nll``, ...,
      ``checkpoint_step``, ``num_importance_samples``).
    config: the evaluated config (``tensorboard``, ``eval.out_dir``).
    workdir: the run directory.

  Returns:
    The directory written to, or None (turned off, not process 0, or no tensorboardX).
  """
  from exvae import distributed
  if not bool(config.get("tensorboard", True)) or not distributed.is_primary():
    return None
  logdir = str(config.eval.get("out_dir", "")) or workdir
  try:
    from tensorboardX import SummaryWriter
  except ImportError as e:
    logging.warning("eval scalars not written to TensorBoard: %s", e)
    return None
  os.makedirs(logdir, exist_ok=True)
  step = int(metrics.get("checkpoint_step", 0))
  w = SummaryWriter(logdir=logdir, filename_suffix=".eval")
  try:
    for key in SCALARS:
      if metrics.get(key) is not None:
        w.add_scalar(f"eval/{key}", float(metrics[key]), step)
    w.add_scalar("eval/num_importance_samples", float(metrics["num_importance_samples"]), step)
  finally:
    w.close()
  return logdir
