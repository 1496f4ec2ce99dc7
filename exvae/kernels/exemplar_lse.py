"""Streamed exemplar-prior kernels: log-sum of isotropic Gaussian kernels and k-NN.

The Exemplar VAE prior is log p(z) = logsumexp_n log N(z; mu_n, s2 I) - log N'.
With B queries and N exemplars the B x N matrix of log-densities does not fit in
memory at evaluation scale (B=5000 samples x N=50000 exemplars is 1 GB in f32), so
everything here streams over the bank in chunks with an online (running max)
log-sum-exp, and the gradient is a custom VJP that recomputes each chunk.

Layout / speed notes (measured on a 2-core AVX-512 CPU, XLA:CPU + YNNPACK):
* The exponent -|z - mu|^2 / (2 s2) comes out of ONE matmul of augmented operands
    za = [z/s2, 1,              -|z|^2/(2 s2), (1)]      (B, d+2 [+1])
    ba = [mu,   -|mu|^2/(2 s2), 1,             (pen)]    (C, d+2 [+1])
  where pen = -1e30 for masked exemplars (column only present with a bank_mask).
  No B x N elementwise pass builds the exponent or applies the mask; each chunk
  is then one max-reduce and one exp-sum-reduce over the (B, C) tile.
* The bank side is augmented per chunk inside the loop (dynamic slices of the
  original bank, ragged tail handled separately): no padded/augmented copy of the
  bank is materialised (that alone cost ~90 ms at N = 1e6).
* Codes are centred on the query median (distances are translation invariant), which
  keeps norms small and the matmul-form cancellation error low.
* On CPU the (B, C) tile should stay a few MB (L2/L3 resident): the default chunk
  is ~2M elements / B (C = 384 for B = 5000, ~21k for B = 100). On GPU / TPU it is
  ~32M elements / B (C = 6656 for B = 5000): fewer chunks, fewer launches.
* The per-element clamp dist >= 0 costs a separate pass (~6%), so it is applied per
  row: the running max exponent is capped at 0 (the nearest exemplar's term is
  <= 1); other terms can exceed 1 only by rounding (~1e-6 relative).
* A one-pass variant (sum exp(a - previous max) with an overflow fallback under
  lax.cond) was tried: no faster on CPU, and much slower for small s2.
* Every matmul (forward tile, top-k tile, the two backward products) is pinned to
  lax.Precision.HIGHEST by `_dot`: the default float32 precision is a single
  bfloat16 pass on TPU and may be TF32 on NVIDIA GPUs, errors of tenths of a nat
  in the exponent. On a GPU a HIGHEST f32 matmul runs without tensor cores; at
  K = d + 2 its time is of the order of the tile's memory passes
  (bench/device_check.py measures both against the device's rates).
* XLA:CPU cannot fuse the dot with the two reductions, so each (B, C) tile still
  goes through memory three times. On CPU the forward therefore defaults to the
  optional C++ FFI kernel of `cpu_fused` (same exponent, centre rule and clamp;
  tiles stay in registers / L1), ~2x faster at B = 5000, N = 5e4; `impl="xla"`
  forces the path below. The backward pass is always the XLA recomputation.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from exvae.kernels.loo import exemplar_counts

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)
_PEN = -1e30  # exponent penalty of masked / padded exemplars (finite: no 0 * inf in gemm)
_PEN_THRESH = -1e29  # anything below this is a penalised (invalid) entry
_TILE_ELEMS = 1 << 21  # CPU: target size of one (B, chunk) tile in elements (8 MB in f32)
# GPU / TPU: 128 MB f32 tiles. The tile lives in device memory whatever its size, and
# each chunk costs a few kernel launches and a loop step (tens of microseconds): with
# the CPU's tiles, B = 5000 and N = 1e6 would take 2600 chunks. At 32M elements the
# same bank takes 80 chunks, each ~0.1 ms of tile traffic at 4 TB/s.
_TILE_ELEMS_ACCEL = 1 << 25


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def default_chunk_size(batch: int, n: int, backend: Optional[str] = None) -> int:
  """Chunk length used when chunk_size is None: keeps the (B, C) tile ~8 MB on CPU
  (cache resident) and ~128 MB on GPU / TPU (few chunks, launch costs amortised).

  Args:
    batch: number of queries B.
    n: bank size N.
    backend: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.
  Returns:
    chunk length in [1, N], a multiple of 128 when smaller than N.
  """
  if backend is None:
    backend = jax.default_backend()
  tile = _TILE_ELEMS if backend == "cpu" else _TILE_ELEMS_ACCEL
  c = max(256, (tile // max(batch, 1)) // 128 * 128)
  return int(min(c, max(n, 1)))


def _chunking(batch: int, n: int, chunk_size: Optional[int]) -> tuple[int, int]:
  """Return (chunk, num_chunks) with chunk * num_chunks >= n."""
  if chunk_size is None:
    chunk = default_chunk_size(batch, n)
  else:
    if chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = min(int(chunk_size), max(n, 1))
  return chunk, -(-max(n, 1) // chunk)


def _round_to(x: Array, dtype: Any) -> Array:
  """x rounded to `dtype`'s precision (nearest even), kept in x's dtype.

  An explicit reduce_precision rather than a convert round trip: XLA's GPU
  compiler removes f32 -> bf16 -> f32 convert pairs (excess precision is
  allowed by default), which zeroed the mid and lo parts of `_split3` and
  put 0.28 nats of error on an H200 where the CPU has 0.01 (device check).
  """
  fi = jnp.finfo(dtype)
  return lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _split3(x: Array, dtype: Any) -> list[Array]:
  """x ~= hi + mid + lo with each part exactly representable in `dtype` (bf16)."""
  hi = _round_to(x, dtype)
  r = x - hi
  mid = _round_to(r, dtype)
  return [hi.astype(dtype), mid.astype(dtype), (r - mid).astype(dtype)]


class _Setup(NamedTuple):
  """Everything a chunk body needs; the bank itself is sliced per chunk."""

  za: Array  # (B, K) augmented queries
  zc: Array  # (B, d) centred queries (compute dtype)
  center: Array  # (d,)
  scale_sq: Array  # scalar multiplying |mu|^2 in the exponent
  qids: Optional[Array]  # (B,) int32 or None
  count: Array  # (B,) float32 number of valid exemplars per query
  use_pen: bool  # static: bank rows can be masked via the penalty column
  bank_dtype: Any  # static


def _setup(
  z: Array,
  bank: Array,
  log_var: Optional[Array],
  bank_mask,
  bank_ids,
  query_ids,
  bank_dtype: Any,
  for_topk: bool = False,
) -> _Setup:
  """Build the query side of the augmented matmul (see module docstring).

  za @ ba_c.T = scale_cross * z.mu + scale_sq * (|z|^2 + |mu|^2) + pen:
    density: scale_cross = 1/s2, scale_sq = -1/(2 s2)  ->  -dist / (2 s2)
    top-k:   scale_cross = 2,    scale_sq = -1          ->  -dist
  With bank_dtype (bf16) the cross term uses rounded z and mu, while the squared
  norms are computed in f32 FROM THE ROUNDED values and enter as three bf16 pieces
  each multiplied by an exact 1.0: the result is the f32-accurate distance between
  slightly perturbed points instead of a cancellation of independently rounded
  terms (which would cost ~|z|^2/s2 * 2^-8 nats).
  """
  b, n = z.shape[0], bank.shape[0]
  ct = z.dtype
  # Any centre is exact in exact arithmetic (distances are translation
  # invariant); in float32 the matmul form loses ~eps * |z - c|^2, so c must sit
  # among the queries. The coordinate-wise median does, even when a few queries
  # are far outliers (the mean would be dragged away and cost every other row
  # its precision).
  center = lax.stop_gradient(jnp.median(z, axis=0))
  zc = z - center
  if for_topk:
    sc, sq = jnp.asarray(2.0, ct), jnp.asarray(-1.0, ct)
  else:
    inv_s2 = jnp.exp(-log_var)
    sc, sq = inv_s2, -0.5 * inv_s2
  use_pen = bank_mask is not None
  if bank_dtype is None:
    cols = [zc * sc, jnp.ones((b, 1), ct), (sq * jnp.sum(zc * zc, axis=1))[:, None]]
    one = jnp.ones((b, 1), ct)
  else:
    zr_f = _round_to(zc * sc, bank_dtype)
    zr = zr_f.astype(bank_dtype)
    z_eff = zr_f / sc  # the perturbed query actually used
    one = jnp.ones((b, 1), bank_dtype)
    cols = [zr, one, one, one] + [
      p[:, None] for p in _split3(sq * jnp.sum(z_eff * z_eff, axis=1), bank_dtype)
    ]
  if use_pen:
    cols.append(one)
  za = jnp.concatenate(cols, 1)
  count = exemplar_counts(b, n, bank_mask, bank_ids, query_ids)
  qids = query_ids if bank_ids is not None and query_ids is not None else None
  return _Setup(za, zc, center, sq, qids, count, use_pen, bank_dtype)


def _bank_chunk(st: _Setup, bank_c: Array, mask_c: Optional[Array]) -> Array:
  """Augmented (C, K) operand for one bank chunk, built in cache."""
  ct = bank_c.dtype
  bc = bank_c - st.center
  c = bc.shape[0]
  if st.bank_dtype is None:
    cols = [bc, (st.scale_sq * jnp.sum(bc * bc, axis=1))[:, None], jnp.ones((c, 1), ct)]
    pen_t = ct
  else:
    br_f = _round_to(bc, st.bank_dtype)
    br = br_f.astype(st.bank_dtype)
    bsq = st.scale_sq * jnp.sum(jnp.square(br_f), axis=1)
    one = jnp.ones((c, 1), st.bank_dtype)
    cols = [br] + [p[:, None] for p in _split3(bsq, st.bank_dtype)] + [one] * 3
    pen_t = st.bank_dtype
  if st.use_pen:
    cols.append(jnp.where(mask_c, 0.0, _PEN).astype(pen_t)[:, None])
  return jnp.concatenate(cols, 1)


def _varying(x) -> set:
  """Mesh axes over which x is device-varying (inside jax.shard_map; else empty)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
  return set(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _sum_to_primal(ct: Array, primal: Array) -> Array:
  """Cotangent of an input that is replicated while the computation is varying
  (e.g. z replicated, bank sharded, inside shard_map): sum the per-device parts."""
  extra = tuple(sorted(_varying(ct) - _varying(primal)))
  return lax.psum(ct, extra) if extra else ct


def _vary_like(tree, refs: tuple):
  """Mark scan-carry inits as device-varying like `refs` (inside jax.shard_map).

  Under shard_map a carry computed from a sharded bank is 'varying' over the mesh
  axis while a fresh jnp.full(...) init is not, and scan rejects the mismatch.
  Outside shard_map this is the identity.
  """
  axes: set = set()
  for r in jax.tree_util.tree_leaves(refs):
    axes |= _varying(r)

  def cast(x):
    missing = tuple(sorted(axes - _varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree_util.tree_map(cast, tree) if axes else tree


def _stream(n: int, chunk: int, fn, carry, arrays: tuple, refs: tuple = ()):
  """Run fn(carry, start, *chunk_slices) -> (carry, y) over the bank in chunks.

  Full chunks go through lax.scan with dynamic slices of the ORIGINAL arrays (no
  padded / augmented copy of the bank is ever materialised); a ragged tail, if
  any, is one extra static call. Returns (carry, ys) with ys concatenated along
  the bank axis (or None if fn returns None).
  """
  num_full, rem = divmod(n, chunk)
  carry = _vary_like(carry, tuple(a for a in arrays if a is not None) + tuple(refs))

  def sl(start, size):
    return tuple(None if x is None else lax.dynamic_slice_in_dim(x, start, size, 0) for x in arrays)

  def body(c, i):
    start = i * chunk
    return fn(c, start, *sl(start, chunk))

  carry, ys = lax.scan(body, carry, jnp.arange(num_full, dtype=jnp.int32))
  if ys is not None:
    ys = ys.reshape((num_full * chunk,) + ys.shape[2:])
  if rem:
    start = num_full * chunk
    carry, y = fn(carry, jnp.int32(start), *sl(start, rem))
    if ys is not None:
      ys = jnp.concatenate([ys, y], 0)
  return carry, ys


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """a . b contracting axis contract[0] of a with contract[1] of b, at full precision.

  Every matmul of these kernels goes through here. Pinned to HIGHEST: the default
  float32 precision is one bfloat16 pass on TPU and may be TF32 on recent NVIDIA
  GPUs, and either turns the exponent -|z - mu|^2 / (2 s2) of the matmul form into
  errors of tenths of a nat (tests/test_precision.py). For bfloat16 operands (the
  split of `bank_dtype`) HIGHEST is one exact pass, the same as the default.
  Accumulation is at least float32 whatever the operand dtype.
  """
  out_t = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  return lax.dot_general(
    a,
    b,
    (((contract[0],), (contract[1],)), ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=out_t,
  )


def _tile(za: Array, ba_c: Array) -> Array:
  """(B, C) exponent tile, f32 accumulation whatever the operand dtype."""
  return _dot(za, ba_c, (1, 1))


def _loo_mask(ids_c: Array, qids: Array) -> Array:
  """(B, C) True where exemplar is the query itself (negative query id: never)."""
  return (ids_c[None, :] == qids[:, None]) & (qids[:, None] >= 0)


# --------------------------------------------------------------------------------------
# log_kernel_sum
# --------------------------------------------------------------------------------------


_IMPLS = ("auto", "xla", "fused", "pallas")


def _use_fused(impl: str, arrays: tuple, bank_dtype: Any) -> bool:
  """Static choice of the forward implementation (see `log_kernel_sum`'s `impl`).

  "auto" takes the fused CPU kernel only where it is a drop-in: CPU backend with
  a single local device, the library built and vectorised, float32, no bf16
  bank, and not inside jax.shard_map (a custom call has no notion of
  device-varying values; with several devices, GSPMD would replicate it).
  """
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl == "xla":
    return False
  present = [a for a in arrays if a is not None]
  eligible = (
    bank_dtype is None and present[0].dtype == jnp.float32 and not any(_varying(a) for a in present)
  )
  if impl == "fused":
    from exvae.kernels import cpu_fused

    if not cpu_fused.available():
      raise RuntimeError(
        "impl='fused' requested but the fused CPU kernel is "
        f"unavailable: {cpu_fused.unavailable_reason()}"
      )
    if not eligible:
      raise ValueError(
        "impl='fused' needs float32 inputs, bank_dtype=None and no "
        "jax.shard_map (device-varying) inputs"
      )
    return True
  if not eligible or jax.default_backend() != "cpu" or jax.local_device_count() != 1:
    return False
  from exvae.kernels import cpu_fused

  return cpu_fused.vectorized()


def _lse0_fused(z, bank, log_var, bank_mask, bank_ids, query_ids):
  """`_lse0` through the fused C++ kernel (cpu_fused): same exponent, same centre
  rule and clamp as the XLA path, but the (B, N) tiles never leave L1/L2.

  The query side of `_setup` is rebuilt here from its pieces so that the two
  O(B log B) / O(N log N) XLA sorts it needs (jnp.median, the LOO id sort for the
  counts; ~30 ms at B = 5000 on CPU) are replaced by the kernel library's O(B d)
  selection median and by LOO match counts accumulated inside the kernel.
  """
  from exvae.kernels import cpu_fused

  use_ids = bank_ids is not None and query_ids is not None
  center = lax.stop_gradient(cpu_fused.column_median(z))
  zc = z - center
  inv_s2 = jnp.exp(-log_var)
  sq = -0.5 * inv_s2
  lse0, removed = cpu_fused.fused_lse0(
    zc * inv_s2,
    sq * jnp.sum(zc * zc, axis=1),
    bank,
    center,
    sq,
    bank_mask,
    bank_ids if use_ids else None,
    query_ids if use_ids else None,
  )
  n_valid = jnp.int32(bank.shape[0]) if bank_mask is None else jnp.sum(bank_mask, dtype=jnp.int32)
  count = (n_valid - removed).astype(jnp.float32)
  return jnp.where(count > 0, lse0, -jnp.inf), count


def _lse0(
  z, bank, log_var, bank_mask, bank_ids, query_ids, chunk_size, bank_dtype, impl: str = "xla"
):
  """Online LSE of the exponent tiles -dist/(2 s2) (no Gaussian normaliser).

  Returns (lse0 (B,), count (B,)); rows with count 0 get -inf.
  """
  b, n = z.shape[0], bank.shape[0]
  ct = z.dtype
  chunk, _ = _chunking(b, n, chunk_size)
  use_ids = bank_ids is not None and query_ids is not None
  if _use_fused(impl, (z, bank, log_var, bank_mask, bank_ids, query_ids), bank_dtype):
    return _lse0_fused(z, bank, log_var, bank_mask, bank_ids, query_ids)
  st = _setup(z, bank, log_var, bank_mask, bank_ids, query_ids, bank_dtype)

  def fn(carry, start, bank_c, mask_c, ids_c):
    m, s = carry
    a = _tile(st.za, _bank_chunk(st, bank_c, mask_c))
    if use_ids:
      a = jnp.where(_loo_mask(ids_c, st.qids), -jnp.inf, a)
    m_new = jnp.maximum(m, jnp.max(a, axis=1))
    # m_safe keeps exp() NaN-free for rows whose entries are all -inf so far.
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(a - m_safe[:, None]), axis=1)
    return (m_new, s), None

  init = (jnp.full((b,), -jnp.inf, ct), jnp.zeros((b,), ct))
  (m, s), _ = _stream(
    n, chunk, fn, init, (bank, bank_mask, bank_ids if use_ids else None), refs=(st.za, st.qids)
  )
  # Per-row clamp: the largest term is a density ratio <= 1 (dist >= 0).
  lse0 = jnp.minimum(m, 0.0) + jnp.log(jnp.where(s > 0, s, 1.0))
  return jnp.where((st.count > 0) & (s > 0), lse0, -jnp.inf), st.count


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lse_core(z, bank, log_var, bank_mask, bank_ids, query_ids, static):
  out, _ = _lse_fwd(z, bank, log_var, bank_mask, bank_ids, query_ids, static)
  return out


def _lse_fwd(z, bank, log_var, bank_mask, bank_ids, query_ids, static):
  chunk_size, bank_dtype, impl = static
  lse0, count = _lse0(
    z, bank, log_var, bank_mask, bank_ids, query_ids, chunk_size, bank_dtype, impl
  )
  lse = lse0 - 0.5 * z.shape[1] * (_LOG_2PI + log_var)
  return (lse, count), (z, bank, log_var, bank_mask, bank_ids, query_ids, lse0)


def _lse_bwd(static, res, cts):
  """Recompute each chunk; memory O(B * chunk). The bank_dtype option only affects
  the forward: gradients use f32 tiles (w then sums to 1 within the bf16 error)."""
  chunk_size = static[0]
  z, bank, log_var, bank_mask, bank_ids, query_ids, lse0 = res
  g, _ = cts  # count is piecewise constant: no gradient
  b, d = z.shape
  n = bank.shape[0]
  ct = z.dtype
  chunk, _ = _chunking(b, n, chunk_size)
  use_ids = bank_ids is not None and query_ids is not None
  st = _setup(z, bank, log_var, bank_mask, bank_ids, query_ids, None)
  inv_s2 = jnp.exp(-log_var)
  finite = lse0 > -jnp.inf
  # Rows with no valid exemplar: lse = -inf, defined to have zero gradient.
  g = jnp.where(finite, g, 0.0).astype(ct)
  lse_safe = jnp.where(finite, lse0, 0.0)
  zc1 = jnp.concatenate([st.zc, jnp.ones((b, 1), ct)], 1)

  def fn(wb_acc, start, bank_c, mask_c, ids_c):
    ba_c = _bank_chunk(st, bank_c, mask_c)  # [mu - c, -|mu-c|^2/(2 s2), 1, (pen)]
    a = _tile(st.za, ba_c)
    # Softmax weights w_bn = exp(logN_bn - lse_b) times the row cotangent g_b.
    w = jnp.exp(a - lse_safe[:, None]) * g[:, None]
    if use_ids:
      w = jnp.where(_loo_mask(ids_c, st.qids), 0.0, w)
    # One matmul gives sum_n w mu_n, sum_n w and (via za . wb) sum_n w a.
    wb_acc = wb_acc + _dot(w, ba_c, (1, 0))
    wz = _dot(w, zc1, (0, 0))  # (C, d+1)
    gmu = inv_s2 * (wz[:, :d] - (bank_c - st.center) * wz[:, d:])
    return wb_acc, gmu

  init = jnp.zeros(st.za.shape, ct)
  wb, gmu = _stream(
    n,
    chunk,
    fn,
    init,
    (bank, bank_mask, bank_ids if use_ids else None),
    refs=(st.za, st.qids, g, lse_safe),
  )
  # grad_z = sum_n w (mu_n - z)/s2 ; column d+1 of ba is the constant 1.
  gz = inv_s2 * (wb[:, :d] - st.zc * wb[:, d + 1 : d + 2])
  # d lse / d log_var = sum_n w dist/(2 s2) - d/2 = -sum_n w a - d/2 (pen terms have w=0).
  glv = -jnp.sum(st.za * wb) - 0.5 * d * jnp.sum(g)
  return (
    _sum_to_primal(gz.astype(z.dtype), z),
    _sum_to_primal(gmu.astype(bank.dtype), bank),
    _sum_to_primal(glv.astype(log_var.dtype), log_var),
    None,
    None,
    None,
  )


_lse_core.defvjp(_lse_fwd, _lse_bwd)


def _pallas(z, bank, log_var, bank_mask, bank_ids, query_ids, bank_dtype):
  """impl="pallas": the fused Pallas kernels of `pallas_lse` (forward and backward)."""
  present = [a for a in (z, bank, log_var, bank_mask, bank_ids, query_ids) if a is not None]
  if bank_dtype is not None or z.dtype != jnp.float32 or any(_varying(a) for a in present):
    raise ValueError(
      "impl='pallas' needs float32 inputs, bank_dtype=None and no "
      "jax.shard_map (device-varying) inputs"
    )
  from exvae.kernels import pallas_lse

  return pallas_lse.log_kernel_sum(z, bank, log_var, bank_mask, bank_ids, query_ids)


@partial(jax.jit, static_argnames=("chunk_size", "bank_dtype", "impl"))
def log_kernel_sum(
  z: Array,
  bank: Array,
  log_var: Array,
  *,
  bank_mask: Optional[Array] = None,
  bank_ids: Optional[Array] = None,
  query_ids: Optional[Array] = None,
  chunk_size: Optional[int] = None,
  bank_dtype: Any = None,
  impl: str = "auto",
) -> tuple[Array, Array]:
  """Log of the sum of isotropic Gaussian kernels, streamed over the bank.

  lse[b] = log sum_{n valid for b} N(z_b; mu_n, s2 I), s2 = exp(log_var), where
  valid(b, n) = bank_mask[n] and not (bank_ids[n] == query_ids[b] >= 0).
  Memory is O(B * chunk + (B + N) * d) in the forward AND backward pass (custom VJP
  that recomputes each chunk). Rows with no valid exemplar give lse = -inf and zero
  gradients (never NaN).

  Args:
    z: (B, d) queries (f32; f64 is honoured under jax_enable_x64).
    bank: (N, d) exemplar codes mu_n.
    log_var: scalar shared log-variance.
    bank_mask: optional (N,) bool; False excludes an exemplar.
    bank_ids: optional (N,) int32 exemplar ids (leave-one-out with query_ids).
    query_ids: optional (B,) int32; a negative id disables LOO for that row.
    chunk_size: bank rows per streamed chunk (static). None (recommended) picks
      `default_chunk_size(B, N)` (~2M-element tiles on CPU, ~32M on GPU / TPU).
      Any N works (ragged tail).
    bank_dtype: optional matmul dtype, e.g. jnp.bfloat16 (static), forward only.
      Accumulation and exp/sum stay f32; see `_setup` for how precision is kept.
    impl: implementation (static): "xla" (streamed XLA ops), "fused"
      (the C++ FFI kernel of `cpu_fused`: tiles never leave L1/L2; raises if it is
      unavailable or inapplicable), "pallas" (`pallas_lse`: forward and backward
      as fused Pallas kernels whose tiles stay on chip; float32, no bank_dtype,
      not inside jax.shard_map; interpret mode off a GPU), or "auto" (fused when
      on a single CPU device, available, float32, bank_dtype None and not inside
      jax.shard_map; else XLA). The backward pass of "xla", "fused" and "auto" is
      the XLA recomputation.

  Returns:
    lse: (B,) log-sum of densities (full Gaussian normaliser included).
    count: (B,) float32 number of valid exemplars per row.
  """
  ct = jnp.promote_types(jnp.result_type(z, bank), jnp.float32)
  z = jnp.asarray(z, ct)
  bank = jnp.asarray(bank, ct)
  log_var = jnp.asarray(log_var, ct).reshape(())
  use_ids = bank_ids is not None and query_ids is not None
  bank_ids = jnp.asarray(bank_ids, jnp.int32).reshape(-1) if use_ids else None
  query_ids = jnp.asarray(query_ids, jnp.int32).reshape(-1) if use_ids else None
  bank_mask = None if bank_mask is None else jnp.asarray(bank_mask, bool).reshape(-1)
  if bank.shape[0] == 0:  # empty bank: nothing valid (keeps gradients defined)
    zero = jnp.sum(z, axis=1) * 0.0 + 0.0 * log_var
    return zero - jnp.inf, jnp.zeros((z.shape[0],), jnp.float32)
  if impl == "pallas":
    return _pallas(z, bank, log_var, bank_mask, bank_ids, query_ids, bank_dtype)
  return _lse_core(z, bank, log_var, bank_mask, bank_ids, query_ids, (chunk_size, bank_dtype, impl))


# --------------------------------------------------------------------------------------
# topk_neighbors
# --------------------------------------------------------------------------------------


_GROUP = 32  # group width of the two-stage exact top-k


def _chunk_topk(neg: Array, k: int, approx: bool) -> tuple[Array, Array]:
  """Exact top-k along axis 1 of a (B, C) tile, in two stages.

  lax.top_k on CPU costs ~2.5 ns/element, more than the matmul producing the tile.
  Instead take the max of each group of _GROUP columns (one cheap reduce pass),
  the top-k groups by that max, and a top-k over those k*_GROUP candidates. Exact:
  if x is among the k largest, at most k-1 other groups hold something >= x, so
  x's group is among the k groups with the largest maxima (ties: an equal value).
  """
  b, c = neg.shape
  kc = min(k, c)
  if approx:
    return lax.approx_max_k(neg, kc)
  groups = c // _GROUP
  if c % _GROUP or groups <= k:
    return lax.top_k(neg, kc)
  tiles = neg.reshape(b, groups, _GROUP)
  _, gi = lax.top_k(jnp.max(tiles, axis=2), k)  # (B, k) best groups
  cand = jnp.take_along_axis(tiles, gi[:, :, None], axis=1).reshape(b, k * _GROUP)
  cand_idx = (gi[:, :, None] * _GROUP + jnp.arange(_GROUP, dtype=gi.dtype)).reshape(b, -1)
  vals, pos = lax.top_k(cand, k)
  return vals, jnp.take_along_axis(cand_idx, pos, axis=1)


@partial(jax.jit, static_argnames=("k", "chunk_size", "approx"))
def topk_neighbors(
  z: Array,
  bank: Array,
  k: int,
  *,
  bank_mask: Optional[Array] = None,
  bank_ids: Optional[Array] = None,
  query_ids: Optional[Array] = None,
  chunk_size: Optional[int] = None,
  approx: bool = False,
) -> tuple[Array, Array]:
  """k nearest valid bank rows (squared L2) per query, streamed over the bank.

  Per chunk: one augmented matmul gives -dist, lax.top_k keeps min(k, C), and the
  running (B, k) best list is merged with another top_k. No gradients (inputs are
  stop_gradient-ed).

  Args:
    z: (B, d) queries.
    bank: (N, d) exemplar codes.
    k: number of neighbours (static).
    bank_mask, bank_ids, query_ids: validity exactly as in `log_kernel_sum`.
    chunk_size: bank rows per chunk (static); None picks `default_chunk_size`.
    approx: use lax.approx_max_k per chunk (fast only on TPU; on CPU/GPU it is
      an exact top-k, so there is no reason to set it there).

  Returns:
    sq_dists: (B, k) float32 squared distances, ascending; +inf for missing.
    idx: (B, k) int32 bank indices; -1 where fewer than k rows are valid.
  """
  ct = jnp.promote_types(jnp.result_type(z, bank), jnp.float32)
  z = lax.stop_gradient(jnp.asarray(z, ct))
  bank = lax.stop_gradient(jnp.asarray(bank, ct))
  b, n = z.shape[0], bank.shape[0]
  use_ids = bank_ids is not None and query_ids is not None
  bank_ids = jnp.asarray(bank_ids, jnp.int32).reshape(-1) if use_ids else None
  query_ids = jnp.asarray(query_ids, jnp.int32).reshape(-1) if use_ids else None
  bank_mask = None if bank_mask is None else jnp.asarray(bank_mask, bool).reshape(-1)
  if n == 0:
    return jnp.full((b, k), jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32)
  st = _setup(z, bank, None, bank_mask, bank_ids, query_ids, None, for_topk=True)
  if chunk_size is None:
    # lax.top_k has a large per-row, per-call cost on CPU: fewer, longer chunks.
    chunk_size = max(default_chunk_size(b, n), 4096)
  chunk, _ = _chunking(b, n, chunk_size)

  def fn(carry, start, bank_c, mask_c, ids_c):
    best_neg, best_idx = carry
    neg = _tile(st.za, _bank_chunk(st, bank_c, mask_c))  # -dist (~_PEN if masked)
    if use_ids:
      neg = jnp.where(_loo_mask(ids_c, st.qids), -jnp.inf, neg)
    vals, loc = _chunk_topk(neg, k, approx)
    vals = jnp.where(vals > _PEN_THRESH, vals, -jnp.inf)
    gidx = jnp.where(vals > -jnp.inf, loc.astype(jnp.int32) + start, -1)
    all_neg = jnp.concatenate([best_neg, vals], axis=1)
    all_idx = jnp.concatenate([best_idx, gidx], axis=1)
    best_neg, pos = lax.top_k(all_neg, k)
    return (best_neg, jnp.take_along_axis(all_idx, pos, axis=1)), None

  init = (jnp.full((b, k), -jnp.inf, ct), jnp.full((b, k), -1, jnp.int32))
  (best_neg, best_idx), _ = _stream(
    n, chunk, fn, init, (bank, bank_mask, bank_ids), refs=(st.za, st.qids)
  )
  found = best_neg > -jnp.inf
  dist = jnp.where(found, jnp.maximum(-best_neg, 0.0), jnp.inf)
  return dist.astype(jnp.float32), jnp.where(found, best_idx, -1)
