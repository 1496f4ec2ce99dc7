"""Optional fused CPU forward of the exemplar log-kernel-sum (XLA FFI custom call).

XLA:CPU cannot fuse the streamed exponent matmul with the max / exp-sum reductions,
so every (B, chunk) tile goes through memory several times. `cpu_fused.cc` computes
the same augmented-matmul exponents in registers (AVX-512 micro-kernel) and folds
them straight into an online log-sum-exp; see the header comment there.

The C++ source is compiled with the host g++ on first use into a cache directory
($EXVAE_CACHE_DIR, default ~/.cache/exvae), keyed by a hash of the source, the
compiler command and version, the jax version and the CPU, then loaded with ctypes
and registered as an FFI target. Everything degrades to `available() == False`
(never an exception) when g++ is missing, compilation fails, the default backend is
not CPU, or EXVAE_NO_FUSED=1; callers then use the XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SRC = Path(__file__).with_name("cpu_fused.cc")
_TARGET = "exvae_fused_lse"
_SYMBOL = "ExvaeFusedLse"
_MEDIAN_TARGET = "exvae_column_median"
_MEDIAN_SYMBOL = "ExvaeColumnMedian"
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")

_lock = threading.Lock()
_state: dict = {}  # "lib", "error", "vectorized" once _load() has run


def _cache_dir() -> Path:
  base = os.environ.get("EXVAE_CACHE_DIR")
  return Path(base) if base else Path.home() / ".cache" / "exvae"


def _cpu_signature() -> str:
  """Identifies the host CPU: -march=native output must not be reused elsewhere."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    return "".join(lines)
  except OSError:
    return platform.processor() or platform.machine()


def _build(cxx: str) -> Path:
  """Compile the source (if not cached) and return the shared-library path."""
  include = jax.ffi.include_dir()
  cmd = [cxx, *_FLAGS, f"-I{include}"]
  version = subprocess.run(
    [cxx, "--version"], capture_output=True, text=True, check=True, timeout=60
  ).stdout.splitlines()[:1]
  key = hashlib.sha256()
  for part in (
    _SRC.read_bytes(),
    " ".join(cmd).encode(),
    str(version).encode(),
    jax.__version__.encode(),
    _cpu_signature().encode(),
  ):
    key.update(part)
    key.update(b"\0")
  out_dir = _cache_dir()
  out = out_dir / f"exvae_cpu_fused_{key.hexdigest()[:20]}.so"
  if out.exists():
    return out
  out_dir.mkdir(parents=True, exist_ok=True)
  # Compile to a temp file in the same directory, then rename atomically, so that
  # concurrent processes never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out_dir)
  os.close(fd)
  try:
    subprocess.run(
      cmd + [str(_SRC), "-o", tmp], capture_output=True, text=True, check=True, timeout=600
    )
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def _load() -> None:
  """Build, load and register once per process; records the failure reason."""
  with _lock:
    if _state:
      return
    try:
      if os.environ.get("EXVAE_NO_FUSED", "") not in ("", "0"):
        raise RuntimeError("disabled by EXVAE_NO_FUSED")
      if jax.default_backend() != "cpu":
        raise RuntimeError(f"default backend is {jax.default_backend()}, not cpu")
      cxx = os.environ.get("CXX") or shutil.which("g++")
      if not cxx:
        raise RuntimeError("g++ not found")
      lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
      for target, symbol in ((_TARGET, _SYMBOL), (_MEDIAN_TARGET, _MEDIAN_SYMBOL)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      _state.update(lib=lib, error=None, vectorized=bool(lib.exvae_fused_vectorized()))
    except subprocess.CalledProcessError as e:  # keep the compiler's message
      _state.update(
        lib=None, error=f"compilation failed: {(e.stderr or '')[-2000:]}", vectorized=False
      )
    except Exception as e:  # noqa: BLE001 - availability must never raise
      _state.update(lib=None, error=f"{type(e).__name__}: {e}", vectorized=False)


def available() -> bool:
  """Whether the fused kernel can be used in this process (never raises)."""
  if os.environ.get("EXVAE_NO_FUSED", "") not in ("", "0"):
    return False
  try:
    if jax.default_backend() != "cpu":
      return False
  except Exception:  # noqa: BLE001
    return False
  _load()
  return _state.get("lib") is not None


def vectorized() -> bool:
  """True when the library was built with the AVX-512 micro-kernel (the fast one);
  otherwise it runs a portable, correct but slow fallback."""
  return available() and bool(_state.get("vectorized"))


def unavailable_reason() -> Optional[str]:
  """Why `available()` is False (None when it is True)."""
  if os.environ.get("EXVAE_NO_FUSED", "") not in ("", "0"):
    return "disabled by EXVAE_NO_FUSED"
  if available():
    return None
  return _state.get("error") or f"default backend is {jax.default_backend()}, not cpu"


def _require() -> None:
  if not available():
    raise RuntimeError(f"exvae fused CPU kernel unavailable: {unavailable_reason()}")


def column_median(z: Array) -> Array:
  """Coordinate-wise median of z (B, d) -> (d,) float32 (O(B d) selection; for
  even B the mean of the two middle values, like jnp.median). No gradient.

  Raises:
    RuntimeError: if the fused kernel library is not available.
  """
  _require()
  call = jax.ffi.ffi_call(
    _MEDIAN_TARGET, jax.ShapeDtypeStruct((z.shape[1],), jnp.float32), vmap_method="sequential"
  )
  return call(jnp.asarray(z, jnp.float32))


def fused_lse0(
  zq: Array,
  qbias: Array,
  bank: Array,
  center: Array,
  scale_sq: Array,
  bank_mask: Optional[Array] = None,
  bank_ids: Optional[Array] = None,
  query_ids: Optional[Array] = None,
) -> tuple[Array, Array]:
  """lse0[b] = log sum_{n valid} exp(zq_b.(mu_n - c) + qbias_b + scale_sq |mu_n - c|^2).

  The exponent is the augmented-matmul form of `exemplar_lse._setup` (for the
  density: zq = (z - c)/s2, qbias = -|z - c|^2/(2 s2), scale_sq = -1/(2 s2)), with
  the XLA path's per-row clamp of the largest exponent at 0. Jittable; no
  gradient (the caller's custom VJP only needs the value).

  Args:
    zq: (B, d) float32 scaled, centred queries.
    qbias: (B,) float32 per-query exponent offset.
    bank: (N, d) float32 exemplars (uncentred; the kernel subtracts `center`).
    center: (d,) float32.
    scale_sq: scalar float32 multiplying |mu - c|^2.
    bank_mask: optional (N,) bool; False excludes an exemplar.
    bank_ids, query_ids: optional (N,) / (B,) int32 leave-one-out ids (both or
      neither); a negative query id disables LOO for that row.

  Returns:
    lse0: (B,) float32; -inf for rows with no valid exemplar.
    removed: (B,) int32 number of valid (unmasked) exemplars that leave-one-out
      excluded from each row (zeros without LOO): count = n_valid - removed.

  Raises:
    RuntimeError: if the fused kernel is not available.
  """
  _require()
  b, d = zq.shape
  n = bank.shape[0]
  if bank.shape != (n, d) or qbias.shape != (b,) or center.shape != (d,):
    raise ValueError(
      f"shape mismatch: zq {zq.shape}, qbias {qbias.shape}, "
      f"bank {bank.shape}, center {center.shape}"
    )
  use_mask = bank_mask is not None
  use_loo = bank_ids is not None and query_ids is not None
  # Unused optional operands are 1-element dummies: no O(N) placeholder arrays.
  mask = jnp.asarray(bank_mask, bool).reshape(n) if use_mask else jnp.zeros((1,), bool)
  bids = jnp.asarray(bank_ids, jnp.int32).reshape(n) if use_loo else jnp.zeros((1,), jnp.int32)
  qids = jnp.asarray(query_ids, jnp.int32).reshape(b) if use_loo else jnp.zeros((1,), jnp.int32)
  f32 = jnp.float32
  call = jax.ffi.ffi_call(
    _TARGET,
    (jax.ShapeDtypeStruct((b,), f32), jax.ShapeDtypeStruct((b,), jnp.int32)),
    vmap_method="sequential",
  )
  return call(
    jnp.asarray(zq, f32),
    jnp.asarray(qbias, f32),
    jnp.asarray(bank, f32),
    jnp.asarray(center, f32),
    jnp.asarray(scale_sq, f32).reshape(()),
    mask,
    bids,
    qids,
    use_mask=np.int64(use_mask),
    use_loo=np.int64(use_loo),
  )
