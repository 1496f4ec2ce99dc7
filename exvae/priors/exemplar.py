"""Exemplar prior: a Parzen window over the encoder means of training exemplars.

    log p(z) = logsumexp_n log N(z; mu(x_n), s2 I) - log N'

with one learned scalar ``log_var = log s2`` shared by all exemplars and
dimensions, and ``mu`` the SAME encoder mean network as the posterior.

Training modes (``config.exemplar``):

* exact (``rat=False``): every batch draws ``num_exemplars`` (M) random training
  indices with replacement and encodes them WITH gradients; leave-one-out masks
  a point's own exemplar and N' counts the components actually in the sum.
* RAT (``rat=True``): a cache of all N training codes (``prior_state``) is
  refreshed without gradients at each epoch start; the batch's own means are
  written into it; the ``rat_k`` nearest cached codes of each batch element
  among M random candidates are retrieved (exact top-k); the union of the B*k
  retrieved exemplars (static shape, duplicates masked) is re-encoded with
  gradients and written back, and the mixture runs over that union.  With
  ``exemplar.rat_compact`` the distinct exemplars are moved to the front of
  the union and only the chunks that hold them are encoded.
  ``exemplar.rat_mode`` = "reference" (default) does what the authors' code
  does: the point itself may be retrieved (then masked by leave-one-out),
  candidates drawn twice count twice, and N' = the components left in the
  sum.  "bound": self excluded from the top-k, one component per exemplar,
  weights 1/(N - 1): a lower bound on the full-bank Parzen density.  The
  gradients of the two differ only through the retrieved sets; the training
  loss of "reference" is about log(N / |union|) nats lower.

Exemplar images are encoded from their grey levels, as in the reference
(``exemplar.binarize_exemplars=False``); only the data point x is binarised.
With ``binarize_exemplars=True`` every exemplar is binarised (fresh bits per
training step; a fixed draw for the evaluation bank).

Evaluation (``train=False``) uses all training exemplars, encoded once, and
no leave-one-out.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from exvae import distributed, kernels, parallel, rng
from exvae.priors.base import Prior, register


@dataclasses.dataclass(frozen=True)
class ExemplarContext:
  """The exemplar prior's context: the mixture's components for one batch, or for evaluation.

  log p(z) = logsumexp over the rows r in the sum of log N(z; bank[r], s2 I) - log N'.
  Each optional field switches one behaviour on when it holds an array and off
  when it is None; what :meth:`ExemplarPrior.context` builds:

  ==================  ========  =========  =========  ==========  =========
  context             bank_ids  bank_mask  log_norm   full_bank   M
  ==================  ========  =========  =========  ==========  =========
  exact (training)    array     None       None       False       M draws
  RAT "reference"     array     array      None       False       B * k
  RAT "bound"         array     array      array      False       B * k
  evaluation          None      None       None       True        N
  ==================  ========  =========  =========  ==========  =========

  Attributes:
    bank: (M, d) float32 exemplar codes, the candidate components.
    bank_ids: (M,) int32 training-set index of each row (-1: an empty slot), or
      None.  With ``exemplar.loo`` and query ``ids`` given to ``log_prob``, a
      row whose id equals the query's is left out of that query's sum
      (leave-one-out); None: no row is ever left out, whatever ``ids``.
    bank_mask: (M,) bool, True for the rows in the mixture, or None: every row.
    log_norm: () float32 fixed log N' (RAT "bound": log(N - 1) with
      leave-one-out, else log N), or None: N' = the number of rows left in each
      query's sum after the mask and leave-one-out.
    full_bank: static.  True for the evaluation bank, every training exemplar's
      code once (M = N), split along N over the ``data`` mesh when there is one:
      ``log_prob`` then reduces it shard by shard and ``log_prob_grouped`` may
      prune (``eval.prune_keep``).  It holds no ids, mask or fixed normaliser.
  """

  # Data fields in alphabetical order: a context flattens to its arrays in the order
  # a dict with these keys does, so the jitted programs that take one are traced
  # with the same arguments as with an untyped dict (the same programs, bit for bit).
  bank: jax.Array
  bank_ids: jax.Array | None = None
  bank_mask: jax.Array | None = None
  log_norm: jax.Array | None = None
  full_bank: bool = False

  def __post_init__(self):
    if self.full_bank and not (
      self.bank_ids is None and self.bank_mask is None and self.log_norm is None
    ):
      raise ValueError(
        "ExemplarContext: the evaluation bank (full_bank=True) holds every "
        "exemplar once, with no bank_ids, bank_mask or log_norm."
      )


jax.tree_util.register_dataclass(
  ExemplarContext,
  data_fields=["bank", "bank_ids", "bank_mask", "log_norm"],
  meta_fields=["full_bank"],
)


def _exemplar_context(ctx) -> ExemplarContext:
  """``ctx``, checked to be an :class:`ExemplarContext` (trace time only).

  Raises:
    TypeError: anything else, e.g. a dict of the untyped context this replaced,
      whose keys would otherwise be read or ignored by name.
  """
  if not isinstance(ctx, ExemplarContext):
    raise TypeError(
      f"the exemplar prior's context must be an ExemplarContext, got {type(ctx).__name__}."
    )
  return ctx


def encode_pool(
  model,
  model_params,
  pool,
  key,
  binary: bool,
  batch_size: int = 2048,
  *,
  sharded: bool = False,
  n: int = 0,
):
  """Encoder means of every image in ``pool`` (N, H, W, C) -> (N, d), in chunks.

  Traceable (``lax.map`` over chunks) so memory stays at one chunk of
  activations; no gradients are intended to flow (callers stop them).  A pool
  split along N over the ``data`` mesh (``sharded``) is encoded where it lies,
  each device its own rows, with no image leaving its device.

  Args:
    model, model_params: the model and its parameters.
    pool: (N, H, W, C) images, or (N_pad, H, W, C) split along ``data``.
    key: binarisation key (row r depends on (key, r) only, whatever the layout).
    binary: binarise before encoding.
    batch_size: rows encoded at once.
    sharded: ``pool`` is split (static).
    n: the number of real rows N (0: ``pool.shape[0]``).

  Returns:
    (N, d) codes.
  """
  n = int(n) or pool.shape[0]

  def encode_rows_local(params, rows, ids):
    def one(args):
      x, i = args
      x = x[None]
      if binary:
        x = rng.bernoulli_rows(key, x, i[None])
      return model.encode_mean(params, x)[0]

    # Batched lax.map: vectorised over chunks of batch_size, sequential across.
    return jax.lax.map(one, (rows, ids), batch_size=min(batch_size, rows.shape[0]))

  return distributed.map_pool_shards(encode_rows_local, model_params, pool, n, sharded)[:n]


def activation_bytes_per_row(model, model_params, image_shape) -> int:
  """Bytes of the intermediate values ``model.encode_mean`` computes per input row.

  Counted from the traced computation (every primitive's outputs, nested
  calls included) as the difference between 2 rows and 1 row, so per-call
  work on the weights (e.g. the gated layers' kernel concatenation) drops
  out.  It bounds what the backward pass keeps per row when the forward is
  not recomputed.  Trace-time only: no computation runs.
  """

  def total(rows):
    x = jax.ShapeDtypeStruct((rows,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(model.encode_mean)(model_params, x)

    def walk(j):
      n = 0
      for eqn in j.eqns:
        for v in eqn.outvars:
          aval = getattr(v, "aval", None)
          if hasattr(aval, "shape") and hasattr(aval, "dtype"):
            n += math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
        for sub in eqn.params.values():
          for s in sub if isinstance(sub, (tuple, list)) else (sub,):
            inner = getattr(s, "jaxpr", s)
            if hasattr(inner, "eqns"):
              n += walk(inner)
      return n

    return walk(jaxpr.jaxpr)

  return max(0, total(2) - total(1))


# Chunks per trip of the unrolled encoding loop (bounds the compile time at large M).
MAX_UNROLL = 32


def _chunks(model, pool, ids, key, binary: bool, chunk: int, sharded: bool):
  """``(xs, encode)``: the (M,) ids as whole chunks and the function that encodes one.

  On a replicated pool ``xs`` is (chunks, chunk) ids (padded with row 0) and
  ``encode(params, x)`` gathers and binarises its chunk's rows itself; on a
  pool split over the devices every row is gathered at once (one collective)
  and ``xs`` holds the (chunks, chunk, H, W, C) images.
  """
  m = ids.shape[0]
  chunk = max(1, min(int(chunk), m))
  n_chunks = -(-m // chunk)
  padded = jnp.pad(ids, (0, n_chunks * chunk - m))  # pad with row 0, sliced off by callers

  def rows(idc):
    # Binarised rows as uint8 (4x less memory than float32 where they are kept).
    x = distributed.take_rows(pool, idc, sharded)
    return rng.bernoulli_rows(key, x, idc, dtype=jnp.uint8) if binary else x

  def encode(params, xc):
    return model.encode_mean(params, distributed.shard_batch(xc.astype(jnp.float32)))

  if sharded:
    xs = rows(padded)
    return xs.reshape((n_chunks, chunk) + xs.shape[1:]), encode
  return padded.reshape(n_chunks, chunk), lambda params, idc: encode(params, rows(idc))


def balanced_chunk(m: int, chunk: int, align: int = 8) -> int:
  """Rows per chunk when ``m`` rows are encoded in chunks of at most about ``chunk``.

  The number of chunks stays ``ceil(m / chunk)``, and the rows are spread
  evenly over them (rounded up to a multiple of ``align``, which keeps each
  chunk divisible over the data-parallel devices), so the padding of the last
  chunk, up to a whole chunk of rows encoded for nothing, shrinks to less
  than ``align`` rows per chunk.  The exact prior's 20207 distinct-capacity
  rows are 21 chunks of 968 (20328 rows encoded) instead of 21 of 1000
  (21000): 3.2% fewer FLOPs.  One chunk (``m <= chunk``) is ``m`` rows, and
  ``m`` rows that split evenly keep that split.

  Args:
    m: rows to encode (static).
    chunk: the largest chunk asked for.
    align: chunk sizes are multiples of this (when there is more than one chunk).

  Returns:
    rows per chunk.
  """
  chunk = max(1, min(int(chunk), m))
  n = -(-m // chunk)
  if n == 1:
    return chunk
  even = -(-m // n)
  return even if even * n == m else -(-even // align) * align


def encode_rows(
  model,
  model_params,
  pool,
  ids,
  key,
  binary: bool,
  chunk: int = 1000,
  *,
  sharded: bool = False,
  remat: bool | None = None,
  unroll: bool = True,
):
  """Encoder means of ``pool[ids]`` WITH gradients, in chunks.

  Gathering, binarising and encoding M = 25000 exemplars in one piece streams
  ~80 MB activations per layer through memory; ``jax.lax.map`` over chunks of
  ~1000 rows keeps each chunk's working set small.  Each chunk gathers (and
  binarises) its own rows inside the loop: the loop runs over the chunks'
  ids, so no (M, H, W, C) copy of the exemplar images is made, copied into
  the loop, or given a zero cotangent in the backward pass (on a replicated
  pool; a pool split over devices gathers all rows at once, one collective).
  The loop is unrolled (up to :data:`MAX_UNROLL` chunks per loop trip): the
  chunks' forward and backward passes then run without the loop's stacking
  of each chunk's activations into, and slicing them out of, (chunks, ...)
  buffers; the exact-prior step (21 chunks) was 1.15x faster in wall time
  and 1.06x in CPU time, with identical loss and gradients, for ~10 s more
  compilation.  ``remat`` decides whether the backward pass recomputes each chunk's
  forward (``jax.checkpoint``: the peak memory of one chunk) or keeps every
  chunk's activations (no forward computed twice).  On a quiet 2-core CPU
  keeping them was 1.14x faster per exact-prior step (M = 25000, MLP VAE,
  ~540 MB kept; `bench/train_speed.py --configs exact --remat_ab`), with
  bit-identical loss and gradients; the exemplar prior decides with
  :func:`activation_bytes_per_row` and the ``exemplar.encode_remat_mb`` budget.

  Args:
    model: the model (``encode_mean`` is used).
    model_params: its parameters (gradients flow into them).
    pool: (N, H, W, C) training images in [0, 1].
    ids: (M,) int32 rows of ``pool`` to encode.
    key: binarisation key (row r's pixels depend on (key, ids[r]) only).
    binary: binarise before encoding.
    chunk: rows per chunk, at most (the rows are spread evenly over the
      ``ceil(M / chunk)`` chunks: :func:`balanced_chunk`).
    sharded: ``pool`` is split along N over the ``data`` mesh (static).
    remat: recompute the forward in the backward pass (None: only when the
      rows span more than one chunk).
    unroll: unroll the loop over chunks (False: ``lax.map``, one chunk per trip).

  Returns:
    (M, d) codes.
  """
  m = ids.shape[0]
  mesh = distributed.active_data_mesh()
  chunk = balanced_chunk(m, chunk, math.lcm(8, mesh.shape[distributed.DATA_AXIS] if mesh else 1))
  xs, encode_chunk = _chunks(model, pool, ids, key, binary, chunk, sharded)
  n_chunks, chunk = xs.shape[:2]
  one = lambda x: encode_chunk(model_params, x)
  if remat is None:
    remat = n_chunks > 1
  if remat:
    one = jax.checkpoint(one)
  if n_chunks == 1:
    return one(xs[0])[:m]
  if unroll:
    codes = jax.lax.scan(lambda c, x: (c, one(x)), None, xs, unroll=min(n_chunks, MAX_UNROLL))[1]
  else:
    codes = jax.lax.map(one, xs)
  return codes.reshape(n_chunks * chunk, -1)[:m]


def encode_rows_prefix(
  model,
  model_params,
  pool,
  ids,
  count,
  key,
  binary: bool,
  chunk: int = 125,
  *,
  sharded: bool = False,
  remat: bool = False,
):
  """Encoder means of ``pool[ids[:count]]`` WITH gradients; rows from ``count`` on are zeros.

  ``count`` is traced, the shapes are static: the (M,) ids are split into
  chunks of ``chunk`` rows, and each chunk is encoded under a ``lax.cond``
  that skips it (zero codes, no gradient work) when it starts at or past
  ``count``.  At most ``chunk - 1`` rows past ``count`` are encoded.  Under
  differentiation the skipped branch does no arithmetic either: its slots for
  the encoded branch's residuals are uninitialised buffers (JAX's ``empty``),
  and its backward branch returns zero parameter gradients.  Only one
  branch's residuals exist per chunk, unlike a cond between two encodings.

  Args:
    model: the model (``encode_mean`` is used).
    model_params: its parameters (gradients flow into them).
    pool: (N, H, W, C) training images in [0, 1].
    ids: (M,) int32 rows of ``pool``; the first ``count`` are the ones needed.
    count: int32 scalar, 0 <= count <= M.
    key: binarisation key (row r's pixels depend on (key, ids[r]) only).
    binary: binarise before encoding.
    chunk: rows per chunk (the granularity of the skip).
    sharded: ``pool`` is split along N over the ``data`` mesh (static).
    remat: recompute each chunk's forward in the backward pass.

  Returns:
    (M, d) codes: rows ``[0, count)`` the encoder means, the rest zeros
    except for the tail of the last encoded chunk.
  """
  m = ids.shape[0]
  # A split pool gathers all rows before the conds: a collective inside a
  # conditional branch would have to run on every device alike.
  xs, one = _chunks(model, pool, ids, key, binary, chunk, sharded)
  n_chunks, chunk = xs.shape[:2]
  if remat:
    one = jax.checkpoint(one)
  out = jax.eval_shape(one, model_params, xs[0])
  skip = lambda params, xc: jnp.zeros(out.shape, out.dtype)
  # A Python loop: every chunk's cond is its own op, with no loop stacking
  # their activations into (chunks, ...) buffers (as the unrolled encode_rows).
  codes = [jax.lax.cond(j * chunk < count, one, skip, model_params, xs[j]) for j in range(n_chunks)]
  return jnp.concatenate(codes, axis=0)[:m]


def distinct_capacity(n: int, m: int, sigmas: float = 10.0) -> int:
  """Static bound on the distinct values among ``m`` uniform draws from ``n``.

  The count has mean ``n (1 - (1 - 1/n)^m)`` and (Poisson approximation)
  variance ``n e^-r (1 - (1 + r) e^-r)``, r = m / n; the bound is the mean
  plus ``sigmas`` standard deviations (N = 50000, M = 25000: 19673 + 10 x 52),
  capped at ``m``.
  """
  if n <= 0 or m <= 0:
    return max(m, 0)
  r = m / n
  mean = n * (1.0 - (1.0 - 1.0 / n) ** m)
  var = max(n * math.exp(-r) * (1.0 - (1.0 + r) * math.exp(-r)), 0.0)
  return min(m, int(math.ceil(mean + sigmas * math.sqrt(var) + sigmas)))


def _first_of_each(
  keys: jax.Array, invalid: int, compact: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Static-shape de-duplication: ``(sorted keys, mask of the first of each valid run)``.

  Args:
    keys: (K,) integer keys; ``invalid`` marks an empty slot (keys are <= invalid).
    invalid: the key of empty slots.
    compact: move the distinct valid keys to the front (ascending) and give
      every other slot the key ``invalid``: the mask is then a prefix of
      ``mask.sum()`` True entries, so an encoder can stop after that prefix.

  Returns:
    (K,) keys and (K,) bool mask.
  """
  keys = jnp.sort(keys)
  first = jnp.concatenate([jnp.ones((1,), bool), keys[1:] != keys[:-1]]) & (keys < invalid)
  if not compact:
    return keys, first
  # A second sort of K small integers (the union is B*k ~ 1000 keys) costs far
  # less than one encoded row; it keeps the distinct keys in ascending order.
  keys = jnp.sort(jnp.where(first, keys, invalid))
  return keys, keys < invalid


@register("exemplar")
class ExemplarPrior(Prior):
  """Exemplar (Parzen window) prior, exact-subsampled or retrieval-augmented."""

  needs_pool = True

  def __init__(self, config):
    super().__init__(config)
    self.cfg = config.exemplar

  def _remat(self, model, model_params, pool, rows: int) -> bool:
    """Recompute the exemplar forward in the backward pass? (static, at trace time)

    ``exemplar.encode_remat_mb`` < 0: never; otherwise only when keeping the
    activations of all ``rows`` would exceed that many MiB (0: always).
    """
    budget = float(self.cfg.encode_remat_mb)
    if budget < 0:
      return False
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model_params)
    per_row = activation_bytes_per_row(model, abstract, pool.shape[1:])
    return rows * per_row > budget * 2**20

  def _encode(self, model, model_params, pool, ids, key, inputs):
    return encode_rows(
      model,
      model_params,
      pool,
      ids,
      key,
      inputs.binary,
      int(self.cfg.encode_chunk),
      sharded=inputs.pool_sharded,
      remat=self._remat(model, model_params, pool, ids.shape[0]),
    )

  def _encode_prefix(self, model, model_params, pool, ids, count, key, inputs):
    """:meth:`_encode` of the first ``count`` rows of ``ids`` only, in whole chunks of
    ``rat_compact_chunk`` rows (the later rows' codes are zeros or a placeholder's)."""
    return encode_rows_prefix(
      model,
      model_params,
      pool,
      ids,
      count,
      key,
      inputs.binary,
      int(self.cfg.rat_compact_chunk),
      sharded=inputs.pool_sharded,
      remat=self._remat(model, model_params, pool, ids.shape[0]),
    )

  def _encode_distinct(self, model, model_params, pool, cand, key, inputs, n):
    """``(codes, ids)`` of the M draws ``cand`` (WITH replacement, as the reference),
    each distinct exemplar encoded once.

    M = 25000 draws from N = 50000 hold about 19700 distinct exemplars: the
    other 21% of the rows repeat one, and encoding them again is arithmetic
    the mixture does not need (a repeated exemplar is still a component of its
    own: the codes are gathered back to all M rows, and the gather's backward
    sums their gradients).  A row's bits depend on (key, id) only, so binarised
    exemplars repeat too.  Shapes are static: ``distinct_capacity`` rows are
    encoded, 10 standard deviations above the mean count.  A draw with more
    distinct exemplars than that (about 1e-23 in the normal approximation)
    has its excess draws replaced by repeats of drawn ones, and the returned
    ids say so, so the leave-one-out mask always matches the codes.  (A
    ``lax.cond`` fallback to encoding every row was measured: its backward
    pass materialises both branches' residuals and ate the saving.)
    """
    m = cand.shape[0]
    cap = distinct_capacity(n, m)
    if cap >= m:
      return self._encode(model, model_params, pool, cand, key, inputs), cand
    uniq, inv = jnp.unique(cand, return_inverse=True, size=cap, fill_value=0)
    inv = jnp.minimum(inv.reshape(-1), cap - 1)
    codes = self._encode(model, model_params, pool, uniq, key, inputs)
    return codes[inv], uniq[inv]

  # -- parameters and state -----------------------------------------------
  def init(self, key, model, num_train):
    self._check(num_train)
    # The reference initialises the shared log-variance with a N(0, 1) draw:
    # log_var = log_var_init_mean + log_var_init_std * N(0, 1).
    log_var = self.cfg.log_var_init_mean + self.cfg.log_var_init_std * jax.random.normal(key, ())
    return {"log_var": log_var.astype(jnp.float32)}

  def _check(self, num_train: int):
    m = self._num_candidates(num_train)
    if self.cfg.loo and (num_train <= 1 or m <= 1):
      raise ValueError(
        f"Exemplar prior with leave-one-out needs at least 2 exemplars "
        f"(training set has {num_train}, num_exemplars={self.cfg.num_exemplars}): "
        "with one exemplar nothing is left to mix once a point's own exemplar is "
        "masked. Use more data or set exemplar.loo=False."
      )
    if self.cfg.rat_mode not in ("reference", "bound"):
      raise ValueError(
        f"exemplar.rat_mode must be 'reference' or 'bound', got {self.cfg.rat_mode!r}."
      )
    if self.cfg.rat and self.cfg.rat_k < 1:
      raise ValueError(f"exemplar.rat_k must be >= 1, got {self.cfg.rat_k}.")

  def _num_candidates(self, num_train: int) -> int:
    m = int(self.cfg.num_exemplars)
    return num_train if m <= 0 else m

  def init_state(self, model, num_train):
    if not self.cfg.rat:
      return {}
    return {"cache": jnp.zeros((num_train, model.latent_dim), jnp.float32)}

  def refresh(self, params, state, model, model_params, inputs):
    if not self.cfg.rat:
      return state
    codes = encode_pool(
      model,
      model_params,
      inputs.pool,
      inputs.key,
      inputs.binary,
      sharded=inputs.pool_sharded,
      n=inputs.num_pool,
    )
    return {"cache": jax.lax.stop_gradient(codes)}

  # -- context ----------------------------------------------------------------
  def context(self, params, state, model, model_params, inputs, train):
    pool = inputs.pool
    n = inputs.num_pool
    if not train:
      bank = encode_pool(
        model, model_params, pool, inputs.key, inputs.binary, sharded=inputs.pool_sharded, n=n
      )
      # On a device mesh the evaluation bank is split along N (each device holds
      # N / devices codes); log_prob then reduces shard by shard.
      return ExemplarContext(
        bank=distributed.shard_batch(jax.lax.stop_gradient(bank)), full_bank=True
      ), state
    m = self._num_candidates(n)
    k_idx, k_bin = jax.random.split(inputs.key)
    if m == n and not self.cfg.rat:
      cand = jnp.arange(n, dtype=jnp.int32)  # the whole set, no subsampling
    else:
      cand = jax.random.randint(k_idx, (m,), 0, n, dtype=jnp.int32)
    if not self.cfg.rat:
      # Chunked; each chunk split over the data-parallel devices.
      if m == n:
        bank = self._encode(model, model_params, pool, cand, k_bin, inputs)
      else:
        bank, cand = self._encode_distinct(model, model_params, pool, cand, k_bin, inputs, n)
      return ExemplarContext(bank=bank, bank_ids=cand), state
    return self._rat_context(state, model, model_params, inputs, cand, k_bin)

  def _rat_context(self, state, model, model_params, inputs, cand, k_bin):
    pool, ids = inputs.pool, inputs.ids
    n, m = inputs.num_pool, cand.shape[0]
    cache = state["cache"].at[ids].set(jax.lax.stop_gradient(inputs.mu), mode="drop")
    k = min(int(self.cfg.rat_k), m)
    reference = self.cfg.rat_mode == "reference"
    # "reference": the k nearest among the M candidates, the point itself
    # included (it takes a slot when drawn, and leave-one-out masks it below),
    # as the authors' code.  "bound": k neighbours other than the point itself.
    exclude_self = self.cfg.loo and not reference
    _, pos = kernels.topk_neighbors(
      jax.lax.stop_gradient(inputs.mu),
      cache[cand],
      k,
      bank_ids=cand if exclude_self else None,
      query_ids=ids if exclude_self else None,
      chunk_size=int(self.cfg.chunk_size) or None,
    )
    # Static-shape de-duplication.  The reference de-duplicates candidate
    # POSITIONS: an exemplar drawn twice among the M (with replacement) is two
    # components.  "bound" keeps one component per exemplar.
    compact = bool(self.cfg.rat_compact)
    if reference:
      keys, mask = _first_of_each(
        jnp.where(pos >= 0, pos, m).reshape(-1),
        m,  # m = invalid
        compact,
      )
      union = jnp.where(mask, cand[jnp.minimum(keys, m - 1)], n)
    else:
      union, mask = _first_of_each(
        jnp.where(pos >= 0, cand[jnp.maximum(pos, 0)], n).reshape(-1),
        n,  # n = invalid
        compact,
      )
    safe = jnp.minimum(union, n - 1)
    if compact:
      # The distinct exemplars are a prefix of the union: only the chunks
      # holding them are encoded.  Masked rows have no weight in the mixture
      # and are not written to the cache, so their codes (zeros, or a
      # placeholder row's in the last encoded chunk) are never read.  It pays
      # only while the codes are bunched: on Fashion-MNIST the union holds
      # 28-87% distinct rows in the first ~250 steps, then 89-99%, where one
      # product over all B*k rows is faster (the default).
      bank = self._encode_prefix(
        model, model_params, pool, safe, mask.sum(dtype=jnp.int32), k_bin, inputs
      )
    else:
      bank = self._encode(model, model_params, pool, safe, k_bin, inputs)
    cache = cache.at[jnp.where(mask, union, n)].set(jax.lax.stop_gradient(bank), mode="drop")
    log_norm = None
    if not reference:
      # Weights 1/N (1/(N-1) with leave-one-out): a lower bound on the full-bank density.
      log_norm = jnp.asarray(math.log(max(n - int(bool(self.cfg.loo)), 1)), jnp.float32)
    # Otherwise N' = the components left in the sum (the union less the masked
    # self), the reference's normalisation: log p(z) is then an estimate over
    # the retrieved neighbourhood, log(N / |union|) nats above the bound.
    ctx = ExemplarContext(
      bank=bank, bank_ids=jnp.where(mask, union, -1), bank_mask=mask, log_norm=log_norm
    )
    return ctx, {"cache": cache}

  # -- density ----------------------------------------------------------------
  def log_prob(self, params, z, ctx: ExemplarContext, ids=None):
    """log p(z): (B,) for z (B, d); leave-one-out where ``exemplar.loo``, ``ids`` and
    ``ctx.bank_ids`` are all given (see :class:`ExemplarContext`)."""
    ctx = _exemplar_context(ctx)
    use_loo = self.cfg.loo and ids is not None and ctx.bank_ids is not None
    mesh = distributed.active_data_mesh()
    if mesh is not None and ctx.full_bank:
      # Evaluation bank on a mesh: per-device streamed reduction, merged with
      # collectives (exvae/parallel.py); identical to the single-device value.
      lse, count = parallel.sharded_log_kernel_sum(
        mesh,
        z,
        ctx.bank,
        params["log_var"],
        axis=distributed.DATA_AXIS,
        chunk_size=int(self.cfg.chunk_size) or None,
      )
      return lse - jnp.log(jnp.maximum(count, 1.0))
    lse, count = kernels.log_kernel_sum(
      z,
      ctx.bank,
      params["log_var"],
      bank_mask=ctx.bank_mask,
      bank_ids=ctx.bank_ids if use_loo else None,
      query_ids=ids if use_loo else None,
      chunk_size=int(self.cfg.chunk_size) or None,
    )
    if ctx.log_norm is not None:
      return lse - ctx.log_norm
    # N' = number of components actually in the sum (count 0 -> -inf, not NaN).
    return lse - jnp.log(jnp.maximum(count, 1.0))

  def log_prob_grouped(self, params, z, centers, ctx: ExemplarContext):
    """Certified pruned evaluation when ``eval.prune_keep > 0`` (exact otherwise).

    Only the ``prune_keep`` exemplars nearest to each test point's encoder mean
    are summed; the triangle inequality bounds what the skipped ones could add,
    and that bound is returned as ``err`` (see exvae/kernels/pruned.py).  Only
    the evaluation bank (``ctx.full_bank``) is pruned: a training context's
    mask, ids and normaliser are not what the pruned kernel computes.
    """
    ctx = _exemplar_context(ctx)
    keep = int(self.config.eval.prune_keep)
    bank = ctx.bank
    if keep <= 0 or not ctx.full_bank:
      return super().log_prob_grouped(params, z, centers, ctx)
    keep = min(keep, bank.shape[0])
    fn = lambda zz, c: kernels.pruned_log_kernel_sum(
      zz, c, bank, params["log_var"], keep=keep, tol=float(self.config.eval.prune_tol)
    )
    res = jax.vmap(fn)(z, centers)
    log_norm = jnp.log(jnp.float32(bank.shape[0]))
    return res.lse - log_norm, res.err_bound

  def sample(self, params, key, n, ctx: ExemplarContext):
    """(n, d) codes: a uniformly drawn row of ``ctx.bank`` plus N(0, s2 I) noise."""
    ctx = _exemplar_context(ctx)
    k1, k2 = jax.random.split(key)
    bank = ctx.bank
    i = jax.random.randint(k1, (n,), 0, bank.shape[0])
    return bank[i] + jnp.exp(0.5 * params["log_var"]) * jax.random.normal(k2, (n, bank.shape[1]))

  def describe(self, params):
    return {"prior_log_var": params["log_var"]}
