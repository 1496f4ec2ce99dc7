"""One prepared check of exvae on an accelerator: correctness and speed figures as JSON.

Usage:
  python bench/device_check.py --out DIR [--smoke] [--budget_s S] [--data_dir DIR]
                               [--sections env,tests,kernel,train_speed,eval,train_run]

Made to run once on a borrowed GPU machine with no network (the README's
"Checking on a GPU" section says what to carry and the exact command;
`scripts/device_check.sh` installs the carried wheels and sets the paths). It
writes one JSON file per section under --out as soon as that section is done, so
a run cut short still leaves the figures of the finished sections:

  env.json          backend, device name, versions of jax and the other packages
  tests.json        the kernel, prior, train-step and evaluation tests that matter
                    on an accelerator, run by pytest on this backend
  kernel.json       the prior kernel at B = 5000, N = 5e4 and 1e6, forward and
                    forward + backward, against the limit model (this device's
                    measured float32 matmul rate, exp rate and copy bandwidth), and
                    its error against float64; each row's ``pallas`` entry times the
                    fused Pallas kernel (impl="pallas") on the same inputs
  train_speed.json  epoch time of the Fashion-MNIST MLP VAE (Gaussian, RAT, exact
                    M = 25000) and of the HVAE and ConvHVAE (RAT); the exact, RAT and
                    ConvHVAE rows again with the networks' matmuls at full float32
                    (``_highest``: no TF32, as PyTorch)
  eval.json         IWAE test NLL at S = 5000 against N = 50000: seconds per test
                    point and the projected 10000-point test set
  train_run.json    a short exact-prior training run (train.py, as many epochs as
                    fit in its share of the budget) with the validation loss per epoch

Each file holds ``status`` ("ok", "error" with the traceback, or "skipped" with
the reason) and ``wall_s``. The sections share one time budget (--budget_s;
default 440 s, 180 s with --smoke); a section that would start with less than
its minimum left is skipped, the tests and the training run are subprocesses
stopped at their deadline, and the loops inside a section stop when its share
is spent. --smoke runs the same code at tiny sizes on whatever backend is there
(tests/test_device_check.py runs it on the CPU, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# Subprocesses (pytest, train.py) share the accelerator with this process:
# no process may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("env", "tests", "kernel", "train_speed", "eval", "train_run")
D = 40

# What each mode runs. Shares are seconds of the budget a section may use (its
# loops stop early past it); minimums are what a section needs to start at all.
FULL = dict(
  budget_s=440.0,
  shares=dict(env=20, tests=110, kernel=75, train_speed=110, eval=35, train_run=155),
  minimums=dict(env=0, tests=30, kernel=20, train_speed=30, eval=15, train_run=45),
  tests=[
    "tests/test_precision.py",
    "tests/test_accelerator_path.py",
    "tests/test_kernels.py",
    "tests/test_priors.py",
    "tests/test_pallas_lse.py",
    "tests/test_train.py::test_train_step_traces_once_and_loss_decreases",
    "tests/test_train.py::test_iwae_s1_equals_elbo_and_bound_tightens",
    "tests/test_train.py::test_pruned_evaluation_is_within_its_certified_gap",
  ],
  # The emulated low-precision checks are backend independent (CPU CI runs them)
  # and slow op by op on a GPU; the real low-precision default runs instead.
  tests_k="not emulated",
  kernel_b=5000,
  kernel_ns=(50_000, 1_000_000),
  err_queries=256,
  mm_size=4096,
  exp_shape=(8192, 8192),
  copy_mib=1024,
  topk=(100, 25_000),
  num_train=50_000,
  batch=100,
  num_exemplars=25_000,
  steps=50,
  # Most wanted first: a row that would start past the section's share is skipped.
  # A third field runs the row under jax.default_matmul_precision (the networks'
  # float32 matmuls at full float32, as PyTorch runs them, instead of TF32).
  train_rows=(
    ("vae", "exact"),
    ("vae", "rat"),
    ("convhvae", "rat"),
    ("hvae", "rat"),
    ("vae", "gaussian"),
    ("vae", "exact", "highest"),
    ("vae", "rat", "highest"),
    ("convhvae", "rat", "highest"),
  ),
  eval_points=20,
  eval_samples=5000,
  eval_max_queries=(5000, 50_000),
  run_overrides={"num_epochs": 1000},
)
SMOKE = dict(
  budget_s=180.0,
  shares=dict(env=10, tests=30, kernel=15, train_speed=75, eval=20, train_run=70),
  minimums=dict(env=0, tests=10, kernel=5, train_speed=10, eval=5, train_run=20),
  tests=["tests/test_precision.py::test_every_distance_dot_is_pinned_to_highest"],
  tests_k=None,
  kernel_b=64,
  kernel_ns=(2_000, 8_000),
  err_queries=64,
  mm_size=256,
  exp_shape=(256, 1024),
  copy_mib=8,
  topk=(20, 1_000),
  num_train=600,
  batch=50,
  num_exemplars=100,
  steps=2,
  # The ConvHVAE step compiles for ~50 s on 2 CPU cores: its row runs only in the
  # full check (tests/test_models.py trains it under every prior on the CPU).
  train_rows=(
    ("vae", "gaussian"),
    ("vae", "rat"),
    ("vae", "exact"),
    ("hvae", "rat"),
    ("vae", "rat", "highest"),
  ),
  eval_points=2,
  eval_samples=40,
  eval_max_queries=(40, 80),
  run_overrides={
    "num_epochs": 3,
    "max_train": 400,
    "max_test": 100,
    "val_size": 100,
    "batch_size": 50,
    "exemplar.num_exemplars": 100,
    "exemplar.encode_chunk": 100,
    "warmup_epochs": 1,
    "checkpoint_every_steps": 1000,
  },
)
TARGETS = {"exact_epoch_s": 5.0, "test_set_nll_s": 120.0, "kernel_x_limit": 2.0}


class SectionSkipped(Exception):
  """Raised inside a section to record it as skipped, with the reason."""


class Check:
  """Runs the sections against one deadline and writes their JSON files."""

  def __init__(
    self,
    out: Path,
    mode: dict,
    budget_s: float,
    smoke: bool,
    data_dir,
    run_epochs: int | None = None,
  ):
    self.out, self.mode, self.smoke, self.data_dir = out, mode, smoke, data_dir
    self.run_epochs = run_epochs  # train_run's epochs; None: the mode's default
    self.t0 = time.monotonic()
    self.deadline = self.t0 + budget_s
    self.budget_s = budget_s
    self.summary: dict = {}

  def left(self) -> float:
    """Seconds left of the whole budget."""
    return self.deadline - time.monotonic()

  def share(self, name: str) -> float:
    """Seconds this section may use: its share, never past the overall deadline
    (the training run, last, takes everything that is left up to its share).
    A budget above the mode's default scales every share up in proportion (a
    slow or loaded machine given more time gives each section more)."""
    scale = max(1.0, self.budget_s / self.mode["budget_s"])
    return max(0.0, min(self.mode["shares"][name] * scale, self.left() - 5.0))

  def write(self, name: str, record: dict) -> None:
    """Writes DIR/name.json atomically (a reader never sees half a file)."""
    self.out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=self.out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(record, f, indent=1, default=_json_default)
    os.replace(tmp, self.out / f"{name}.json")

  def run(self, name: str, fn) -> dict:
    """Runs one section; its record (ok / error / skipped) is written at once."""
    start = time.monotonic()
    share = self.share(name)
    record = {"section": name, "smoke": self.smoke}
    if share < self.mode["minimums"][name]:
      record.update(
        status="skipped",
        reason=f"budget: {self.left():.0f} s left of "
        f"{self.budget_s:.0f} s, needs {self.mode['minimums'][name]} s",
      )
    else:
      try:
        record.update(fn(self, start + share))
        record["status"] = "ok"
      except SectionSkipped as e:
        record.update(status="skipped", reason=str(e))
      except Exception as e:  # noqa: BLE001 - one broken section must not stop the rest
        record.update(
          status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:]
        )
    record["wall_s"] = time.monotonic() - start
    self.write(name, record)
    self.summary[name] = record
    try:
      head = _headline(name, record)
    except Exception as e:  # noqa: BLE001 - a log line must never end the run
      head = f"(no headline: {type(e).__name__}: {e})"
    print(
      f"[device_check] {name}: {record['status']} in {record['wall_s']:.1f} s "
      f"({self.left():.0f} s of the budget left) {head}",
      flush=True,
    )
    return record


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _headline(name: str, r: dict) -> str:
  """One line of the section's key figures for the log."""
  if r.get("status") != "ok":
    return r.get("reason") or r.get("error", "")[:300]
  if name == "env":
    return f"{r['backend']} {r['device_kind']} jax {r['versions'].get('jax')}"
  if name == "tests":
    return f"{r['counts']} failed: {r['failed'][:5]}"
  if name == "kernel":
    return "; ".join(
      f"N={k['n']} fwd {k['fwd_ms']:.2f} ms x{k['fwd_x_limit']:.2f} "
      f"fwd+bwd {k['fwd_bwd_ms']:.2f} ms x{k['fwd_bwd_x_limit']:.2f} "
      f"err {k['max_abs_err_vs_f64']:.1e}"
      if "fwd_ms" in k
      else f"N={k['n']} {k.get('skipped')}"
      for k in r["rows"]
    )
  if name == "train_speed":
    return "; ".join(f"{k}: {v['epoch_s']:.2f} s/epoch" for k, v in r["rows"].items())
  if name == "eval":
    return "; ".join(
      f"max_queries={v['max_queries']}: {v['s_per_point'] * 1e3:.1f} ms/point, "
      f"test set {v['projected_10000_points_s']:.0f} s"
      for v in r["rows"]
    )
  if name == "train_run":
    return f"{r['epochs_done']} epochs, val_loss {r['val_loss'][-3:]}"
  return ""


def _versions() -> dict:
  from importlib import metadata

  out = {}
  for pkg in (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "numpy",
    "scipy",
    "ml_collections",
    "absl-py",
    "scikit-learn",
    "pytest",
  ):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


# ------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------


def section_env(chk: Check, deadline: float) -> dict:
  """Backend, device, versions, where the data was found."""
  dev = jax.devices()[0]
  rec = {
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "devices": [str(d) for d in jax.devices()],
    "versions": _versions(),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cpus": os.cpu_count(),
    "budget_s": chk.budget_s,
    "data_dir": chk.data_dir,
    "fashion_mnist_found": _fashion_dir(chk) is not None,
    "env": {
      k: os.environ.get(k)
      for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH")
    },
  }
  try:
    rec["git"] = subprocess.run(
      ["git", "-C", str(ROOT), "log", "-1", "--format=%H %s"],
      capture_output=True,
      text=True,
      timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    rec["git"] = None
  if shutil.which("nvidia-smi"):
    try:
      rec["nvidia_smi"] = subprocess.run(
        [
          "nvidia-smi",
          "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
          "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        timeout=20,
      ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
      rec["nvidia_smi"] = f"failed: {e}"
  return rec


_PYTEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def section_tests(chk: Check, deadline: float) -> dict:
  """pytest on this backend, stopped at the deadline; per-test outcomes from -v."""
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-v",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:xdist",
    "-rf",
    "--tb=line",
    "-m",
    "",
    *chk.mode["tests"],
  ]  # -m "": the slow tier too
  if chk.mode["tests_k"]:
    cmd += ["-k", chk.mode["tests_k"]]
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen(
      cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = _wait(proc, deadline)
    log.seek(0)
    text = log.read()
  outcomes: dict = {}
  for line in text.splitlines():
    m = _PYTEST_LINE.match(line.strip())
    if m:
      outcomes[m.group(1)] = m.group(2)
  counts: dict = {}
  for v in outcomes.values():
    counts[v.lower()] = counts.get(v.lower(), 0) + 1
  failed = sorted(k for k, v in outcomes.items() if v in ("FAILED", "ERROR"))
  return {
    "command": " ".join(cmd[1:]),
    "returncode": proc.returncode,
    "timed_out": timed_out,
    "counts": counts,
    "failed": failed,
    "failure_lines": [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR", "E "))][
      :60
    ],
    "output_tail": text[-6000:],
  }


_QUICK = ((signal.SIGTERM, 3), (signal.SIGKILL, 2))
_CHECKPOINT = ((signal.SIGTERM, 15), (signal.SIGKILL, 5))  # train.py saves on SIGTERM


def _wait(proc: subprocess.Popen, deadline: float, graces=_QUICK) -> bool:
  """Waits for proc until `deadline` less the grace periods, then sends SIGTERM and,
  if needed, SIGKILL to its process group: done by the deadline. True if cut."""
  timeout = max(1.0, deadline - time.monotonic() - sum(g for _, g in graces))
  try:
    proc.wait(timeout=timeout)
    return False
  except subprocess.TimeoutExpired:
    for sig, grace in graces:
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=grace)
        break
      except subprocess.TimeoutExpired:
        continue
    return True


def _limits(mode: dict) -> dict:
  """This device's ceilings: float32 matmul at the kernel's (HIGHEST) and at the
  default precision, exp throughput on values made in registers, and copy bandwidth."""
  from prior_kernel import timeit

  n = mode["mm_size"]
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm_hi = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
  mm_def = jax.jit(lambda a, b: a @ b)
  t_hi = timeit(mm_hi, x, x, reps=5)
  t_def = timeit(mm_def, x, x, reps=5)
  rows, cols = mode["exp_shape"]
  iters = 20

  @jax.jit
  def exp_loop(s):
    # Values come from an iota inside the fusion: no memory traffic, only exp + sum.
    def body(i, acc):
      v = jax.lax.broadcasted_iota(jnp.float32, (rows, cols), 1) * 1e-6 - acc[:, None] * 1e-30
      return acc + jnp.sum(jnp.exp(v - s), axis=1)

    return jax.lax.fori_loop(0, iters, body, jnp.zeros((rows,), jnp.float32))

  t_exp = timeit(exp_loop, jnp.float32(1.0), reps=5)
  m = mode["copy_mib"] * 2**20 // 4
  y = jnp.ones((m,), jnp.float32)
  copy = jax.jit(lambda y: y * 1.5 + 0.5)
  t_copy = timeit(copy, y, reps=5)
  del x, y
  return {
    "matmul_f32_highest_flops": 2 * n**3 / t_hi,
    "matmul_f32_default_flops": 2 * n**3 / t_def,
    "matmul_size": n,
    "exp_per_s": rows * cols * iters / t_exp,
    "copy_bytes_per_s": 2 * 4 * m / t_copy,
    "copy_mib": mode["copy_mib"],
  }


def _f64_lse(z: np.ndarray, bank: np.ndarray, log_var: float) -> np.ndarray:
  """float64 log sum_n N(z; mu_n, s2 I): centred matmul form in float64 (its
  rounding, ~1e-16 |z - c|^2 / s2, is far below float32's), bank in pieces."""
  c = np.median(z, axis=0)
  z64, s2 = z.astype(np.float64) - c, math.exp(log_var)
  zz = (z64**2).sum(1)
  acc = np.full(z.shape[0], -np.inf)
  for lo in range(0, bank.shape[0], 100_000):
    b64 = bank[lo : lo + 100_000].astype(np.float64) - c
    dist = np.maximum(zz[:, None] + (b64**2).sum(1)[None] - 2.0 * z64 @ b64.T, 0.0)
    a = -dist / (2 * s2)
    mx = a.max(1)
    part = mx + np.log(np.exp(a - mx[:, None]).sum(1))
    acc = np.logaddexp(acc, part)
  return acc - 0.5 * z.shape[1] * math.log(2 * math.pi * s2)


def _chunk_sweep(z, bank, lv, deadline: float) -> list:
  """Forward time against the chunk length (the tile's element count / B), to check
  the backend's default chunk (exemplar_lse.default_chunk_size) on this device."""
  from prior_kernel import timeit
  from exvae.kernels import log_kernel_sum

  b, n = z.shape[0], bank.shape[0]
  chunks = sorted(
    {min(n, max(256, (tile // b) // 128 * 128)) for tile in (1 << 21, 1 << 23, 1 << 25, 1 << 27)}
  )
  out = []
  for chunk in chunks:
    if time.monotonic() > deadline:
      break
    fn = jax.jit(lambda z, bk, lv, chunk=chunk: log_kernel_sum(z, bk, lv, chunk_size=chunk)[0])
    out.append(
      {
        "chunk": chunk,
        "tile_elems": b * chunk,
        "num_chunks": -(-n // chunk),
        "fwd_ms": timeit(fn, z, bank, lv, reps=3) * 1e3,
      }
    )
  return out


def _pallas_row(
  z, bank, lv, z_err, bank_np, lse_xla, lim_f: float, lim_g: float, deadline: float
) -> dict:
  """impl="pallas" on the same inputs: time against the limit model, error against
  float64 and against the xla impl. Off a GPU it runs in interpret mode (a smoke check,
  no speed). A failure (a Triton lowering, say) is recorded, not raised."""
  from prior_kernel import timeit
  from exvae.kernels import log_kernel_sum

  if time.monotonic() > deadline:
    return {"skipped": "section share spent"}
  fwd = jax.jit(lambda z, bk, lv: log_kernel_sum(z, bk, lv, impl="pallas")[0])
  grad = jax.jit(
    jax.grad(lambda z, bk, lv: log_kernel_sum(z, bk, lv, impl="pallas")[0].sum(), (0, 1, 2))
  )
  try:
    out = np.asarray(fwd(z, bank, lv))
    t_f = timeit(fwd, z, bank, lv, reps=5)
    t_g = timeit(grad, z, bank, lv, reps=3)
  except Exception as e:  # noqa: BLE001  (recorded for the next session to fix)
    return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
  q = z_err.shape[0]
  err = np.abs(out[:q] - _f64_lse(z_err, bank_np, float(lv)))
  return {
    "interpret": jax.default_backend() != "gpu",
    "fwd_ms": t_f * 1e3,
    "fwd_bwd_ms": (t_f + t_g) * 1e3,
    "fwd_x_limit": t_f / lim_f,
    "fwd_bwd_x_limit": (t_f + t_g) / lim_g,
    "max_abs_err_vs_f64": float(err.max()),
    "max_abs_diff_vs_xla": float(np.max(np.abs(out - np.asarray(lse_xla)))),
  }


def section_kernel(chk: Check, deadline: float) -> dict:
  """The prior kernel against the limit model, forward and forward + backward."""
  from prior_kernel import compiled_mem_mb, realistic, timeit
  from exvae.kernels import cpu_fused, default_chunk_size, log_kernel_sum, topk_neighbors

  mode = chk.mode
  lim = _limits(mode)
  mm, ex, bw = lim["matmul_f32_highest_flops"], lim["exp_per_s"], lim["copy_bytes_per_s"]
  b, k = mode["kernel_b"], D + 2
  fwd = jax.jit(lambda z, bk, lv: log_kernel_sum(z, bk, lv)[0])
  grad = jax.jit(jax.grad(lambda z, bk, lv: log_kernel_sum(z, bk, lv)[0].sum(), (0, 1, 2)))
  rows, sweep = [], []
  rng = np.random.default_rng(0)
  for n in mode["kernel_ns"]:
    if time.monotonic() > deadline:
      rows.append({"n": n, "skipped": "section share spent"})
      continue
    bank_np, _, z_np, lv = realistic(n, b, rng)
    bank_np, z_np = np.asarray(bank_np), np.asarray(z_np)
    bank, z = jnp.asarray(bank_np), jnp.asarray(z_np)
    t_f = timeit(fwd, z, bank, lv, reps=5)
    t_g = timeit(grad, z, bank, lv, reps=3)
    q = mode["err_queries"]
    err = np.abs(np.asarray(fwd(z, bank, lv))[:q] - _f64_lse(z_np[:q], bank_np, float(lv)))
    # Limit model: nominal matmul flops at the measured HIGHEST f32 rate, one exp per
    # (query, exemplar) pair, and the bytes that must move (inputs read, outputs
    # written). The backward recomputes the tile (one more matmul and exp) and does
    # two more matmuls of the same size.
    flops = 2.0 * b * n * k
    bytes_f = 4.0 * (b * D + n * D + 2 * b)
    bytes_g = bytes_f + 4.0 * (b * D + n * D) + 4.0 * (b * D + n * D + 1)
    lim_f = flops / mm + b * n / ex + bytes_f / bw
    lim_g = lim_f + 3 * flops / mm + b * n / ex + bytes_g / bw
    rows.append(
      {
        "b": b,
        "n": n,
        "d": D,
        "fwd_ms": t_f * 1e3,
        "fwd_bwd_ms": (t_f + t_g) * 1e3,
        "bwd_only_call_ms": t_g * 1e3,
        "limit_fwd_ms": lim_f * 1e3,
        "limit_fwd_bwd_ms": lim_g * 1e3,
        "fwd_x_limit": t_f / lim_f,
        "fwd_bwd_x_limit": (t_f + t_g) / lim_g,
        "fwd_gflops": flops / t_f / 1e9,
        # What the unfused XLA path moves: the (B, C) f32 tile written once and read
        # twice (max, exp-sum), for information next to the limit.
        "xla_tile_traffic_ms": 3 * 4.0 * b * n / bw * 1e3,
        "fwd_mem_mb": compiled_mem_mb(fwd, z, bank, lv),
        "grad_mem_mb": compiled_mem_mb(grad, z, bank, lv),
        "max_abs_err_vs_f64": float(err.max()),
        "mean_abs_err_vs_f64": float(err.mean()),
        "err_queries": q,
        "log_p_mean": float(np.mean(np.asarray(fwd(z, bank, lv)))),
      }
    )
    if not (chk.smoke and n != mode["kernel_ns"][0]):  # interpret mode off a GPU: slow
      rows[-1]["pallas"] = _pallas_row(
        z, bank, lv, z_np[:q], bank_np, fwd(z, bank, lv), lim_f, lim_g, deadline
      )
    if n == mode["kernel_ns"][-1]:
      sweep = _chunk_sweep(z, bank, lv, deadline)
    del bank, z
  tb, tn = mode["topk"]
  zq = jnp.asarray(rng.normal(size=(tb, D)), jnp.float32)
  bq = jnp.asarray(rng.normal(size=(tn, D)), jnp.float32)
  tk = jax.jit(lambda z, bk: topk_neighbors(z, bk, 10))
  return {
    "limits": lim,
    "rows": rows,
    "chunk_sweep_largest_n": sweep,
    "default_chunk": default_chunk_size(b, mode["kernel_ns"][-1]),
    "topk10": {"b": tb, "n": tn, "ms": timeit(tk, zq, bq, reps=5) * 1e3},
    "fused_cpu_kernel_used": jax.default_backend() == "cpu" and cpu_fused.vectorized(),
    "target_x_limit": TARGETS["kernel_x_limit"],
  }


def _fashion_dir(chk: Check):
  from exvae.data import find_idx_dir

  for d in ([chk.data_dir] if chk.data_dir else []) + ["/usr/share/datasets/fashion-mnist"]:
    if d and find_idx_dir("fashion_mnist", d) is not None:
      return d
  return None


def _speed_data(chk: Check):
  """Fashion-MNIST (first num_train training images) if found, else random images:
  step times do not depend on pixel values."""
  from exvae import data

  n = chk.mode["num_train"]
  d = _fashion_dir(chk)
  if d is not None:
    s = data.load("fashion_mnist", data_dir=d, max_train=n)
    return s, s.source
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
  return (
    data.Splits("synthetic", x, None, x[:100], None, x[:100], None, True, "synthetic"),
    "synthetic random images (Fashion-MNIST not found)",
  )


def section_train_speed(chk: Check, deadline: float) -> dict:
  """Epoch time (measured steps x steps per epoch, plus the RAT refresh) per row."""
  from train_speed import make_config, time_config

  splits, source = _speed_data(chk)
  pool = jnp.asarray(splits.train_x)
  rows, skipped, errors = {}, [], {}
  for model, prior, *precision in chk.mode["train_rows"]:
    name = "_".join([model, prior, *precision])
    if time.monotonic() > deadline:
      skipped.append(name)
      continue
    c = make_config(prior, model)
    c.batch_size = chk.mode["batch"]
    c.exemplar.num_exemplars = chk.mode["num_exemplars"]
    try:
      with jax.default_matmul_precision(precision[0] if precision else None):
        rows[name] = dict(
          time_config(c, splits, pool, chk.mode["steps"]),
          matmul_precision=precision[0] if precision else "backend default",
        )
    except Exception as e:  # noqa: BLE001 - the other rows still count
      errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
  if errors and not rows:
    raise RuntimeError(f"every row failed: {errors}")
  if not rows:
    raise SectionSkipped("section share spent before the first row")
  return {
    "data": source,
    "num_train": int(splits.train_x.shape[0]),
    "batch_size": chk.mode["batch"],
    "num_exemplars": chk.mode["num_exemplars"],
    "timed_steps": chk.mode["steps"],
    "rows": rows,
    "skipped_rows": skipped,
    "row_errors": errors,
    "target_exact_epoch_s": TARGETS["exact_epoch_s"],
  }


def section_eval(chk: Check, deadline: float) -> dict:
  """IWAE evaluation throughput (eval.py's code) of the MLP VAE, exact prior."""
  from eval_speed import eval_throughput
  from exvae.config_base import base_config

  mode = chk.mode
  rows = []
  for mq in mode["eval_max_queries"]:
    if time.monotonic() > deadline and rows:
      break
    c = base_config()
    c.prior = "exemplar"
    c.exemplar.num_exemplars = mode["num_exemplars"]  # training only; must fit N
    r = eval_throughput(c, mode["num_train"], mode["eval_points"], mode["eval_samples"], mq)
    rows.append(dict(r, max_queries=mq))
  return {
    "num_train": mode["num_train"],
    "samples": mode["eval_samples"],
    "points": mode["eval_points"],
    "rows": rows,
    "target_test_set_s": TARGETS["test_set_nll_s"],
  }


def section_train_run(chk: Check, deadline: float) -> dict:
  """train.py on the paper's exact-prior Fashion-MNIST config until the deadline."""
  workdir = Path(tempfile.mkdtemp(prefix="exvae_device_check_run_"))
  d = _fashion_dir(chk)
  if d is not None:
    config, data_note = "configs/fashion_vae_exemplar.py", f"fashion_mnist from {d}"
    overrides = {"data_dir": d}
  elif chk.smoke:
    config, data_note, overrides = "configs/test.py", "sklearn digits (Fashion-MNIST not found)", {}
  else:
    raise SectionSkipped(
      "Fashion-MNIST not found: carry the IDX files and pass --data_dir "
      "(or set EXVAE_FASHION_MNIST_DIR)"
    )
  overrides.update({"num_picture_samples": 0, "progress": False, "tensorboard": False})
  if d is not None:
    overrides.update(chk.mode["run_overrides"])
  overrides["num_epochs"] = chk.run_epochs or chk.mode["run_overrides"]["num_epochs"]
  args = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}"]
  for key, value in overrides.items():
    value = ",".join(map(str, value)) if isinstance(value, tuple) else value
    args.append(f"--config.{key}={value}")
  start = time.monotonic()
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen(
      args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = _wait(proc, deadline, _CHECKPOINT)
    log.seek(0)
    text = log.read()
  wall = time.monotonic() - start
  from exvae.runinfo import read_val_records

  epochs = [
    {k: rec.get(k) for k in ("epoch", "step", "val_loss", "val_recon", "val_kl", "time")}
    for rec in read_val_records(workdir)
  ]
  val = [rec["val_loss"] for rec in epochs]
  shutil.rmtree(workdir, ignore_errors=True)
  if not epochs and not timed_out:
    raise RuntimeError(f"train.py exited {proc.returncode} with no epoch: {text[-3000:]}")
  return {
    "config": config,
    "data": data_note,
    "overrides": overrides,
    "wall_s": wall,
    "stopped_at_deadline": timed_out,
    "returncode": proc.returncode,
    "epochs_done": len(epochs),
    "val_loss": val,
    "epochs": epochs,
    "s_per_epoch_incl_val": (epochs[-1]["time"] / len(epochs)) if epochs else None,
    "output_tail": text[-3000:],
  }


RUNNERS = {
  "env": section_env,
  "tests": section_tests,
  "kernel": section_kernel,
  "train_speed": section_train_speed,
  "eval": section_eval,
  "train_run": section_train_run,
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="directory for the section JSON files")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths")
  ap.add_argument(
    "--budget_s",
    type=float,
    default=None,
    help="seconds for all sections (default 440, 180 with --smoke)",
  )
  ap.add_argument(
    "--data_dir",
    default=os.environ.get("EXVAE_FASHION_MNIST_DIR"),
    help="directory of the Fashion-MNIST IDX files (default: "
    "$EXVAE_FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist)",
  )
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument(
    "--run_epochs",
    type=int,
    default=None,
    help="epochs for the train_run section (default 1000, 3 with --smoke)",
  )
  args = ap.parse_args(argv)
  mode = SMOKE if args.smoke else FULL
  names = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown:
    ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
  if args.run_epochs is not None and args.run_epochs < 1:
    ap.error(f"--run_epochs must be >= 1, got {args.run_epochs}")
  chk = Check(
    Path(args.out),
    mode,
    args.budget_s or mode["budget_s"],
    args.smoke,
    args.data_dir,
    args.run_epochs,
  )
  print(
    f"[device_check] {'smoke' if args.smoke else 'full'} run, budget {chk.budget_s:.0f} s, "
    f"writing to {chk.out}",
    flush=True,
  )
  for name in names:
    chk.run(name, RUNNERS[name])
  statuses = {k: v["status"] for k, v in chk.summary.items()}
  print(f"[device_check] done in {time.monotonic() - chk.t0:.0f} s: {statuses}", flush=True)
  return 0 if all(s != "error" for s in statuses.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
