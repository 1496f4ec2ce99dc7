"""Carries long training runs from one machine to the next through the repository.

A session may start on a new machine whose run directories (``~/exvae-runs``)
are gone, and the repository is all that every session gets. The paper-protocol
runs take more hours than one session has, so a run that restarted from scratch
each time would never finish. ``pack`` writes a stopped run directory into
``carry/<name>.tar.gz`` (its newest checkpoint step only, which holds the full
train state, the best parameters and the early-stopping bookkeeping, plus
``metrics.jsonl``, the run's config and the ``eval_partial.npz`` of a stopped
evaluation; not its pictures or TensorBoard files), to be
committed; ``unpack`` recreates the run directory from it where the
directory is missing, and ``train.py`` then resumes as from any checkpoint.

Usage:
  python scripts/carry_runs.py pack   --runs ~/exvae-runs [--stop] NAME...
  python scripts/carry_runs.py unpack --runs ~/exvae-runs [NAME...]

``pack`` takes the run's writer lock, so it refuses a run that is training.
With ``--stop`` it first sends SIGTERM to the run's writer (the process its
lock file names, on this host), which saves a checkpoint and exits, and waits
for the lock to be free (at most ``--wait`` seconds). ``unpack`` never
touches an existing run directory: the newer work may be there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae import errors, rundir  # noqa: E402

CARRY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "carry")
# Not carried: the writer lock (held by the packing process itself), steps that failed to
# restore, and what only shows the past: the per-epoch sample pictures and the TensorBoard
# event files (metrics.jsonl holds every scalar they hold). Both grow with the run: at
# epoch 531 of VampPrior they were 80 of the 140 MB.
_SKIP_TOP = {rundir.LOCK_FILE, "unreadable_checkpoints", "pictures"}
_SKIP_PREFIX = ("events.out.tfevents.",)


class CarryError(Exception):
  """A run that cannot be packed or unpacked; the message is one line for the user."""


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps of a run directory, oldest first.

  Orbax writes a step under a temporary name and renames it to the bare step
  number when complete, so only all-digit names count.
  """
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(
    int(d) for d in os.listdir(ckpt) if d.isdigit() and os.path.isdir(os.path.join(ckpt, d))
  )


def _last_validation(workdir: str) -> dict:
  """The newest validation record of ``metrics.jsonl`` (epoch, best_val), or {}."""
  records, _ = rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))  # torn lines skipped
  last = next((r for r in reversed(records) if "val_loss" in r), {})
  return {k: last[k] for k in ("epoch", "best_val") if k in last}


def stop_writer(workdir: str, wait_s: float = 600.0, poll_s: float = 0.5) -> str:
  """Stops the process training in ``workdir`` (SIGTERM) and waits until it has exited.

  The writer saves a checkpoint of its current step as it stops, so nothing is
  lost. A run with no writer is left as it is.

  Args:
    workdir: a run directory.
    wait_s: how long to wait for the writer to release the run.
    poll_s: seconds between checks.

  Returns:
    A one-line account: which process was stopped, or that none was running.

  Raises:
    CarryError: the writer runs on another host, or did not stop within ``wait_s``.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise CarryError(f"no run directory {workdir}")
  holder = rundir.writer_of(workdir)
  if holder is None:
    return f"{workdir}: no writer running"
  try:
    pid, host = int(holder["pid"]), holder.get("host")
  except (KeyError, TypeError, ValueError):
    raise CarryError(
      f"{workdir} is locked, but its lock file does not name the writer: stop it by hand, then pack"
    ) from None
  if host != socket.gethostname():
    raise CarryError(
      f"{workdir} is being written by pid {pid} on host {host}, not this one "
      f"({socket.gethostname()}): stop it there, then pack"
    )
  try:
    os.kill(pid, signal.SIGTERM)
  except ProcessLookupError:
    pass  # it ended between the check and the signal
  deadline = time.monotonic() + wait_s
  while rundir.writer_of(workdir) is not None:
    if time.monotonic() > deadline:
      raise CarryError(
        f"{workdir}: its writer (pid {pid}) did not stop within {wait_s:.0f} s of SIGTERM"
      )
    time.sleep(poll_s)
  return f"{workdir}: stopped its writer (pid {pid}; it saved a checkpoint)"


def pack(workdir: str, out_path: str) -> dict:
  """Writes ``workdir`` (newest checkpoint step only) to the gzipped tar ``out_path``.

  Args:
    workdir: a run directory whose writer has stopped.
    out_path: the archive to write (replaced atomically).

  Returns:
    The manifest: carried step, epoch and best validation loss, the run's provenance.

  Raises:
    CarryError: no such directory, no complete checkpoint, or a writer holds the run.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise CarryError(f"no run directory {workdir}")
  try:
    lock = rundir.WorkdirLock(workdir).acquire()
  except errors.WorkdirLockedError as e:
    raise CarryError(
      f"{e} Stop it with SIGTERM (it saves a checkpoint as it stops), "
      "then pack, or pack with --stop."
    ) from None
  try:
    steps = checkpoint_steps(workdir)
    if not steps:
      raise CarryError(f"{workdir} holds no complete checkpoint step: nothing to carry")
    keep = os.path.join("checkpoints", str(steps[-1]))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".carry-", dir=os.path.dirname(os.path.abspath(out_path)))
    os.close(fd)
    try:
      with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for entry in sorted(os.listdir(workdir)):
          if entry in _SKIP_TOP or entry.startswith(_SKIP_PREFIX):
            continue
          if entry == "checkpoints":
            tar.add(os.path.join(workdir, keep), arcname=keep)
          else:
            tar.add(os.path.join(workdir, entry), arcname=entry)
      os.replace(tmp, out_path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  finally:
    lock.release()
  manifest = {**_last_validation(workdir), "step": steps[-1], "bytes": os.path.getsize(out_path)}
  prov = os.path.join(workdir, "provenance.json")
  if os.path.exists(prov):
    with open(prov) as f:
      manifest["source"] = json.load(f)
  return manifest


def unpack(archive: str, workdir: str) -> str:
  """Recreates the run directory ``workdir`` from ``archive`` if it does not exist.

  Args:
    archive: a ``pack`` archive.
    workdir: where the run directory belongs.

  Returns:
    A one-line account of what was done.
  """
  workdir = os.path.abspath(workdir)
  with tarfile.open(archive, "r:gz") as tar:
    steps = sorted(
      int(p.split("/")[1])
      for p in tar.getnames()
      if p.startswith("checkpoints/") and p.count("/") == 1 and p.split("/")[1].isdigit()
    )
    carried = steps[-1] if steps else None
    if os.path.exists(workdir):
      have = checkpoint_steps(workdir)
      return (
        f"kept {workdir} (newest step {have[-1] if have else 'none'}); not replaced by "
        f"{archive} (step {carried}): move the directory aside to use the carried run"
      )
    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.unpack-", dir=parent)
    try:
      tar.extractall(tmp, filter="data")  # no absolute paths, links out or devices
      os.replace(tmp, workdir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return f"unpacked {archive} into {workdir} (step {carried}): train.py resumes from it"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("command", choices=("pack", "unpack"))
  p.add_argument("names", nargs="*", help="run names (config names); unpack: default all carried")
  p.add_argument(
    "--runs",
    default=os.path.expanduser("~/exvae-runs"),
    help="the folder holding the run directories",
  )
  p.add_argument("--carry", default=CARRY_DIR, help="the folder holding the archives")
  p.add_argument(
    "--stop",
    action="store_true",
    help="pack: stop each run's writer first (SIGTERM; it checkpoints as it stops)",
  )
  p.add_argument(
    "--wait", type=float, default=600.0, help="pack --stop: seconds to wait for a writer to stop"
  )
  args = p.parse_intermixed_args(argv)  # names before or after the options
  try:
    if args.command == "pack":
      if not args.names:
        raise CarryError("pack: name the runs to carry")
      if args.stop:  # every run stopped before any is packed
        for name in args.names:
          print(stop_writer(os.path.join(args.runs, name), args.wait))
      for name in args.names:
        out = os.path.join(args.carry, f"{name}.tar.gz")
        manifest = pack(os.path.join(args.runs, name), out)
        with open(os.path.join(args.carry, f"{name}.json"), "w") as f:
          json.dump(manifest, f, indent=2, sort_keys=True)
          f.write("\n")
        print(
          f"packed {name}: step {manifest['step']}, epoch {manifest.get('epoch')}, best val "
          f"{manifest.get('best_val')}, {manifest['bytes'] / 2**20:.1f} MiB -> {out}"
        )
    else:
      names = args.names
      if not names and os.path.isdir(args.carry):
        names = sorted(
          f[: -len(".tar.gz")] for f in os.listdir(args.carry) if f.endswith(".tar.gz")
        )
      for name in names:
        archive = os.path.join(args.carry, f"{name}.tar.gz")
        if os.path.exists(archive):  # a run with no carry simply starts or resumes as it is
          print(unpack(archive, os.path.join(args.runs, name)))
  except CarryError as e:
    print(f"carry_runs.py: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
