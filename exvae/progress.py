"""When to show progress bars, and what the training bar says.

Bars (tqdm) show only when the config asks for them (``config.progress``),
the process is the primary one, stderr is a terminal, and the ``CI``
environment variable is unset, so CI logs and redirected runs stay quiet.
``EXVAE_PROGRESS=1`` (or ``0``) forces them on (off) whatever the terminal.
Where a bar is not drawn (a redirected or ``nohup`` run) but progress was
asked for, long evaluations print a plain line at most once a minute
(:class:`LineReporter`), so an hour-long test NLL is never silent;
``EXVAE_PROGRESS=0`` silences those too.

The training bar shows the step count, steps per second and ETA (tqdm's
rate and remaining-time fields, over the steps of the whole run) and, as its
postfix, the epoch, the current training loss, beta and the best validation
loss so far (each validated epoch also prints its own line); the evaluation bar counts images, so its rate is images per second.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Mapping


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


def train_postfix(
  metrics: Mapping[str, float], step: int, steps_per_epoch: int, best_val: float | None
) -> dict[str, Any]:
  """The training bar's postfix: epoch (fractional), loss, beta, best validation loss."""
  out = {"epoch": f"{step / steps_per_epoch:.2f}", "loss": f"{metrics['loss']:.2f}"}
  if "beta" in metrics:
    out["beta"] = f"{metrics['beta']:.2f}"
  if best_val is not None:
    out["best_val"] = f"{best_val:.2f}"
  return out


def lines_enabled(requested: bool) -> bool:
  """Whether to print plain progress lines (asked for, and not ``EXVAE_PROGRESS=0``)."""
  if not requested:
    return False
  return os.environ.get("EXVAE_PROGRESS", "").strip() not in ("0", "false", "False", "no")


class LineReporter:
  """Plain progress lines for logs: ``desc: done/total unit, elapsed, ETA``.

  A line is printed when at least ``every_s`` seconds have passed since the
  previous one (the first after ``every_s`` from the start), and once at the end if any
  line was printed before.

  Args:
    total: units of work.
    desc: label.
    unit: what is counted.
    every_s: minimum seconds between lines.
    stream: where lines go (default ``sys.stderr``).
    clock: monotonic seconds (tests pass a fake one).
    initial: units already done before this process started (a resumed job): they
      count towards ``done/total`` but not towards the rate the time left comes from.
  """

  def __init__(
    self,
    total: int,
    desc: str,
    unit: str = "examples",
    every_s: float = 60.0,
    stream=None,
    clock: Callable[[], float] = time.monotonic,
    initial: int = 0,
  ):
    self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, float(every_s)
    self.stream = stream
    self.clock = clock
    self.start = self.last = clock()
    self.initial = self.done = int(initial)
    self.printed = 0

  def _line(self, now: float) -> None:
    el = now - self.start
    new = self.done - self.initial
    eta = el / new * (self.total - self.done) if new else float("nan")
    print(
      f"{self.desc}: {self.done}/{self.total} {self.unit}, {el:.0f} s elapsed, "
      f"about {eta:.0f} s left",
      file=self.stream or sys.stderr,
      flush=True,
    )
    self.last = now
    self.printed += 1

  def update(self, n: int) -> None:
    self.done += int(n)
    now = self.clock()
    if now - self.last >= self.every_s and self.done < self.total:
      self._line(now)

  def close(self) -> None:
    if self.printed:
      self._line(self.clock())
