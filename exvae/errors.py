"""The expected errors of a run directory, of the data and of the user's own config and
plug-in files, each reported in one line by the command-line programs.

This module imports nothing of exvae, so every module (:mod:`exvae.atomic`,
:mod:`exvae.checkpoints`, :mod:`exvae.rundir`, :mod:`exvae.data`, the command-line
programs' error report in :mod:`exvae.cli`) can raise or recognise these errors
without importing another.  Import them from here; only :mod:`exvae.data` also
exports the data's two (:class:`DataNotFoundError`, :class:`DataFormatError`) with its
public API.
"""

from __future__ import annotations

import errno


class RunDirError(Exception):
  """An expected error about a run directory (reported in one line, non-zero exit)."""

  exit_code = 1


class ConfigError(RunDirError, ValueError):
  """A config value that cannot work (found before any work starts)."""


class WorkdirLockedError(RunDirError):
  """Another process holds the workdir's writer lock.

  Attributes:
    holder: what the lock file says of the holder (``pid``, ``host``, ``since``,
      ``argv``), or {} where it could not be read.
  """

  def __init__(self, message: str, holder: dict | None = None):
    super().__init__(message)
    self.holder = holder or {}


class ConfigDriftError(RunDirError, ValueError):
  """The config differs from the one the run started with in keys that may not change."""


class HistoryError(RunDirError):
  """A fresh start would mix with (or erase) the history a workdir already holds."""


class DiskFullError(RunDirError, OSError):
  """No space left while writing into the run directory."""


class ReadOnlyError(RunDirError, OSError):
  """The run directory (or the output directory) cannot be written: read-only or no permission."""


class NonFiniteMetricsError(RunDirError, FloatingPointError):
  """Evaluation produced non-finite metrics (nothing was written)."""


class Interrupted(RunDirError):
  """Training stopped by SIGTERM after saving a checkpoint (exit code 143)."""

  exit_code = 128 + 15


class CheckpointNotFoundError(FileNotFoundError):
  """No (readable) checkpoint in a workdir."""


class CheckpointMismatchError(RunDirError, ValueError):
  """The checkpoint's arrays have other shapes than this config's (another model)."""


class DataNotFoundError(FileNotFoundError):
  """A data set is not available locally.

  The message says exactly which files were looked for, where, and how to
  obtain them (this code never downloads anything and never substitutes fake
  data).
  """


class DataFormatError(ValueError):
  """A user's data set (``npz:PATH`` or a plug-in) holds arrays that cannot be used.

  The message is one line naming the file (or plug-in) and the key; the
  command-line programs print it as it is (exit code 1).
  """

  exit_code = 1


class SourceSyntaxError(ValueError):
  """A config file or a plug-in module (the user's own Python) that does not compile."""

  exit_code = 1


def source_syntax_error(e: SyntaxError, what: str) -> SourceSyntaxError:
  """The one-line error for a syntax error in the user's file: ``what``, file, line, the line.

  Args:
    e: the SyntaxError (or IndentationError) the import raised.
    what: what was being loaded, e.g. ``"--config=my.py"`` or ``"prior plug-in 'x.py:P'"``.
  """
  text = " ".join((e.text or "").split())
  return SourceSyntaxError(
    f"{what}: {type(e).__name__} in {e.filename}, line {e.lineno}: "
    f"{e.msg}" + (f": {text}" if text else "")
  )


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _chain(e: BaseException | None):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _caused_by(e: BaseException, errnos, phrases) -> bool:
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in errnos:
      return True
    if any(p in str(x) for p in phrases):
      return True
  return False


def is_disk_full(e: BaseException) -> bool:
  """A full disk or exhausted quota, also when wrapped by another library's error."""
  return _caused_by(e, DISK_FULL_ERRNOS, ("No space left on device", "Disk quota exceeded"))


def is_read_only(e: BaseException) -> bool:
  """A read-only filesystem or a missing write permission, also when wrapped."""
  return _caused_by(e, READ_ONLY_ERRNOS, ("Read-only file system", "Permission denied"))


def as_write_error(e: BaseException, what: str) -> BaseException:
  """The typed one-line error for a failed write, or ``e`` itself if it is another failure.

  Args:
    e: the exception raised while writing.
    what: what was being written, e.g. ``"checkpoint step 30 in /runs/x/checkpoints"``.

  Returns:
    A :class:`DiskFullError` or :class:`ReadOnlyError` naming ``what`` (chained to ``e``
    by the caller's ``raise ... from e``), or ``e``.
  """
  if isinstance(e, RunDirError):
    return e
  if is_disk_full(e):
    return DiskFullError(
      f"Disk full while writing {what}. Free some space and run the same command again."
    )
  if is_read_only(e):
    detail = next(
      (x.strerror for x in _chain(e) if isinstance(x, OSError) and x.strerror), "read-only"
    )
    return ReadOnlyError(
      f"Cannot write {what}: {detail}. Make it writable, or write "
      "elsewhere (another --workdir or --config.eval.out_dir)."
    )
  return e
