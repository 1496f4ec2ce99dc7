"""Tests for the streamed exemplar kernels against NumPy/SciPy references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import logsumexp

from exvae.kernels import log_kernel_sum, pruned_log_kernel_sum, topk_neighbors


def _data(b=7, n=53, d=5, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  z = (scale * rng.normal(size=(b, d))).astype(np.float32)
  bank = (scale * rng.normal(size=(n, d))).astype(np.float32)
  return rng, z, bank


def _valid(b, n, mask=None, ids=None, qids=None):
  v = np.ones((b, n), bool)
  if mask is not None:
    v &= np.asarray(mask, bool)[None, :]
  if ids is not None and qids is not None:
    v &= ~((ids[None, :] == qids[:, None]) & (qids[:, None] >= 0))
  return v


def _ref_lse(z, bank, log_var, valid):
  z64, b64 = z.astype(np.float64), bank.astype(np.float64)
  dist = ((z64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)
  s2 = np.exp(np.float64(log_var))
  logn = -dist / (2 * s2) - 0.5 * z.shape[1] * np.log(2 * np.pi * s2)
  return logsumexp(np.where(valid, logn, -np.inf), axis=1), valid.sum(1)


def _naive_jax(z, bank, log_var, valid):
  """Materialising autodiff reference (B x N)."""
  dist = jnp.sum((z[:, None, :] - bank[None, :, :]) ** 2, -1)
  logn = -dist / (2 * jnp.exp(log_var)) - 0.5 * z.shape[1] * (jnp.log(2 * jnp.pi) + log_var)
  return jax.nn.logsumexp(jnp.where(valid, logn, -jnp.inf), axis=1)


@pytest.mark.parametrize("chunk", [1, 8, 16, 53, 4096, None])
def test_lse_matches_scipy_with_masks_and_loo(chunk):
  rng, z, bank = _data()
  b, n = z.shape[0], bank.shape[0]
  mask = rng.random(n) > 0.2
  ids = rng.permutation(n).astype(np.int32)
  qids = np.array([ids[0], ids[5], ids[52], -1, 1000, ids[10], ids[20]], np.int32)
  lse, cnt = log_kernel_sum(
    z, bank, -0.3, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=chunk
  )
  valid = _valid(b, n, mask, ids, qids)
  ref, rcnt = _ref_lse(z, bank, -0.3, valid)
  np.testing.assert_allclose(np.asarray(lse), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(cnt), rcnt)
  assert lse.dtype == jnp.float32 and cnt.dtype == jnp.float32


def test_lse_no_masks_default():
  _, z, bank = _data(b=4, n=30, d=3, seed=1)
  lse, cnt = log_kernel_sum(z, bank, 0.5, chunk_size=7)
  ref, _ = _ref_lse(z, bank, 0.5, _valid(4, 30))
  np.testing.assert_allclose(np.asarray(lse), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(cnt), 30)


def test_huge_distances_no_overflow():
  # Distances ~1e4 with small variance: every density underflows in linear space.
  _, z, bank = _data(b=5, n=40, d=4, seed=2)
  z = z + 50.0
  lse, _ = log_kernel_sum(z, bank, np.log(0.05), chunk_size=16)
  ref, _ = _ref_lse(z, bank, np.log(0.05), _valid(5, 40))
  assert np.all(np.isfinite(np.asarray(lse)))
  np.testing.assert_allclose(np.asarray(lse), ref, rtol=1e-4)


def test_all_masked_rows_neg_inf_and_zero_grads():
  rng, z, bank = _data(b=4, n=12, d=3, seed=3)
  mask = np.zeros(12, bool)
  mask[5] = True
  ids = np.arange(12, dtype=np.int32)
  qids = np.array([5, -1, 5, 2], np.int32)  # rows 0 and 2 lose their only exemplar
  lse, cnt = log_kernel_sum(
    z, bank, 0.0, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=5
  )
  assert np.isneginf(np.asarray(lse)[[0, 2]]).all()
  assert np.isfinite(np.asarray(lse)[[1, 3]]).all()
  np.testing.assert_array_equal(np.asarray(cnt), [0, 1, 0, 1])

  def f(z, bank, lv):
    out, _ = log_kernel_sum(z, bank, lv, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=5)
    return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

  gz, gb, glv = jax.grad(f, (0, 1, 2))(z, bank, 0.0)
  for g in (gz, gb, glv):
    assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(gz)[[0, 2]], 0.0)
  # Even a cotangent hitting the -inf rows directly gives zeros, not NaN.
  _, vjp = jax.vjp(
    lambda z: log_kernel_sum(
      z, bank, 0.0, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=5
    )[0],
    z,
  )
  (gz2,) = vjp(jnp.ones(4))
  assert np.all(np.isfinite(np.asarray(gz2)))


def test_fully_masked_bank():
  _, z, bank = _data(b=3, n=10, d=2, seed=4)
  lse, cnt = log_kernel_sum(z, bank, 0.0, bank_mask=np.zeros(10, bool), chunk_size=4)
  assert np.isneginf(np.asarray(lse)).all() and not np.isnan(np.asarray(lse)).any()
  g = jax.grad(
    lambda z: jnp.sum(log_kernel_sum(z, bank, 0.0, bank_mask=np.zeros(10, bool), chunk_size=4)[0])
  )(z)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_grads_match_naive_autodiff():
  rng, z, bank = _data(b=6, n=37, d=4, seed=5)
  mask = rng.random(37) > 0.3
  ids = np.arange(37, dtype=np.int32)
  qids = np.array([0, 3, -1, 36, 8, 9], np.int32)
  valid = jnp.asarray(_valid(6, 37, mask, ids, qids))
  w = jnp.asarray(rng.normal(size=6).astype(np.float32))

  def f(z, bank, lv):
    out, _ = log_kernel_sum(
      z, bank, lv, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=10
    )
    return jnp.sum(w * out)

  def g(z, bank, lv):
    return jnp.sum(w * _naive_jax(z, bank, lv, valid))

  got = jax.grad(f, (0, 1, 2))(z, bank, jnp.float32(-0.2))
  want = jax.grad(g, (0, 1, 2))(z, bank, jnp.float32(-0.2))
  for a, b_ in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)


def test_check_grads_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    z = rng.normal(size=(3, 4))
    bank = rng.normal(size=(11, 4))
    mask = np.ones(11, bool)
    mask[2] = False
    ids = np.arange(11, dtype=np.int32)
    qids = np.array([4, -1, 10], np.int32)

    def f(z, bank, lv):
      out = log_kernel_sum(z, bank, lv, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=4)[
        0
      ]
      assert out.dtype == jnp.float64
      return out

    check_grads(f, (z, bank, np.float64(0.1)), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_usable_inside_outer_jit():
  _, z, bank = _data(b=3, n=20, d=2, seed=7)

  @jax.jit
  def outer(z, bank, lv):
    lse, cnt = log_kernel_sum(z, bank, lv, chunk_size=6)
    d, i = topk_neighbors(z, bank, 3, chunk_size=6)
    return lse - jnp.log(cnt), d, i

  lp, d, i = outer(z, bank, 0.0)
  ref, _ = _ref_lse(z, bank, 0.0, _valid(3, 20))
  np.testing.assert_allclose(np.asarray(lp), ref - np.log(20), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- top-k


def _brute_topk(z, bank, k, valid):
  dist = ((z[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
  dist = np.where(valid, dist, np.inf)
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(dist, order, 1), order


@pytest.mark.parametrize("chunk", [3, 10, 64, 4096])
def test_topk_matches_brute_force(chunk):
  rng, z, bank = _data(b=6, n=61, d=4, seed=8)
  mask = rng.random(61) > 0.25
  ids = np.arange(61, dtype=np.int32)
  qids = np.array([0, 5, 60, -1, 30, 31], np.int32)
  valid = _valid(6, 61, mask, ids, qids)
  d, i = topk_neighbors(z, bank, 5, bank_mask=mask, bank_ids=ids, query_ids=qids, chunk_size=chunk)
  rd, ri = _brute_topk(z, bank, 5, valid)
  np.testing.assert_allclose(np.asarray(d), rd, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(i), ri)  # distances distinct with random data
  assert i.dtype == jnp.int32 and d.dtype == jnp.float32
  assert np.all(np.diff(np.asarray(d), axis=1) >= 0)


def test_topk_ties_across_chunks():
  # Duplicated exemplars placed in different chunks: equal distances.
  rng = np.random.default_rng(9)
  base = rng.normal(size=(8, 3)).astype(np.float32)
  bank = np.concatenate([base, base, base], 0)  # 24 rows, chunks of 5 split copies
  z = rng.normal(size=(4, 3)).astype(np.float32)
  d, i = topk_neighbors(z, bank, 4, chunk_size=5)
  rd, _ = _brute_topk(z, bank, 4, np.ones((4, 24), bool))
  np.testing.assert_allclose(np.asarray(d), rd, rtol=1e-5, atol=1e-5)
  i = np.asarray(i)
  for r in range(4):
    assert len(set(i[r].tolist())) == 4  # distinct indices
    got = ((z[r] - bank[i[r]]) ** 2).sum(-1)
    np.testing.assert_allclose(got, rd[r], rtol=1e-5, atol=1e-5)


def test_topk_fewer_than_k_valid():
  _, z, bank = _data(b=3, n=9, d=2, seed=10)
  mask = np.zeros(9, bool)
  mask[[1, 7]] = True
  d, i = topk_neighbors(z, bank, 4, bank_mask=mask, chunk_size=4)
  i, d = np.asarray(i), np.asarray(d)
  assert np.all(i[:, 2:] == -1) and np.all(np.isposinf(d[:, 2:]))
  assert np.all(np.sort(i[:, :2], 1) == [1, 7])


def test_topk_approx_flag_runs():
  _, z, bank = _data(b=4, n=50, d=3, seed=11)
  d, i = topk_neighbors(z, bank, 3, chunk_size=16, approx=True)
  rd, _ = _brute_topk(z, bank, 3, np.ones((4, 50), bool))
  # approx_min_k is exact on CPU; on TPU it may miss neighbours (recall < 1).
  assert d.shape == (4, 3) and i.shape == (4, 3)
  np.testing.assert_allclose(np.asarray(d)[:, 0], rd[:, 0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- tracing


def test_no_retracing_in_loop():
  rng, z, bank = _data(b=4, n=40, d=3, seed=12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(z, bank, lv):
    lse, _ = log_kernel_sum(z, bank, lv, chunk_size=16)
    d, _ = topk_neighbors(z, bank, 2, chunk_size=16)
    return lse.sum() + d.sum()

  for t in range(4):
    step(z + t, bank, jnp.float32(0.1 * t))

  # The standalone jitted entry points do not retrace either.
  lse_traced = chex.assert_max_traces(n=1)(
    lambda z, bank: log_kernel_sum(z, bank, 0.0, chunk_size=16)[0]
  )
  g = jax.jit(jax.grad(lambda z, bank: lse_traced(z, bank).sum()))
  for t in range(3):
    g(z * (1 + t), bank)


# ----------------------------------------------------------------------------- precision


def test_bf16_bank_error_small():
  rng, z, bank = _data(b=16, n=300, d=40, seed=13)
  z = bank[:16] + 0.3 * rng.normal(size=(16, 40)).astype(np.float32)
  ref, _ = _ref_lse(z, bank, np.log(0.5), _valid(16, 300))
  lse, _ = log_kernel_sum(z, bank, np.log(0.5), chunk_size=64, bank_dtype=jnp.bfloat16)
  # Perturbation error only (no cancellation blow-up): ~1e-2 nats at d = 40.
  assert np.max(np.abs(np.asarray(lse) - ref)) < 0.05
  g = jax.grad(lambda z: log_kernel_sum(z, bank, 0.0, bank_dtype=jnp.bfloat16)[0].sum())(z)
  assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_split_is_exact_and_survives_convert_pair_removal():
  # x = hi + mid + lo exactly enough (f32), each part a bf16 number.
  from exvae.kernels.exemplar_lse import _split3

  x = jnp.asarray(np.random.default_rng(16).normal(size=1000) * 50.0, jnp.float32)
  parts = jax.jit(lambda x: _split3(x, jnp.bfloat16))(x)
  assert all(p.dtype == jnp.bfloat16 for p in parts)
  total = sum(np.asarray(p, np.float64) for p in parts)
  np.testing.assert_allclose(total, np.asarray(x, np.float64), rtol=2e-7, atol=0)
  # XLA's GPU compiler deletes f32 -> bf16 -> f32 convert pairs, which zeroed mid
  # and lo there (0.28 nats on an H200, CPU 0.01): the rounding must be an
  # explicit reduce_precision, which no backend removes.
  z, bank = jnp.ones((4, 8)), jnp.ones((32, 8))
  text = (
    jax.jit(lambda z, b: log_kernel_sum(z, b, 0.0, bank_dtype=jnp.bfloat16)[0])
    .lower(z, bank)
    .as_text()
  )
  assert text.count("stablehlo.reduce_precision") >= 4  # query, bank, both splits


def test_exact_self_match_clamped():
  # Queries equal to exemplars (no LOO): the nearest term must not exceed density 1.
  _, _, bank = _data(b=1, n=50, d=8, seed=14)
  bank = bank + 30.0  # large norms stress the matmul-form cancellation
  lse, _ = log_kernel_sum(bank[:5], bank, np.log(1e-3), chunk_size=16)
  ref, _ = _ref_lse(bank[:5], bank, np.log(1e-3), _valid(5, 50))
  np.testing.assert_allclose(np.asarray(lse), ref, atol=2e-3)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("keep", [1, 8, 64, 400])
def test_pruned_within_certified_bound(keep):
  rng = np.random.default_rng(15)
  centers = 2.0 * rng.normal(size=(8, 6))
  bank = (centers[rng.integers(0, 8, 400)] + 0.7 * rng.normal(size=(400, 6))).astype(np.float32)
  c = (bank[7] + 0.2 * rng.normal(size=6)).astype(np.float32)
  z = (c + 0.3 * rng.normal(size=(20, 6))).astype(np.float32)
  mask = rng.random(400) > 0.1
  lv = np.log(0.4)
  ref, _ = _ref_lse(z, bank, lv, _valid(20, 400, mask))
  res = pruned_log_kernel_sum(z, c, bank, lv, keep=keep, bank_mask=mask, tol=1e-3)
  lse, err = np.asarray(res.lse), np.asarray(res.err_bound)
  assert np.all(err >= 0) and np.all(np.isfinite(lse))
  assert np.all(lse <= ref + 1e-4)
  assert np.all(ref <= lse + err + 1e-4)
  if keep >= int(res.num_needed):
    assert np.all(err <= np.log1p(1e-3) + 1e-6)
  if keep == 400:
    np.testing.assert_allclose(lse, ref, atol=1e-4)
    assert np.all(err == 0)


def test_pruned_explicit_radius_and_jit():
  rng, z, bank = _data(b=10, n=100, d=3, seed=16)
  c = np.zeros(3, np.float32)
  z = 0.1 * z
  f = jax.jit(lambda z, c, bank: pruned_log_kernel_sum(z, c, bank, 0.0, keep=20, radius=1.0))
  res = f(z, c, bank)
  ref, _ = _ref_lse(z, bank, 0.0, _valid(10, 100))
  assert np.all(ref >= np.asarray(res.lse) - 1e-5)
  assert np.all(ref <= np.asarray(res.lse + res.err_bound) + 1e-5)
  assert float(res.radius) == 1.0
