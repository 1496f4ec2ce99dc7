"""The fused Pallas exemplar LSE (impl="pallas"), in Pallas' interpret mode on the CPU:
values and gradients against the XLA impl and a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from exvae.kernels import exemplar_lse, pallas_lse

B, N, D = 21, 45, 5  # neither a multiple of the 16-row blocks used below


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(B, D)).astype(np.float32)
  bank = rng.normal(size=(N, D)).astype(np.float32)
  bank[:B] = z + 0.01 * rng.normal(size=(B, D))  # near neighbours, as in training
  mask = rng.random(N) > 0.25
  ids = np.arange(N, dtype=np.int32)
  qids = np.arange(B, dtype=np.int32)
  qids[::4] = -1  # LOO off for some rows
  return z, bank, np.float32(-0.7), mask, ids, qids


def _numpy_lse(z, bank, log_var, mask, ids, qids):
  z, bank = z.astype(np.float64), bank.astype(np.float64)
  s2 = np.exp(np.float64(log_var))
  dist = ((z[:, None, :] - bank[None]) ** 2).sum(-1)
  a = -dist / (2 * s2) - 0.5 * z.shape[1] * np.log(2 * np.pi * s2)
  valid = np.broadcast_to(mask if mask is not None else True, a.shape).copy()
  if ids is not None:
    valid &= ~((ids[None, :] == qids[:, None]) & (qids[:, None] >= 0))
  return logsumexp(np.where(valid, a, -np.inf), axis=1)


def _loss(fn, **kw):
  # A non-uniform cotangent per row, so that the per-row weights of the gradient matter.
  return lambda z, b, lv: jnp.sum(jnp.sin(fn(z, b, lv, **kw)[0]) * jnp.arange(1.0, B + 1))


def _close(got, want, tol=1e-5):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(1.0, float(np.max(np.abs(want))))
  assert np.max(np.abs(got - want)) <= tol * scale, (np.max(np.abs(got - want)), scale)


@pytest.mark.parametrize(
  "use_mask,use_loo",
  [
    (False, False),
    (True, True),
    pytest.param(True, False, marks=pytest.mark.slow),
    pytest.param(False, True, marks=pytest.mark.slow),
  ],
)
def test_values_and_gradients_match_xla(use_mask, use_loo):
  z, bank, lv, mask, ids, qids = _inputs()
  kw = {"bank_mask": jnp.asarray(mask) if use_mask else None}
  if use_loo:
    kw.update(bank_ids=jnp.asarray(ids), query_ids=jnp.asarray(qids))
  pal = lambda *a, **k: pallas_lse.log_kernel_sum(*a, **k, block_q=16, block_n=16)  # noqa: E731
  xla = lambda *a, **k: exemplar_lse.log_kernel_sum(*a, **k, impl="xla")  # noqa: E731
  args = (jnp.asarray(z), jnp.asarray(bank), jnp.asarray(lv))
  (lse_p, cnt_p), (lse_x, cnt_x) = pal(*args, **kw), xla(*args, **kw)
  want = _numpy_lse(z, bank, lv, mask if use_mask else None, ids if use_loo else None, qids)
  _close(lse_p, lse_x)
  _close(lse_p, want)
  np.testing.assert_array_equal(cnt_p, cnt_x)
  gp = jax.grad(_loss(pal, **kw), (0, 1, 2))(*args)
  gx = jax.grad(_loss(xla, **kw), (0, 1, 2))(*args)
  for a, b in zip(gp, gx):
    assert np.all(np.isfinite(a))
    _close(a, b)


def test_through_log_kernel_sum_with_default_blocks():
  z, bank, lv, mask, ids, qids = _inputs(1)
  kw = dict(bank_mask=jnp.asarray(mask), bank_ids=jnp.asarray(ids), query_ids=jnp.asarray(qids))
  args = (jnp.asarray(z), jnp.asarray(bank), jnp.asarray(lv))
  f = lambda impl: _loss(exemplar_lse.log_kernel_sum, impl=impl, **kw)  # noqa: E731
  vp, gp = jax.value_and_grad(f("pallas"), (0, 1, 2))(*args)
  vx, gx = jax.value_and_grad(f("xla"), (0, 1, 2))(*args)
  _close(vp, vx)
  for a, b in zip(gp, gx):
    _close(a, b)


def test_rows_without_a_valid_exemplar_are_minus_inf_with_zero_gradient():
  z, bank, lv, _, ids, _ = _inputs(2)
  mask = np.zeros(N, bool)
  mask[3] = True  # one valid exemplar: row 3 excludes it
  qids = np.full(B, -1, np.int32)
  qids[3] = 3
  kw = dict(
    bank_mask=jnp.asarray(mask),
    bank_ids=jnp.asarray(ids),
    query_ids=jnp.asarray(qids),
    block_q=16,
    block_n=16,
  )
  args = (jnp.asarray(z), jnp.asarray(bank), jnp.asarray(lv))
  lse, cnt = pallas_lse.log_kernel_sum(*args, **kw)
  assert float(cnt[3]) == 0 and lse[3] == -np.inf and np.all(np.isfinite(np.delete(lse, 3)))
  gz, gb, glv = jax.grad(
    lambda z, b, lv: jnp.sum(
      jnp.where(
        jnp.isfinite(pallas_lse.log_kernel_sum(z, b, lv, **kw)[0]),
        pallas_lse.log_kernel_sum(z, b, lv, **kw)[0],
        0.0,
      )
    ),
    (0, 1, 2),
  )(*args)
  assert np.all(np.isfinite(gz)) and np.all(gz[3] == 0) and np.all(np.isfinite(gb))
  assert np.all(gb[~mask] == 0) and np.isfinite(glv)


def test_every_product_is_pinned_to_highest():
  z, bank, lv, mask, ids, qids = _inputs()
  f = jax.jit(
    jax.grad(
      _loss(pallas_lse.log_kernel_sum, bank_mask=jnp.asarray(mask), block_q=16, block_n=16),
      (0, 1, 2),
    )
  )
  text = f.lower(jnp.asarray(z), jnp.asarray(bank), jnp.asarray(lv)).as_text()
  dots = [ln for ln in text.splitlines() if "dot_general" in ln]
  assert len(dots) >= 3 and all("HIGHEST" in ln for ln in dots), dots


def test_bad_inputs_are_refused():
  z, bank, lv, *_ = _inputs()
  with pytest.raises(ValueError, match="bank_dtype=None"):
    exemplar_lse.log_kernel_sum(z, bank, lv, impl="pallas", bank_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="power of two"):
    pallas_lse.log_kernel_sum(jnp.asarray(z), jnp.asarray(bank), jnp.asarray(lv), block_q=24)


def test_the_kernels_lower_to_triton_for_a_gpu():
  # The CPU cannot run the compiled kernels, but it can lower them for CUDA: Triton's
  # rules (power-of-two tensors in loads and stores, supported ops) are checked here.
  b, n, d = 300, 1000, 40
  args = (jnp.zeros((b, d)), jnp.zeros((n, d)), jnp.float32(0.0))
  kw = dict(
    bank_mask=jnp.ones(n, bool),
    bank_ids=jnp.arange(n, dtype=jnp.int32),
    query_ids=jnp.arange(b, dtype=jnp.int32),
    interpret=False,
  )
  f = lambda z, bk, lv: pallas_lse.log_kernel_sum(z, bk, lv, **kw)[0].sum()  # noqa: E731
  for fn, kernels in ((f, 1), (jax.grad(f, (0, 1, 2)), 3)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == kernels
