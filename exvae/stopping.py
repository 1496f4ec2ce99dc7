"""SIGTERM for the downstream commands: stop at once, or where partial work can be saved.

:func:`on_sigterm` (``exvae-uses`` runs its command inside it) turns SIGTERM
into a stop with exit code 143 and one line ``stopped: ...``. Outside a
:func:`deferring` function the handler raises :class:`SigtermStop` at once, as
Ctrl-C raises KeyboardInterrupt: such code keeps no partial work, and what it
writes, it writes atomically. Inside one (the augmentation's classifiers),
the handler only records the request; the code asks :func:`requested` at its
safe points (an epoch's end), saves its state there and raises
:func:`stopped` (:class:`exvae.errors.Interrupted`). A request that no safe point took before the deferring
function returned is raised when :func:`on_sigterm` ends, once the command's
outputs are written.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Callable, Iterator, TypeVar

from exvae.errors import Interrupted

_F = TypeVar("_F", bound=Callable)
_state = {"requested": False, "deferring": 0, "active": False}


def requested() -> bool:
  """True once SIGTERM arrived under :func:`on_sigterm`."""
  return bool(_state["requested"])


def stopped(what: str) -> Interrupted:
  """The error to raise at a safe point: ``SIGTERM <what>``."""
  return Interrupted(f"SIGTERM {what}")


class SigtermStop(KeyboardInterrupt):
  """SIGTERM raised where the command is (exit code 143).

  A KeyboardInterrupt, as Ctrl-C's is: raised asynchronously, it must pass
  through a library's ``except Exception`` (which would take an Exception,
  turn it into a warning and go on) as Ctrl-C does.
  """

  exit_code = 128 + 15


def _handler(signum, frame) -> None:
  _state["requested"] = True
  if not _state["deferring"]:
    raise SigtermStop(
      "SIGTERM before the command's outputs were complete (each file is "
      "written whole or not at all); run the same command again."
    )


def deferring(fn: _F) -> _F:
  """Decorates a function that asks :func:`requested` at its safe points (see the module)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    _state["deferring"] += 1
    try:
      return fn(*args, **kwargs)
    finally:
      _state["deferring"] -= 1

  return wrapped  # type: ignore[return-value]


@contextlib.contextmanager
def on_sigterm() -> Iterator[None]:
  """SIGTERM stops the block (see the module) while it runs.

  In a thread other than the main one (where no handler can be set) it does nothing.

  Raises:
    Interrupted: SIGTERM arrived after the last safe point; the block's work is done.
  """
  if threading.current_thread() is not threading.main_thread() or _state["active"]:
    yield
    return
  _state.update(requested=False, deferring=0, active=True)
  prev = signal.signal(signal.SIGTERM, _handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, prev)
    _state["active"] = False
  if _state["requested"]:
    raise stopped("after the work was done: its outputs are written.")
