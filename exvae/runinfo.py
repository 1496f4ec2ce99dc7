"""Reading a run's records and describing the machine it ran on.

Shared by ``scripts/`` (collecting results), ``bench/`` (the device check) and
``reference/`` (seed runs): each reads ``metrics.jsonl`` the same way and
records the CPU and its measured matmul rate the same way.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a JSON-lines file, in order.

  Args:
    path: the file (e.g. ``<workdir>/metrics.jsonl``); it must exist.

  Returns:
    One dict per readable line. Blank lines and a line cut short by a crash
    (invalid JSON) are skipped.
  """
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # the last line of a run killed while writing it
  return out


def read_val_records(workdir: str | os.PathLike) -> list[dict]:
  """A run's validation records, one per epoch, in epoch order.

  Args:
    workdir: the run directory (reads ``metrics.jsonl`` in it).

  Returns:
    The last record holding ``val_loss`` for each epoch (a resumed run may
    validate an epoch twice); empty if there is no ``metrics.jsonl`` yet.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  recs: dict[int, dict] = {}
  for rec in read_jsonl(path):
    if "val_loss" in rec and "epoch" in rec:
      recs[int(rec["epoch"])] = rec
  return [recs[e] for e in sorted(recs)]


PAUSE_GAP_S = 300.0  # no step or validation record of a running job is this far from the last


def training_wall_clock(records: list[dict]) -> float:
  """Seconds of training summed over resumed segments.

  Each invocation of train.py logs ``time`` since its own start, so the
  clock restarts at a resume: the total is the sum of each segment's last
  value (a segment ends where ``time`` decreases).
  """
  total, last = 0.0, None
  for r in records:
    t = r.get("time")
    if t is None:
      continue
    if last is not None and t < last:
      total += last
    last = t
  return total + (last or 0.0)


def paused_seconds(records: list[dict], gap: float = PAUSE_GAP_S) -> float:
  """Seconds of the wall clock during which the job was paused (SIGSTOP), not training.

  A running job logs a record every few seconds (every ``log_every_steps``
  steps and every validation), so a gap of more than ``gap`` seconds between
  consecutive records of one segment is a pause; it is counted whole (the
  work around it is at most one logging interval).
  """
  paused, last = 0.0, None
  for r in records:
    t = r.get("time")
    if t is None:
      continue
    if last is not None and t - last > gap:
      paused += t - last
    last = t
  return paused


def code_commit() -> str:
  """git HEAD of the checkout this package runs from ("unknown" outside a git checkout)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(
      ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
    )
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def cpu_name(with_isa: bool = False) -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (else what ``platform`` knows).

  Args:
    with_isa: append ", AVX-512" on CPUs that have it (it sets the float32
      matmul rate, which the model name alone does not show on cloud CPUs).
  """
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    info = ""
  name = next(
    (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
    None,
  )
  return (name or platform.processor() or platform.machine()) + (
    ", AVX-512" if with_isa and " avx512f" in info else ""
  )


def machine() -> dict:
  """What this process trains on: ``cpu`` (:func:`cpu_name`, with AVX-512 marked: two CPUs
  of one model name can differ by 2-3x in float32 matmul rate), ``cores``, ``backend``,
  ``devices`` and ``device_kind`` (the first device's)."""
  import jax

  devs = jax.devices()
  return {
    "cpu": cpu_name(with_isa=True),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": len(devs),
    "device_kind": getattr(devs[0], "device_kind", ""),
  }


def matmul_rate(n: int = 2048, reps: int = 3) -> float:
  """This machine's float32 XLA matmul rate on the default backend.

  Args:
    n: the product is (n, n) @ (n, n).
    reps: timed calls after one warm-up call; the fastest counts.

  Returns:
    FLOP/s, 2 n^3 over the best time.
  """
  import jax
  import jax.numpy as jnp

  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(x, x))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(x, x))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best
