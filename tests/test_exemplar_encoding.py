"""Exemplar encoding in the exact prior: each distinct exemplar once, and the forward
recomputed (remat) only over the activation budget.

Keeping every chunk's activations was 1.14x faster per exact step on a quiet
2-core CPU (bench/train_speed.py --configs exact --remat_ab); the prior
rematerialises only when the activations of all M rows would exceed
``exemplar.encode_remat_mb``.  Both ways must give the same codes and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from exvae import train_lib
from exvae.models import make_model
from exvae.priors import make_prior
from exvae.priors import exemplar as exemplar_mod
from exvae.priors.exemplar import activation_bytes_per_row, distinct_capacity


def _exact_context(n, m, binarize=False, chunk=64, remat_mb=1024.0):
  """(model, params, pool, ctx_of(params, key)) of an exact-mode prior, M of N = n draws."""
  c = load_config(
    "test",
    **{
      "exemplar.num_exemplars": m,
      "exemplar.encode_chunk": chunk,
      "exemplar.binarize_exemplars": binarize,
      "exemplar.encode_remat_mb": remat_mb,
    },
  )
  model = make_model(c, (8, 8, 1))
  prior = make_prior("exemplar", c)
  mparams = model.init(jax.random.PRNGKey(0))
  pool = jnp.asarray(np.random.default_rng(7).uniform(size=(n, 8, 8, 1)).astype(np.float32))
  setup = train_lib.make_setup(
    c, type("S", (), dict(train_x=np.asarray(pool), binary=True, image_shape=(8, 8, 1)))()
  )
  ids = jnp.arange(5, dtype=jnp.int32)

  def ctx_of(mp, key):
    inputs = setup.context_inputs(
      pool, key, x=pool[ids], ids=ids, mu=model.encode_mean(mp, pool[ids])
    )
    ctx, _ = prior.context({"log_var": jnp.float32(0.0)}, {}, model, mp, inputs, train=True)
    return ctx

  return model, mparams, pool, ctx_of


def _bank_fn(budget_mb):
  _, mparams, _, ctx_of = _exact_context(40, 30, chunk=8, remat_mb=budget_mb)

  def bank_sum(mp, key):
    return jnp.sum(jnp.sin(ctx_of(mp, key).bank))  # a nonlinear read of every code

  return bank_sum, mparams


def _primitives(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in eqn.params.values():
      for s in sub if isinstance(sub, (tuple, list)) else (sub,):
        inner = getattr(s, "jaxpr", s)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner)
  return names


@pytest.mark.parametrize("budget_mb,remat", [(-1, False), (1024, False), (0, True), (1e-3, True)])
def test_remat_only_over_budget(budget_mb, remat):
  """30 rows x a few KB: under 1 GiB, not recomputed; a 1 KB budget or 0: recomputed."""
  fn, mparams = _bank_fn(budget_mb)
  jaxpr = jax.make_jaxpr(jax.grad(fn))(mparams, jax.random.PRNGKey(1)).jaxpr
  # jax.checkpoint's primitive: "remat2" (jax 0.10), "checkpoint" in other versions.
  assert bool({"checkpoint", "remat2", "remat"} & _primitives(jaxpr)) == remat


def test_remat_and_kept_activations_give_the_same_codes_and_gradients():
  key = jax.random.PRNGKey(2)
  f_keep, mparams = _bank_fn(-1)
  f_remat, _ = _bank_fn(0)
  v1, g1 = jax.jit(jax.value_and_grad(f_keep))(mparams, key)
  v2, g2 = jax.jit(jax.value_and_grad(f_remat))(mparams, key)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_activation_bytes_per_row_of_the_paper_mlp_vae():
  """Bounded below by the input and every matmul / gated output kept in float32."""
  c = load_config("test", hidden=(300, 300), latent_dim=40)
  model = make_model(c, (28, 28, 1))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  b = activation_bytes_per_row(model, params, (28, 28, 1))
  floor = 4 * (784 + 2 * (600 + 300) + 40)
  assert floor <= b <= 3 * floor
  # Doubling the hidden widths doubles the hidden part and leaves the input and
  # head rows alone: the weights' own per-call work is not counted.
  wide = make_model(load_config("test", hidden=(600, 600), latent_dim=40), (28, 28, 1))
  bw = activation_bytes_per_row(wide, jax.eval_shape(wide.init, jax.random.PRNGKey(0)), (28, 28, 1))
  hidden_part = bw - b
  assert hidden_part >= 4 * 2 * (600 + 300)
  assert 0 < b - hidden_part <= 3 * 4 * (784 + 40)


def test_distinct_capacity_bounds_the_distinct_draws():
  """The static bound holds for every one of 2000 simulated draws (N=1000, M=900), and
  is well below M where repeats are common."""
  rng = np.random.default_rng(0)
  cap = distinct_capacity(1000, 900)
  counts = [len(np.unique(rng.integers(0, 1000, 900))) for _ in range(2000)]
  assert max(counts) <= cap < 900
  assert cap - np.mean(counts) < 12 * np.std(counts) + 10
  assert distinct_capacity(50000, 25000) < 21000  # the paper's M: >= 16% fewer rows
  assert distinct_capacity(40, 30) == 30  # bound above M: no saving, plain path


@pytest.mark.slow
@pytest.mark.parametrize("binarize", [False, True])
def test_exact_bank_encodes_distinct_rows_once_with_the_same_codes_and_grads(binarize):
  n, m = 1000, 900
  model, mparams, pool, ctx_of = _exact_context(n, m, binarize)
  key = jax.random.PRNGKey(3)
  ctx = jax.jit(ctx_of)(mparams, key)
  cand = np.asarray(ctx.bank_ids)
  assert len(np.unique(cand)) < m  # the draw repeats exemplars
  # Codes: the encoder means of every drawn row (repeats included).
  ref_codes = np.asarray(model.encode_mean(mparams, pool[cand])) if not binarize else None
  if ref_codes is not None:
    np.testing.assert_allclose(np.asarray(ctx.bank), ref_codes, rtol=2e-5, atol=2e-5)
  # Repeated draws have identical codes (same bits for the same exemplar).
  bank = np.asarray(ctx.bank)
  first = {}
  for r, i in enumerate(cand):
    if i in first:
      np.testing.assert_array_equal(bank[r], bank[first[i]])
    first.setdefault(i, r)
  # Gradients through the gather equal those of encoding every row (the plain path).
  orig = exemplar_mod.distinct_capacity
  try:
    exemplar_mod.distinct_capacity = lambda n_, m_, sigmas=10.0: m_  # disable the saving
    f_plain = lambda mp: jnp.sum(jnp.sin(ctx_of(mp, key).bank))
    v0, g0 = jax.value_and_grad(f_plain)(mparams)
  finally:
    exemplar_mod.distinct_capacity = orig
  f_dist = lambda mp: jnp.sum(jnp.sin(ctx_of(mp, key).bank))
  v1, g1 = jax.value_and_grad(f_dist)(mparams)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_exact_bank_encodes_only_capacity_rows_and_stays_consistent_past_it():
  n, m = 1000, 900
  model, mparams, pool, ctx_of = _exact_context(n, m, chunk=1000)
  key = jax.random.PRNGKey(4)
  cap = distinct_capacity(n, m)
  # The encoder's matmuls run over cap rows (one chunk of cap), never over m.
  text = str(jax.make_jaxpr(ctx_of)(mparams, key))
  assert f"[{cap}," in text and f"[{m},64]" not in text and cap < m
  # A capacity below the draw's distinct count: excess draws become repeats of drawn
  # exemplars, and bank_ids say which, so codes and the leave-one-out mask agree.
  orig = exemplar_mod.distinct_capacity
  try:
    exemplar_mod.distinct_capacity = lambda n_, m_, sigmas=10.0: 10
    ctx = ctx_of(mparams, key)
  finally:
    exemplar_mod.distinct_capacity = orig
  ids = np.asarray(ctx.bank_ids)
  assert ids.shape == (m,) and len(np.unique(ids)) <= 10
  drawn = np.asarray(ctx_of(mparams, key).bank_ids)
  assert set(ids.tolist()) <= set(drawn.tolist())
  np.testing.assert_allclose(
    np.asarray(ctx.bank), np.asarray(model.encode_mean(mparams, pool[ids])), rtol=2e-5, atol=2e-5
  )


def _encode_rows_gathered_first(model, mp, pool, ids, key, binary, chunk, remat):
  """The earlier encode_rows: every row gathered (and binarised) up front, the loop over images."""
  m = ids.shape[0]
  n_chunks = -(-m // chunk)
  padded = jnp.pad(ids, (0, n_chunks * chunk - m))
  x = pool[padded]
  if binary:
    from exvae import rng

    x = rng.bernoulli_rows(key, x, padded, dtype=jnp.uint8)
  one = lambda xc: model.encode_mean(mp, xc.astype(jnp.float32))
  if remat:
    one = jax.checkpoint(one)
  codes = jax.lax.map(one, x.reshape((n_chunks, chunk) + x.shape[1:]))
  return codes.reshape(n_chunks * chunk, -1)[:m]


def test_balanced_chunk_keeps_the_chunk_count_and_spreads_the_rows():
  # The exact prior's 20207 distinct-capacity rows: 21 chunks of 968, not 21 of 1000.
  assert exemplar_mod.balanced_chunk(20207, 1000) == 968
  for m, chunk, align in [
    (20207, 1000, 8),
    (100, 48, 8),
    (1000, 1000, 8),
    (1000, 125, 8),
    (60, 20, 1),
    (7, 8, 8),
    (30, 8, 4),
    (23, 5, 1),
    (20207, 1000, 24),
  ]:
    c = exemplar_mod.balanced_chunk(m, chunk, align)
    n = -(-m // min(chunk, m))
    if n == 1:
      assert c == m
      continue
    assert (c % align == 0 or c * n == m) and c < -(-m // n) + align
    assert -(-m // c) <= n and (-(-m // c)) * c - m < n * align  # padding < align per chunk
  assert exemplar_mod.balanced_chunk(1000, 125) == 125  # RAT: unchanged


@pytest.mark.parametrize(
  "binary,remat,m,chunk,unroll",
  [
    (False, False, 30, 8, True),
    (True, True, 30, 8, True),
    (True, False, 24, 8, False),
    (False, None, 7, 8, True),
    (False, False, 30, 8, False),
    (True, False, 40, 24, True),
  ],
)
def test_encode_rows_gathering_per_chunk_matches_gathering_first(binary, remat, m, chunk, unroll):
  """Codes and parameter gradients identical to the gather-everything-first ``lax.map`` loop,
  unrolled or not."""
  model, mparams, pool, _ = _exact_context(40, m)
  ids = jax.random.randint(jax.random.PRNGKey(3), (m,), 0, 40, dtype=jnp.int32)
  key = jax.random.PRNGKey(4)
  eff_remat = (m > chunk) if remat is None else remat

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda mp: jnp.sum(jnp.sin(fn(mp)))))(mparams)

  new = loss(
    lambda mp: exemplar_mod.encode_rows(
      model, mp, pool, ids, key, binary, chunk, remat=remat, unroll=unroll
    )
  )
  if m <= chunk:
    ref = loss(lambda mp: model.encode_mean(mp, pool[ids]))
  else:
    ref = loss(
      lambda mp: _encode_rows_gathered_first(model, mp, pool, ids, key, binary, chunk, eff_remat)
    )
  np.testing.assert_allclose(new[0], ref[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7 * float(jnp.max(jnp.abs(b))))
  codes = exemplar_mod.encode_rows(
    model, mparams, pool, ids, key, binary, chunk, remat=remat, unroll=unroll
  )
  assert codes.shape == (m, 4)
  # The loop carries ids, not images: no (M, H, W, C) float array in the traced step.
  jaxpr = jax.make_jaxpr(
    lambda mp: exemplar_mod.encode_rows(
      model, mp, pool, ids, key, binary, chunk, remat=remat, unroll=unroll
    )
  )(mparams)
  big = [
    v.aval.shape
    for e in jaxpr.jaxpr.eqns
    for v in e.outvars
    if tuple(getattr(v.aval, "shape", ()))[-3:] == (8, 8, 1)
    and int(np.prod(v.aval.shape[:-3])) > chunk
  ]
  assert m <= chunk or not big, big
