"""Tests of the fused CPU forward kernel (exvae/kernels/cpu_fused.*) of log_kernel_sum.

The fused forward is compared with the XLA path and with a float64 NumPy/SciPy
reference; gradients go through the (shared) XLA custom-VJP backward.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import logsumexp

from exvae.kernels import cpu_fused, log_kernel_sum

pytestmark = pytest.mark.skipif(
  not cpu_fused.available(),
  reason=f"fused CPU kernel unavailable: {cpu_fused.unavailable_reason()}",
)


def _ref(
  z: np.ndarray, bank: np.ndarray, log_var: float, mask=None, ids=None, qids=None
) -> np.ndarray:
  """float64 log sum_n N(z_b; mu_n, s2 I) over valid (b, n), via scipy logsumexp."""
  z64, b64 = z.astype(np.float64), bank.astype(np.float64)
  dist = ((z64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)
  s2 = np.exp(np.float64(log_var))
  logn = -dist / (2 * s2) - 0.5 * z.shape[1] * np.log(2 * np.pi * s2)
  valid = np.ones(dist.shape, bool)
  if mask is not None:
    valid &= mask[None, :]
  if ids is not None:
    valid &= ~((ids[None, :] == qids[:, None]) & (qids[:, None] >= 0))
  with np.errstate(divide="ignore"):
    return logsumexp(np.where(valid, logn, -np.inf), axis=1)


def _both(z, bank, log_var, **kw):
  fused = log_kernel_sum(z, bank, log_var, impl="fused", **kw)
  xla = log_kernel_sum(z, bank, log_var, impl="xla", **kw)
  return fused, xla


def _check(z, bank, log_var, rtol=1e-5, atol=1e-4, **kw):
  (lf, cf), (lx, cx) = _both(z, bank, log_var, **kw)
  ref = _ref(z, bank, log_var, kw.get("bank_mask"), kw.get("bank_ids"), kw.get("query_ids"))
  lf, lx = np.asarray(lf), np.asarray(lx)
  assert not np.isnan(lf).any()
  np.testing.assert_array_equal(np.isfinite(lf), np.isfinite(ref))
  np.testing.assert_allclose(lf, ref, rtol=rtol, atol=atol)
  np.testing.assert_allclose(lf, lx, rtol=rtol, atol=atol)
  np.testing.assert_array_equal(np.asarray(cf), np.asarray(cx))
  return lf


@pytest.mark.parametrize(
  "b,n,d",
  [
    (1, 1, 40),
    (1, 1000, 40),
    (13, 77, 40),
    (3, 20000, 40),
    (50, 5000, 40),
    (301, 1001, 7),
    (1000, 2053, 40),
    (17, 300, 1),
    (30, 500, 100),
  ],
)
@pytest.mark.parametrize("opts", ["plain", "mask", "loo", "mask+loo"])
def test_fused_matches_reference_and_xla(b, n, d, opts):
  # Ragged N (not a multiple of the 32-exemplar panel or the 2048 chunk), B not a
  # multiple of the 12-query micro-block, B=1 / N=1, both thread-split modes.
  rng = np.random.default_rng(b * 1000 + n)
  z = rng.normal(size=(b, d)).astype(np.float32)
  bank = rng.normal(size=(n, d)).astype(np.float32)
  kw = {}
  if "mask" in opts:
    kw["bank_mask"] = rng.random(n) > 0.3
  if "loo" in opts:
    ids = rng.integers(0, max(n // 2, 1), n).astype(np.int32)
    qids = rng.integers(-1, max(n // 2, 1), b).astype(np.int32)
    kw.update(bank_ids=ids, query_ids=qids)
  _check(z, bank, 0.3, **kw)


def test_all_masked_rows_are_neg_inf_not_nan():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(30, 40)).astype(np.float32)
  bank = rng.normal(size=(70, 40)).astype(np.float32)
  lf = _check(z, bank, 0.0, bank_mask=np.zeros(70, bool))
  assert np.all(lf == -np.inf)
  # LOO leaving nothing: every bank row carries query 0's id; query 1 keeps all.
  ids = np.zeros(70, np.int32)
  qids = np.array([0, -1] + [5] * 28, np.int32)
  lf = _check(z, bank, 0.0, bank_ids=ids, query_ids=qids)
  assert lf[0] == -np.inf and np.isfinite(lf[1:]).all()
  # Everything but one exemplar masked.
  mask = np.zeros(70, bool)
  mask[41] = True
  _check(z, bank, 0.0, bank_mask=mask)


def test_huge_distances_no_overflow():
  # Distances ~1e4 (exponents ~ -5e3): underflow-safe, matches float64.
  rng = np.random.default_rng(2)
  z = rng.normal(size=(40, 40)).astype(np.float32)
  bank = (rng.normal(size=(300, 40)) + 16.0).astype(np.float32)
  dist = ((z[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
  assert dist.min() > 5e3
  lf = _check(z, bank, 0.0, rtol=1e-5, atol=1e-3)
  assert np.isfinite(lf).all()
  # A far query among near ones (the max lands in a later tile than the first).
  z2 = np.concatenate([z, z[:3] + 100.0]).astype(np.float32)
  _check(z2, bank, 0.0, rtol=1e-5, atol=1e-3)


def test_rising_maxima_across_tiles():
  # Each later panel is much closer than the previous: forces repeated rescaling.
  d = 8
  z = np.zeros((20, d), np.float32)
  far = np.arange(400, 0, -1, dtype=np.float32)[:, None] * 0.25
  bank = np.concatenate([far, np.zeros((400, d - 1), np.float32)], 1)
  _check(z, bank, -1.0)


@pytest.mark.parametrize("b", [1, 2, 7, 1000])
def test_column_median(b):
  rng = np.random.default_rng(b)
  z = rng.normal(size=(b, 5)).astype(np.float32)
  z[:, 1] = np.round(z[:, 1])  # ties
  np.testing.assert_allclose(
    np.asarray(jax.jit(cpu_fused.column_median)(z)), np.median(z, axis=0), rtol=1e-6, atol=1e-7
  )


def test_vs_xla_many_queries_large_bank():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(777, 40)).astype(np.float32)
  bank = rng.normal(size=(9001, 40)).astype(np.float32)
  (lf, _), (lx, _) = _both(z, bank, -0.5)
  np.testing.assert_allclose(np.asarray(lf), np.asarray(lx), rtol=2e-6, atol=1e-5)


def test_gradients_through_fused_forward():
  rng = np.random.default_rng(4)
  b, n, d = 9, 61, 6
  z = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  bank = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  mask = rng.random(n) > 0.2
  ids = rng.permutation(n).astype(np.int32)
  qids = np.concatenate([ids[:5], [-1, 999, -1, -1]]).astype(np.int32)
  lv = jnp.float32(0.2)

  def loss(impl):
    def f(z, bank, lv):
      lse, _ = log_kernel_sum(z, bank, lv, bank_mask=mask, bank_ids=ids, query_ids=qids, impl=impl)
      return jnp.sum(jnp.sin(lse))

    return f

  check_grads(loss("fused"), (z, bank, lv), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)
  gf = jax.grad(loss("fused"), (0, 1, 2))(z, bank, lv)
  gx = jax.grad(loss("xla"), (0, 1, 2))(z, bank, lv)
  for a, r in zip(gf, gx):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_vmap_over_queries():
  rng = np.random.default_rng(7)
  z = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
  bank = jnp.asarray(rng.normal(size=(90, 8)), jnp.float32)
  fn = jax.vmap(lambda z: log_kernel_sum(z, bank, 0.1, impl="fused")[0])
  ref = np.stack([_ref(np.asarray(zi), np.asarray(bank), 0.1) for zi in z])
  np.testing.assert_allclose(np.asarray(fn(z)), ref, rtol=1e-5, atol=1e-4)


def test_no_retrace_in_jitted_loop():
  rng = np.random.default_rng(5)
  bank = jnp.asarray(rng.normal(size=(257, 40)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(z, lv):
    return log_kernel_sum(z, bank, lv, impl="fused")[0]

  @jax.jit
  def loop(z):
    def body(i, acc):
      return acc + step(z + i, jnp.float32(0.1) * i)

    return jax.lax.fori_loop(0, 3, body, jnp.zeros(13, jnp.float32))

  for s in range(3):
    z = jnp.asarray(rng.normal(size=(13, 40)), jnp.float32)
    out = loop(z)
    assert np.isfinite(np.asarray(out)).all()
    step(z, jnp.float32(s))  # direct calls with the same shapes: cached too
  chex.clear_trace_counter()


def test_auto_dispatch_and_errors(monkeypatch):
  rng = np.random.default_rng(6)
  z = rng.normal(size=(20, 40)).astype(np.float32)
  bank = rng.normal(size=(100, 40)).astype(np.float32)
  hlo = jax.jit(lambda z, b: log_kernel_sum(z, b, 0.0)[0]).lower(z, bank).as_text()
  assert ("exvae_fused_lse" in hlo) == cpu_fused.vectorized()
  hlo = jax.jit(lambda z, b: log_kernel_sum(z, b, 0.0, impl="xla")[0]).lower(z, bank).as_text()
  assert "exvae_fused_lse" not in hlo
  hlo = (
    jax.jit(lambda z, b: log_kernel_sum(z, b, 0.0, bank_dtype=jnp.bfloat16)[0])
    .lower(z, bank)
    .as_text()
  )
  assert "exvae_fused_lse" not in hlo
  with pytest.raises(ValueError):
    log_kernel_sum(z, bank, 0.0, impl="bogus")
  with pytest.raises(ValueError):
    log_kernel_sum(z, bank, 0.0, impl="fused", bank_dtype=jnp.bfloat16)
  monkeypatch.setenv("EXVAE_NO_FUSED", "1")
  assert not cpu_fused.available()
  assert cpu_fused.unavailable_reason() == "disabled by EXVAE_NO_FUSED"


_NO_COMPILER_SCRIPT = r"""
import numpy as np
from exvae.kernels import cpu_fused, log_kernel_sum
assert not cpu_fused.available(), "available() must be False without a compiler"
assert cpu_fused.unavailable_reason()
z = np.ones((3, 4), np.float32)
lse, _ = log_kernel_sum(z, z, 0.0)  # "auto" silently takes the XLA path
assert np.isfinite(np.asarray(lse)).all()
try:
    log_kernel_sum(z, z, 0.0, impl="fused")
except RuntimeError as e:
    assert "unavailable" in str(e)
else:
    raise AssertionError("impl='fused' must raise when unavailable")
print("OK")
"""


def test_unavailable_without_compiler(tmp_path):
  # Fresh process, empty cache, a compiler that does not exist: no exception,
  # available() is False and "auto" falls back to XLA.
  env = dict(
    os.environ,
    CXX=str(tmp_path / "no-such-g++"),
    EXVAE_CACHE_DIR=str(tmp_path / "cache"),
    JAX_PLATFORMS="cpu",
  )
  root = Path(__file__).resolve().parents[1]
  out = subprocess.run(
    [sys.executable, "-c", _NO_COMPILER_SCRIPT],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
