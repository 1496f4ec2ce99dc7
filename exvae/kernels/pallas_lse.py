"""The exemplar log-sum-exp as fused Pallas kernels (``log_kernel_sum(impl="pallas")``).

The XLA path (`exemplar_lse`) writes each (B, chunk) exponent tile to device memory
and reads it back for the max, the exp-sum and, in the backward pass, the weights:
on an H200 that traffic alone is most of the forward time at N = 1e6. Here, as
flash attention keeps its score tiles, each tile lives in registers / shared memory:

* forward, one program per block of ``BQ`` queries: a loop over the bank in blocks of
  ``BN`` rows computes the exponent tile ``a = zs . bc^T + zq + bq`` (one float32 dot
  at full precision plus two broadcasts), applies leave-one-out, and updates the
  running max and sum (online log-sum-exp); only the (B,) result is written;
* backward, from the saved per-row lse (no second softmax pass over memory):
  one kernel per query block accumulates ``sum_n w mu_n``, ``sum_n w`` and
  ``sum_n w a`` (the gradients of z and log_var), one per bank block accumulates
  ``sum_b w z_b`` and ``sum_b w`` (the gradient of the bank), each recomputing
  its tiles.

Same numerics as the XLA impl: codes centred on the coordinate-wise median of the
queries, the exponent -|z - mu|^2 / (2 s2) with every product at
``Precision.HIGHEST`` (IEEE float32 on Triton, never TF32), masked exemplars as a
finite -1e30 penalty, leave-one-out by id, the per-row clamp of the running max at
0, -inf and zero gradients for rows with no valid exemplar. On a backend other than
a GPU the kernels run in Pallas' interpret mode (how the CPU tests check them).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from exvae.kernels.loo import exemplar_counts

_PEN = -1e30  # exponent of a masked or padded bank row (as exemplar_lse._PEN)
BLOCK_Q = 64  # queries per program
BLOCK_N = 128  # bank rows per step of a program's loop
PROGRAMS = 512  # programs per call to aim for: query blocks x runs of the bank


def _dot_t(a, b):
  """a . b^T (contract the last axes) at full float32 precision."""
  return lax.dot_general(
    a,
    b,
    (((1,), (1,)), ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def _dot(a, b):
  """a . b at full float32 precision."""
  return lax.dot_general(
    a,
    b,
    (((1,), (0,)), ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def _params(interpret: bool):
  """Compiled: the Triton backend, named (whatever jax_pallas_use_mosaic_gpu says)."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton

  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _pad_to(x, rows: int, value=0):
  pad = rows - x.shape[0]
  if pad == 0:
    return x
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


def _operands(z, bank, log_var, bank_mask, bank_ids, query_ids, bq_, bn_, split=1):
  """Centred, padded operands (one XLA pass each; O((B + N) d) against the kernel's B N d).

  Returns zs = zc / s2, zc, zq = -|zc|^2 / (2 s2) (queries, padded to a multiple of
  ``bq_`` rows and a power-of-two width), bc (bank - centre, padded likewise to
  ``split`` equal runs of ``bn_``-row blocks), bq = -|bc|^2 / (2 s2) + penalty, the
  ids (padding: -1), and the centred inputs for the gradients.
  """
  b, d = z.shape
  n = bank.shape[0]
  dp = max(16, 1 << (d - 1).bit_length())  # Triton wants power-of-two blocks
  bp = -(-b // bq_) * bq_
  nb = -(-n // bn_)
  np_ = -(-nb // split) * split * bn_
  center = lax.stop_gradient(jnp.median(z, axis=0))  # the xla impl's centre rule
  inv_s2 = jnp.exp(-log_var)
  sq = -0.5 * inv_s2
  zc = z - center
  bc = bank - center
  pen = 0.0 if bank_mask is None else jnp.where(bank_mask, 0.0, _PEN)
  widen = lambda x: jnp.pad(x, ((0, 0), (0, dp - d)))  # noqa: E731
  ops = dict(
    zs=_pad_to(widen(zc * inv_s2), bp),
    zc=_pad_to(widen(zc), bp),
    zq=_pad_to(sq * jnp.sum(zc * zc, axis=1), bp),
    bc=_pad_to(widen(bc), np_),
    bq=_pad_to(sq * jnp.sum(bc * bc, axis=1) + pen, np_, _PEN),
    qid=_pad_to(query_ids if query_ids is not None else jnp.full((b,), -1, jnp.int32), bp, -1),
    bid=_pad_to(bank_ids if bank_ids is not None else jnp.full((n,), -1, jnp.int32), np_, -1),
  )
  return ops, zc, bc, inv_s2


def _loo(bid, qid, rows_are_queries: bool):
  """True where a bank row is the query itself (a negative query id: never)."""
  if rows_are_queries:
    return (bid[None, :] == qid[:, None]) & (qid[:, None] >= 0)
  return (bid[:, None] == qid[None, :]) & (qid[None, :] >= 0)


def _fwd_kernel(
  zs_ref, zq_ref, qid_ref, bc_ref, bq_ref, bid_ref, m_ref, s_ref, *, bn_, nblocks, loo
):
  """Running max and sum of one query block over one run of ``nblocks`` bank blocks."""
  zs, zq, qid = zs_ref[...], zq_ref[...], qid_ref[...]
  first = pl.program_id(1) * nblocks

  def body(j, carry):
    m, s = carry
    rows = pl.ds((first + j) * bn_, bn_)
    a = _dot_t(zs, bc_ref[rows, :]) + zq[:, None] + bq_ref[rows][None, :]
    if loo:
      a = jnp.where(_loo(bid_ref[rows], qid, True), -jnp.inf, a)
    m_new = jnp.maximum(m, jnp.max(a, axis=1))
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # rows that are all -inf so far
    s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(a - m_safe[:, None]), axis=1)
    return m_new, s

  init = (jnp.full(zq.shape, -jnp.inf, jnp.float32), jnp.zeros(zq.shape, jnp.float32))
  m, s = lax.fori_loop(0, nblocks, body, init)
  m_ref[...] = m[None, :]
  s_ref[...] = s[None, :]


def _row_spec(block, width=None):
  """Row block i of a (rows,) or (rows, width) array, for a grid (i, j) or (i,)."""
  if width is None:
    return pl.BlockSpec((block,), lambda i, *_: (i,))
  return pl.BlockSpec((block, width), lambda i, *_: (i, 0))


def _full_spec(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _split_spec(block, width=None):
  """Block (j, i) of a (split, rows[, width]) output: query block i, bank run j."""
  if width is None:
    return pl.BlockSpec((1, block), lambda i, j: (j, i))
  return pl.BlockSpec((1, block, width), lambda i, j: (j, i, 0))


def _forward(ops, loo: bool, interpret: bool, bq_: int, bn_: int, split: int):
  """lse0 (padded B,): each program streams one run of the bank for one query block
  (grid: query blocks x ``split`` runs), and the runs' (max, sum) pairs are merged."""
  bp, dp = ops["zs"].shape
  np_ = ops["bc"].shape[0]
  nblocks = np_ // bn_ // split
  f32 = jnp.float32
  m, s = pl.pallas_call(
    partial(_fwd_kernel, bn_=bn_, nblocks=nblocks, loo=loo),
    grid=(bp // bq_, split),
    in_specs=[
      _row_spec(bq_, dp),
      _row_spec(bq_),
      _row_spec(bq_),
      _full_spec((np_, dp)),
      _full_spec((np_,)),
      _full_spec((np_,)),
    ],
    out_specs=[_split_spec(bq_), _split_spec(bq_)],
    out_shape=[jax.ShapeDtypeStruct((split, bp), f32), jax.ShapeDtypeStruct((split, bp), f32)],
    interpret=interpret,
    compiler_params=_params(interpret),
  )(ops["zs"], ops["zq"], ops["qid"], ops["bc"], ops["bq"], ops["bid"])
  mx = jnp.max(m, axis=0)
  mx_safe = jnp.where(mx > -jnp.inf, mx, 0.0)
  total = jnp.sum(s * jnp.exp(m - mx_safe), axis=0)
  lse0 = jnp.minimum(mx, 0.0) + jnp.log(jnp.where(total > 0, total, 1.0))  # per-row clamp
  return jnp.where(total > 0, lse0, -jnp.inf)


def _bwd_q_kernel(
  zs_ref,
  zq_ref,
  qid_ref,
  lse_ref,
  g_ref,
  bc_ref,
  bq_ref,
  bid_ref,
  wmu_ref,
  wsum_ref,
  wa_ref,
  *,
  bn_,
  nblocks,
  loo,
):
  """Per query block and run of the bank: sum_n w mu_n (centred), sum_n w, sum_n w a."""
  zs, zq, qid, lse, g = zs_ref[...], zq_ref[...], qid_ref[...], lse_ref[...], g_ref[...]
  first = pl.program_id(1) * nblocks

  def body(j, carry):
    wmu, wsum, wa = carry
    rows = pl.ds((first + j) * bn_, bn_)
    bc = bc_ref[rows, :]
    a = _dot_t(zs, bc) + zq[:, None] + bq_ref[rows][None, :]
    w = jnp.exp(a - lse[:, None]) * g[:, None]
    if loo:
      w = jnp.where(_loo(bid_ref[rows], qid, True), 0.0, w)
    return wmu + _dot(w, bc), wsum + jnp.sum(w, axis=1), wa + jnp.sum(w * a, axis=1)

  init = (
    jnp.zeros(zs.shape, jnp.float32),
    jnp.zeros(zq.shape, jnp.float32),
    jnp.zeros(zq.shape, jnp.float32),
  )
  wmu, wsum, wa = lax.fori_loop(0, nblocks, body, init)
  wmu_ref[...] = wmu[None]
  wsum_ref[...] = wsum[None]
  wa_ref[...] = wa[None]


def _bwd_n_kernel(
  bc_ref,
  bq_ref,
  bid_ref,
  zs_ref,
  zc_ref,
  zq_ref,
  qid_ref,
  lse_ref,
  g_ref,
  wz_ref,
  wsum_ref,
  *,
  bq_,
  nblocks,
  loo,
):
  """Per bank block: sum_b w z_b (centred) and sum_b w."""
  bc, bqv, bid = bc_ref[...], bq_ref[...], bid_ref[...]

  def body(i, carry):
    wz, wsum = carry
    rows = pl.ds(i * bq_, bq_)
    a = _dot_t(bc, zs_ref[rows, :]) + bqv[:, None] + zq_ref[rows][None, :]
    w = jnp.exp(a - lse_ref[rows][None, :]) * g_ref[rows][None, :]
    if loo:
      w = jnp.where(_loo(bid, qid_ref[rows], False), 0.0, w)
    return wz + _dot(w, zc_ref[rows, :]), wsum + jnp.sum(w, axis=1)

  init = (jnp.zeros(bc.shape, jnp.float32), jnp.zeros(bqv.shape, jnp.float32))
  wz, wsum = lax.fori_loop(0, nblocks, body, init)
  wz_ref[...] = wz
  wsum_ref[...] = wsum


def _backward(ops, lse, g, loo: bool, interpret: bool, bq_: int, bn_: int, split: int):
  """(wmu, wsum_q, wa) per query row and (wz, wsum_n) per bank row, all padded."""
  bp, dp = ops["zs"].shape
  np_ = ops["bc"].shape[0]
  f32 = jnp.float32
  wmu, wsum_q, wa = pl.pallas_call(
    partial(_bwd_q_kernel, bn_=bn_, nblocks=np_ // bn_ // split, loo=loo),
    grid=(bp // bq_, split),
    in_specs=[
      _row_spec(bq_, dp),
      _row_spec(bq_),
      _row_spec(bq_),
      _row_spec(bq_),
      _row_spec(bq_),
      _full_spec((np_, dp)),
      _full_spec((np_,)),
      _full_spec((np_,)),
    ],
    out_specs=[_split_spec(bq_, dp), _split_spec(bq_), _split_spec(bq_)],
    out_shape=[
      jax.ShapeDtypeStruct((split, bp, dp), f32),
      jax.ShapeDtypeStruct((split, bp), f32),
      jax.ShapeDtypeStruct((split, bp), f32),
    ],
    interpret=interpret,
    compiler_params=_params(interpret),
  )(ops["zs"], ops["zq"], ops["qid"], lse, g, ops["bc"], ops["bq"], ops["bid"])
  wmu, wsum_q, wa = (jnp.sum(x, axis=0) for x in (wmu, wsum_q, wa))
  wz, wsum_n = pl.pallas_call(
    partial(_bwd_n_kernel, bq_=bq_, nblocks=bp // bq_, loo=loo),
    grid=(np_ // bn_,),
    in_specs=[
      _row_spec(bn_, dp),
      _row_spec(bn_),
      _row_spec(bn_),
      _full_spec((bp, dp)),
      _full_spec((bp, dp)),
      _full_spec((bp,)),
      _full_spec((bp,)),
      _full_spec((bp,)),
      _full_spec((bp,)),
    ],
    out_specs=[_row_spec(bn_, dp), _row_spec(bn_)],
    out_shape=[jax.ShapeDtypeStruct((np_, dp), f32), jax.ShapeDtypeStruct((np_,), f32)],
    interpret=interpret,
    compiler_params=_params(interpret),
  )(ops["bc"], ops["bq"], ops["bid"], ops["zs"], ops["zc"], ops["zq"], ops["qid"], lse, g)
  return wmu, wsum_q, wa, wz, wsum_n


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(z, bank, log_var, bank_mask, bank_ids, query_ids, static):
  out, _ = _core_fwd(z, bank, log_var, bank_mask, bank_ids, query_ids, static)
  return out


def _core_fwd(z, bank, log_var, bank_mask, bank_ids, query_ids, static):
  interpret, bq_, bn_, split = static
  b, d = z.shape
  loo = bank_ids is not None and query_ids is not None
  ops, _, _, _ = _operands(z, bank, log_var, bank_mask, bank_ids, query_ids, bq_, bn_, split)
  lse0 = _forward(ops, loo, interpret, bq_, bn_, split)[:b]
  count = exemplar_counts(b, bank.shape[0], bank_mask, bank_ids, query_ids)
  lse0 = jnp.where(count > 0, lse0, -jnp.inf)
  lse = lse0 - 0.5 * d * (jnp.log(2.0 * jnp.pi) + log_var)
  return (lse, count), (z, bank, log_var, bank_mask, bank_ids, query_ids, lse0)


def _core_bwd(static, res, cts):
  interpret, bq_, bn_, split = static
  z, bank, log_var, bank_mask, bank_ids, query_ids, lse0 = res
  g, _ = cts  # count is piecewise constant: no gradient
  b, d = z.shape
  n = bank.shape[0]
  loo = bank_ids is not None and query_ids is not None
  ops, zc, bc, inv_s2 = _operands(z, bank, log_var, bank_mask, bank_ids, query_ids, bq_, bn_, split)
  finite = lse0 > -jnp.inf  # rows with no valid exemplar: zero gradient
  g = jnp.where(finite, g, 0.0).astype(jnp.float32)
  bp = ops["zs"].shape[0]
  wmu, wsum_q, wa, wz, wsum_n = _backward(
    ops, _pad_to(jnp.where(finite, lse0, 0.0), bp), _pad_to(g, bp), loo, interpret, bq_, bn_, split
  )
  gz = inv_s2 * (wmu[:b, :d] - zc * wsum_q[:b, None])  # sum_n w (mu_n - z) / s2
  gmu = inv_s2 * (wz[:n, :d] - bc * wsum_n[:n, None])  # sum_b w (z_b - mu_n) / s2
  glv = -jnp.sum(wa) - 0.5 * d * jnp.sum(g)  # d a / d log_var = -a
  return (gz.astype(z.dtype), gmu.astype(bank.dtype), glv.astype(log_var.dtype), None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


def log_kernel_sum(
  z,
  bank,
  log_var,
  bank_mask=None,
  bank_ids=None,
  query_ids=None,
  *,
  interpret: bool | None = None,
  block_q: int = BLOCK_Q,
  block_n: int = BLOCK_N,
  split: int | None = None,
):
  """``exemplar_lse.log_kernel_sum`` (float32, no bank_dtype) through the fused kernels.

  Args:
    z, bank, log_var, bank_mask, bank_ids, query_ids: as there, already converted
      (float32 arrays, a scalar log_var, int32 ids, a bool mask or None).
    interpret: Pallas interpret mode; None: on any backend but a GPU.
    block_q, block_n: queries per program and bank rows per loop step (powers of two).
    split: runs the bank is cut into, one program each per query block (merged after);
      None: enough for about ``PROGRAMS`` programs (a GPU's SMs several times over).

  Returns:
    (lse, count) as ``exemplar_lse.log_kernel_sum``; gradients for z, bank and log_var.
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  for name, v in (("block_q", block_q), ("block_n", block_n)):
    if v < 16 or v & (v - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {v}")
  nblocks = -(-bank.shape[0] // block_n)
  if split is None:
    split = -(-PROGRAMS // -(-z.shape[0] // block_q))
  split = max(1, min(int(split), nblocks))
  return _core(
    z,
    bank,
    log_var,
    bank_mask,
    bank_ids,
    query_ids,
    (bool(interpret), int(block_q), int(block_n), split),
  )
