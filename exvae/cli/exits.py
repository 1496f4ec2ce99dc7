"""How a command-line program ends on an error: one line on stderr and an exit code.

The library's errors are defined where they are raised (:mod:`exvae.errors` holds
the expected ones); this module maps each to what the programs print and return.

A command's expected errors end it with exactly one line on stderr,

    exvae-<cmd>: error: <what is wrong and what to do>

(missing data: that line says what is missing, and the lines after it how to get it)

(``exvae-train: stopped: ...`` when SIGTERM or Ctrl-C stopped training) and
an exit code that says who is to fix it:

* 2: a usage error, the command line itself (an unknown flag, config name or
  config key, a value of the wrong type, a workdir that is a file, runs that
  ``compare`` cannot compare);
* 1: a runtime failure (no checkpoint, missing data, a config the run was not
  trained with, a full disk, a second writer, a corrupt bank);
* 143 / 130: SIGTERM / Ctrl-C.

The library raises typed exceptions (:class:`exvae.errors.RunDirError` and
its subclasses, :class:`exvae.errors.DataNotFoundError`, ...); :func:`exit_code`
maps them here. Anything else is a bug and keeps its traceback, and so does
every error with ``--verbosity=1`` or ``EXVAE_TRACEBACK=1``.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import NoReturn

from exvae import errors


class UsageError(ValueError):
  """The command line cannot be carried out as given (exit code 2)."""

  exit_code = 2


class RunNotFoundError(FileNotFoundError):
  """The workdir holds no trained run (exit code 1)."""

  exit_code = 1


class RunConfigError(ValueError):
  """The workdir's own ``config.json`` (read because no --config was given) is unreadable."""

  exit_code = 1


def missing_run(workdir: str) -> RunNotFoundError:
  """The error for a reader (eval, uses) pointed at a workdir without a run's ``config.json``."""
  if not os.path.exists(workdir):
    return RunNotFoundError(
      f"{workdir} does not exist. Train first: exvae-train --config=NAME --workdir={workdir}"
    )
  return RunNotFoundError(
    f"{workdir} holds no config.json (no run trained there?): train first "
    f"(exvae-train --config=NAME --workdir={workdir}), or give the run's "
    "config and overrides with --config=NAME|FILE."
  )


def exit_code(e: BaseException) -> int | None:
  """The exit code of an expected error, None for anything else (a bug: keep the traceback).

  Args:
    e: the exception that ended the command.

  Returns:
    ``e.exit_code`` for the typed errors that carry one (usage errors 2,
    run-directory errors 1, SIGTERM 143), 130 for Ctrl-C, 1 for the other
    expected failures (missing files, data or checkpoints, bad values, a full
    disk), None for anything else.
  """
  code = getattr(e, "exit_code", None)
  if isinstance(code, int):
    return code
  if isinstance(e, KeyboardInterrupt):
    return 130
  if errors.is_disk_full(e) or (isinstance(e, OSError) and errors.is_read_only(e)):
    return 1
  if isinstance(
    e,
    (
      errors.CheckpointNotFoundError,
      errors.DataNotFoundError,
      FloatingPointError,
      FileNotFoundError,
      FileExistsError,
      NotADirectoryError,
      IsADirectoryError,
      PermissionError,
      ValueError,
    ),
  ):
    return 1
  return None


def want_traceback() -> bool:
  """``EXVAE_TRACEBACK=1`` in the environment, or ``--verbosity=1`` (or more) given."""
  if os.environ.get("EXVAE_TRACEBACK", "").lower() in ("1", "true", "yes"):
    return True
  try:
    from absl import flags

    f = flags.FLAGS["verbosity"]
    return bool(f.present) and int(f.value) >= 1
  except Exception:  # noqa: BLE001  (flags not parsed: no)
    return False


def one_line(e: BaseException) -> str:
  """The error as one line: its message (newlines folded), prefixed by its type if generic."""
  if isinstance(e, KeyboardInterrupt) and not hasattr(e, "exit_code"):  # SIGTERM's has one
    return "interrupted (Ctrl-C)."
  msg = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, KeyError) and len(e.args) == 1:
    msg = str(e.args[0])
  if not isinstance(e, errors.RunDirError) and errors.is_disk_full(e):
    return f"disk full: {msg}"
  if not (
    isinstance(
      e, (errors.RunDirError, UsageError, FileNotFoundError, FileExistsError, NotADirectoryError)
    )
    or hasattr(e, "exit_code")
  ):
    msg = f"{type(e).__name__}: {msg}"
  return msg


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_warnings() -> None:
  """Prints the library's warnings as one ``warning: ...`` line each.

  Python's default shows a warning as the file and line that raised it plus
  that line of source: two lines of internals for a message meant for the
  user. Warnings raised from exvae's own modules become one line, like the
  ones the library prints itself; other packages' warnings keep the default.
  """
  default = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if not os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
      return default(message, category, filename, lineno, file, line)
    print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)

  warnings.showwarning = show


def settle() -> None:
  """Ignores SIGINT and SIGTERM from here on: the command's outcome is decided.

  Called once a command has finished its work or said why it stopped. The
  interpreter's teardown after that (JAX's exit hooks, XLA and Orbax threads)
  takes about a second; a Ctrl-C in it would otherwise end the process with no
  line and exit -2 (Python resets its handler to the default at finalization),
  or print a traceback from an exit hook. An ignored handler survives
  finalization, so the exit code stays the one the command decided.
  """
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to settle
      pass


def keep_interrupts() -> None:
  """A Ctrl-C or SIGTERM that lands where Python swallows exceptions is delivered again.

  A signal handler raises its exception (KeyboardInterrupt, or Interrupted for
  the uses' SIGTERM) in whatever Python code runs when the signal arrives. In a
  garbage-collector callback (JAX's ``_xla_gc_callback`` runs at every
  collection), a ``__del__`` or a weakref callback, Python prints it as
  "Exception ignored in ..." and carries on: the command would finish with
  exit 0 and a traceback on stderr, the stop lost. This hook takes such an
  exception, prints nothing and sends the signal again; its handler then runs
  in the command's own code. Once Ctrl-C or SIGTERM has arrived, the other
  unraisable exceptions are the stop's own echoes (Orbax's restore coroutines,
  closed half-way, turn their GeneratorExit into an Exception that Python
  prints with its traceback) and are not printed either: the command's one
  line says why it stopped. Before that, they go to the hook that was there.
  """
  import threading
  from exvae.errors import Interrupted  # light: no JAX

  previous = sys.unraisablehook
  if getattr(previous, "_exvae_keeps_interrupts", False):
    return

  def again(sig: int) -> None:
    # From another thread, a moment later: sent from here, the handler would run at
    # once, still inside the callback, and be swallowed again.
    try:
      threading.Timer(0.02, os.kill, (os.getpid(), sig)).start()
    except RuntimeError:  # the interpreter is shutting down: the outcome is decided
      pass

  def hook(unraisable) -> None:
    e = unraisable.exc_value
    if isinstance(e, Interrupted) or getattr(e, "exit_code", None) == 128 + signal.SIGTERM:
      again(signal.SIGTERM)
    elif isinstance(e, KeyboardInterrupt):
      again(signal.SIGINT)
    elif not (stops or stopping_requested()):
      previous(unraisable)

  stops: list[int] = []

  def on_ctrl_c(signum, frame):
    stops.append(signum)
    raise KeyboardInterrupt

  def stopping_requested() -> bool:
    mod = sys.modules.get("exvae.stopping")
    return bool(mod is not None and mod.requested())

  try:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
      signal.signal(signal.SIGINT, on_ctrl_c)  # the same KeyboardInterrupt, remembered
  except ValueError:  # not the main thread
    pass

  hook._exvae_keeps_interrupts = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def drain() -> None:
  """Waits for the computations JAX has still running, so that none outlives the interpreter.

  JAX dispatches asynchronously: a loop stopped by Ctrl-C or SIGTERM (the
  augmentation's classifier steps) leaves queued steps on XLA's threads. If the
  interpreter's teardown frees their buffers while they run, the process can
  crash (SIGSEGV) after its one line. Does nothing where JAX was never imported.
  """
  jax = sys.modules.get("jax")
  if jax is None:
    return
  try:
    arrays = jax.live_arrays()
  except Exception:  # noqa: BLE001  (no backend: nothing runs)
    return
  for a in arrays:
    try:
      a.block_until_ready()
    except Exception:  # noqa: BLE001  (deleted or failed: nothing to wait for)
      pass


def stop_cause(e: BaseException) -> BaseException | None:
  """The Ctrl-C or SIGTERM behind ``e``, where a library turned it into another error.

  Orbax's restore catches every exception, KeyboardInterrupt too, and raises a
  plain ``Exception("Encountered error while reading array index ...")`` from
  it: a Ctrl-C during a restore would end with that traceback and exit 1.
  Returns the KeyboardInterrupt or Interrupted found in ``e``'s causes and
  contexts (``e`` itself included), else None.
  """
  from exvae.errors import Interrupted

  seen: set[int] = set()
  x: BaseException | None = e
  while x is not None and id(x) not in seen:
    if isinstance(x, (KeyboardInterrupt, Interrupted)):
      return x
    seen.add(id(x))
    x = x.__cause__ or x.__context__
  return None


def fail(prog: str, e: BaseException) -> NoReturn:
  """Ends the program for the error ``e``: one line and its exit code, or the traceback.

  Args:
    prog: the program's name (``exvae-eval``).
    e: the exception being handled (call from an ``except`` block).

  Raises:
    e itself, when it is not an expected error or a traceback was asked for.
  """
  settle()  # every branch below ends the process
  drain()
  stop = stop_cause(e)
  code = exit_code(stop or e)
  if code is None or want_traceback():
    raise e
  e = stop or e
  stopped = isinstance(e, (errors.Interrupted, KeyboardInterrupt))
  first, how_to = one_line(e), how_to_lines(e)
  if how_to:
    first = " ".join(str(e).strip().splitlines()[0].split())
  sys.stdout.flush()
  print(f"{prog}: {'stopped' if stopped else 'error'}: {first}", file=sys.stderr, flush=True)
  for line in how_to:
    print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def how_to_lines(e: BaseException) -> list[str]:
  """The lines after the first of an error whose message says how to fix it (missing data).

  Such an error is reported as its first line (the error, ``prog: error: ...``), then
  these lines as they are; every other error is folded into one line.
  """
  if not isinstance(e, errors.DataNotFoundError):
    return []
  return [line.rstrip() for line in str(e).strip().splitlines()[1:] if line.strip()]
