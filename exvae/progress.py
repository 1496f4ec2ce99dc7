"""When to show progress bars, and what the training bar says.

Bars (tqdm) show only when the config asks for them (``config.progress``),
the process is the primary one, stderr is a terminal, and the ``CI``
environment variable is unset, so CI logs and redirected runs stay quiet.
``EXVAE_PROGRESS=1`` (or ``0``) forces them on (off) whatever the terminal.

The training bar shows the step count, steps per second and ETA (tqdm's
rate and remaining-time fields, over the steps of the whole run) and, as its
postfix, the epoch, the current training loss, beta and the best validation
loss so far (each validated epoch also prints its own line); the evaluation bar counts images, so its rate is images per second.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping


def enabled(requested: bool, stream=None) -> bool:
  """Whether to draw a bar.

  Args:
    requested: the caller's wish (``config.progress``, primary process).
    stream: where the bar goes (default ``sys.stderr``).

  Returns:
    True only if requested and (``EXVAE_PROGRESS=1``, or a terminal without ``CI``).
  """
  if not requested:
    return False
  forced = os.environ.get("EXVAE_PROGRESS", "").strip()
  if forced:
    return forced not in ("0", "false", "False", "no")
  if os.environ.get("CI"):
    return False
  stream = sys.stderr if stream is None else stream
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


def train_postfix(metrics: Mapping[str, float], step: int, steps_per_epoch: int,
                  best_val: float | None) -> dict[str, Any]:
  """The training bar's postfix: epoch (fractional), loss, beta, best validation loss."""
  out = {"epoch": f"{step / steps_per_epoch:.2f}", "loss": f"{metrics['loss']:.2f}"}
  if "beta" in metrics:
    out["beta"] = f"{metrics['beta']:.2f}"
  if best_val is not None:
    out["best_val"] = f"{best_val:.2f}"
  return out
