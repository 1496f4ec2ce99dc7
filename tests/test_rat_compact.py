"""RAT union encoding: only the chunks holding the distinct exemplars (``exemplar.rat_compact``).

The compact path moves the distinct retrieved exemplars to the front of the
static B*k union and skips the chunks past them; the step's loss and
gradients must match encoding every union row (the masked duplicates carry
no weight), up to the summation order of the gradient reductions.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from exvae import rng, train_lib
from exvae.models import make_model
from exvae.objectives import elbo_loss, kl_beta
from exvae.priors import exemplar as exemplar_mod

CHUNK = 20  # the test union has B*k = 20*3 = 60 rows (33-46 distinct): 3 chunks


def _rat_config(mode: str, compact: bool):
  return load_config(
    "test",
    **{
      "exemplar.rat": True,
      "exemplar.rat_mode": mode,
      "exemplar.loo": True,
      "exemplar.rat_compact": compact,
      "exemplar.rat_compact_chunk": CHUNK,
    },
  )


def _rat_run(mode: str):
  """``(setup of all rows, setup of the compact path, state, pool, perm)`` at step 0.

  The cache is filled by one eager encoder call over the pool (grey levels, as
  the refresh does for these configs), so no refresh step needs compiling.
  """
  setups, splits = [], None
  for compact in (False, True):
    c = _rat_config(mode, compact)
    splits = splits or train_lib.load_data(c)
    setups.append(train_lib.make_setup(c, splits))
  n = splits.train_x.shape[0]
  state = train_lib.init_state(_rat_config(mode, False), setups[0], n)
  pool = jnp.asarray(splits.train_x)
  cache = setups[0].model.encode_mean(state.params["model"], pool)
  state = state.replace(prior_state={"cache": cache})
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  return setups[0], setups[1], state, pool, perm


def _union_of(setup, state, pool, perm):
  """The step's RAT context (bank, bank_ids, bank_mask) and its new cache."""
  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  k_ctx, k_z = jax.random.split(key)
  params = state.params
  sc = setup.model.score(params["model"], x, k_z, 1, setup.log_lik)
  inputs = setup.context_inputs(pool, k_ctx, x=x, ids=ids, mu=sc.mu)
  return setup.prior.context(
    params["prior"], state.prior_state, setup.model, params["model"], inputs, train=True
  )


def test_compact_keys_are_the_sorted_distinct_valid_keys_then_invalid():
  r = np.random.default_rng(0)
  keys = r.integers(0, 12, size=50).astype(np.int32)
  keys[r.uniform(size=50) < 0.3] = 12  # empty slots
  k0, m0 = exemplar_mod._first_of_each(jnp.asarray(keys), 12)
  k1, m1 = exemplar_mod._first_of_each(jnp.asarray(keys), 12, compact=True)
  want = np.unique(keys[keys < 12])
  count = len(want)
  np.testing.assert_array_equal(np.asarray(k1)[:count], want)
  assert np.all(np.asarray(k1)[count:] == 12)
  np.testing.assert_array_equal(np.asarray(m1), np.arange(50) < count)  # a prefix
  # The uncompacted form marks the same keys, in place.
  np.testing.assert_array_equal(np.asarray(k0)[np.asarray(m0)], want)


def test_encode_rows_prefix_encodes_the_prefix_and_zeros_the_skipped_chunks():
  """Binarised exemplars (grey levels: the step tests below)."""
  c = load_config("test")
  model = make_model(c, (8, 8, 1))
  mp = model.init(jax.random.PRNGKey(0))
  pool = jnp.asarray(np.random.default_rng(1).uniform(size=(40, 8, 8, 1)).astype(np.float32))
  ids = jax.random.randint(jax.random.PRNGKey(2), (30,), 0, 40, dtype=jnp.int32)
  key = jax.random.PRNGKey(3)
  count = 13  # chunks [0, 5), [5, 10), [10, 15)
  fn = jax.jit(
    lambda mp, ids, n: exemplar_mod.encode_rows_prefix(model, mp, pool, ids, n, key, True, chunk=5)
  )
  codes = np.asarray(fn(mp, ids, jnp.int32(count)))
  x = rng.bernoulli_rows(key, pool[ids], ids)
  want = np.asarray(model.encode_mean(mp, x))
  np.testing.assert_allclose(codes[:15], want[:15], rtol=1e-5, atol=1e-6)
  assert np.all(codes[15:] == 0) and np.all(np.abs(codes[:15]).max(1) > 0)
  # Bits depend on (key, id) only: encoding the rows in another order permutes the codes.
  perm = np.random.default_rng(4).permutation(30)
  again = np.asarray(fn(mp, ids[perm], jnp.int32(30)))
  np.testing.assert_allclose(again, want[perm], rtol=1e-5, atol=1e-6)
  # Gradients of a read of the prefix equal those of encoding the prefix rows directly.
  loss = lambda f: jax.value_and_grad(lambda p: jnp.sum(jnp.sin(f(p)[:count])))(mp)
  v1, g1 = loss(lambda p: fn(p, ids, jnp.int32(count)))
  v0, g0 = loss(lambda p: model.encode_mean(p, x))
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def _loss_grads_and_union(state, pool, perm, setup):
  """The step's loss and gradients (what train_step computes) and its RAT context."""
  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  beta = kl_beta(state.step, setup.steps_per_epoch, setup.warmup_epochs)
  (loss, _), grads = jax.value_and_grad(elbo_loss, has_aux=True)(
    state.params, state.prior_state, setup, x, ids, key, beta, pool
  )
  return loss, grads, _union_of(setup, state, pool, perm)


@pytest.mark.parametrize("mode", [pytest.param("reference", marks=pytest.mark.slow), "bound"])
def test_compact_step_has_the_loss_and_gradients_of_encoding_every_union_row(mode):
  """Loss, gradients, components and cache as encoding all rows, at steps whose unions
  need 2 and 3 chunks; the compact step traces once whatever the count."""
  chex.clear_trace_counter()
  setup0, setup1, state, pool, perm = _rat_run(mode)
  c = _rat_config(mode, True)
  static = c.batch_size * c.exemplar.rat_k
  f0 = jax.jit(lambda s: _loss_grads_and_union(s, pool, perm, setup0))
  f1 = jax.jit(chex.assert_max_traces(lambda s: _loss_grads_and_union(s, pool, perm, setup1), n=1))
  chunks = []
  for step in (0, 5):  # two batches, two candidate draws
    s = state.replace(step=jnp.asarray(step, state.step.dtype))
    (l0, g0, (c0, st0)), (l1, g1, (c1, st1)) = f0(s), f1(s)
    mask0, mask1 = np.asarray(c0.bank_mask), np.asarray(c1.bank_mask)
    count = int(mask1.sum())
    assert count == int(mask0.sum())
    # Same components (ids and codes), the distinct ones first; same cache written.
    ids0 = np.asarray(c0.bank_ids)[mask0]
    np.testing.assert_array_equal(np.asarray(c1.bank_ids)[:count], ids0)
    np.testing.assert_allclose(
      np.asarray(c1.bank)[:count], np.asarray(c0.bank)[mask0], rtol=1e-5, atol=1e-6
    )
    chunks.append(-(-count // CHUNK))
    assert np.all(np.asarray(c1.bank)[chunks[-1] * CHUNK :] == 0)  # the skipped chunks
    np.testing.assert_allclose(
      np.asarray(st1["cache"]), np.asarray(st0["cache"]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    # Summation order differs (per-chunk gradient sums): within 5e-6 of the gradient's norm,
    # and per tensor within 1e-5 of its largest entry (a small bias gradient is a sum
    # that cancels).  The float32 floor: two encodings of every row that differ only in
    # exemplar.encode_chunk (1000 vs 7) differ by 1.4-1.6e-6 of the norm on a 2-core
    # AMD EPYC with AVX-512, and the compact step by as much; a missed or misplaced row
    # moves the gradient by percents.
    d2 = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    n2 = sum(float(jnp.sum(a * a)) for a in jax.tree.leaves(g0))
    assert d2**0.5 <= 5e-6 * n2**0.5, (d2, n2)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a))), (a, b)
  assert min(chunks) < static // CHUNK and len(set(chunks)) > 1, chunks
