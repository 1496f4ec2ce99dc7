"""Priors against NumPy/SciPy references; interface and error behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats
from scipy.special import logsumexp

from conftest import load_config
from exvae.models import make_model
from exvae.priors import ContextInputs, ExemplarContext, VampContext, make_prior, registered_priors
from exvae.priors.vampprior import mixture_diag_log_prob


def ref_exemplar_log_prob(z, bank, log_var, loo_ids=None, bank_ids=None, bank_mask=None):
  """Direct SciPy reference: log (1/N') sum_n N(z; mu_n, s2 I)."""
  s2 = np.exp(log_var)
  out = []
  for b in range(z.shape[0]):
    comps = []
    for n in range(bank.shape[0]):
      if bank_mask is not None and not bank_mask[n]:
        continue
      if loo_ids is not None and bank_ids[n] == loo_ids[b]:
        continue
      comps.append(stats.multivariate_normal.logpdf(z[b], bank[n], s2 * np.eye(z.shape[1])))
    out.append(logsumexp(comps) - np.log(len(comps)) if comps else -np.inf)
  return np.array(out)


def _exemplar(**kw):
  c = load_config("test", **{f"exemplar.{k}": v for k, v in kw.items()})
  return make_prior("exemplar", c)


@pytest.mark.parametrize("loo", [False, True])
def test_exemplar_log_prob_matches_scipy(loo):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(7, 3)).astype(np.float32)
  bank = rng.normal(size=(50, 3)).astype(np.float32)
  ids = np.arange(50, dtype=np.int32)
  qids = np.array([0, 3, 3, 49, -1, 10, 20], np.int32)
  prior = _exemplar(loo=loo, chunk_size=16)
  params = {"log_var": jnp.float32(-0.7)}
  got = prior.log_prob(params, z, ExemplarContext(bank=bank, bank_ids=ids), jnp.asarray(qids))
  want = ref_exemplar_log_prob(z, bank, -0.7, qids if loo else None, ids)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_exemplar_masked_rows_and_huge_distances():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(4, 2)).astype(np.float32)
  z[0] = 1e4  # huge distance to every exemplar
  bank = rng.normal(size=(9, 2)).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
  prior = _exemplar(loo=False)
  params = {"log_var": jnp.float32(0.3)}
  ctx = ExemplarContext(bank=bank, bank_mask=mask)
  got = np.asarray(prior.log_prob(params, z, ctx))
  want = ref_exemplar_log_prob(z.astype(np.float64), bank, 0.3, bank_mask=mask)
  assert np.all(np.isfinite(got)), got
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_exemplar_all_masked_row_is_minus_inf_not_nan():
  prior = _exemplar(loo=True)
  bank = np.zeros((1, 2), np.float32)
  z = np.ones((2, 2), np.float32)
  params = {"log_var": jnp.float32(0.0)}
  ctx = ExemplarContext(bank=bank, bank_ids=np.array([5], np.int32))
  f = lambda p, z: prior.log_prob(p, z, ctx, jnp.array([5, 6], jnp.int32))
  out = np.asarray(f(params, z))
  assert out[0] == -np.inf and np.isfinite(out[1])
  g = jax.grad(lambda p, z: f(p, z)[1])(params, z)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_exemplar_gradients():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(3, 2)))
  bank = jnp.asarray(rng.normal(size=(6, 2)))
  prior = _exemplar(loo=False, chunk_size=4)

  def f(z, bank, lv):
    return prior.log_prob({"log_var": lv}, z, ExemplarContext(bank=bank)).sum()

  with jax.enable_x64(True):
    check_grads(
      f,
      (z.astype(jnp.float64), bank.astype(jnp.float64), jnp.float64(-0.2)),
      order=1,
      modes=["rev"],
      atol=1e-3,
      rtol=1e-3,
    )


def test_gaussian_and_vampprior_match_scipy():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(5, 3))
  c = load_config("test", latent_dim=3)
  g = make_prior("gaussian", c)
  np.testing.assert_allclose(
    np.asarray(g.log_prob({}, jnp.asarray(z, jnp.float32), None)),
    stats.multivariate_normal.logpdf(z, np.zeros(3), np.eye(3)),
    rtol=1e-5,
  )
  mu, logvar = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) * 0.3
  got = mixture_diag_log_prob(
    jnp.asarray(z, jnp.float32), jnp.asarray(mu, jnp.float32), jnp.asarray(logvar, jnp.float32)
  )
  want = [
    logsumexp(
      [stats.multivariate_normal.logpdf(zz, mu[k], np.diag(np.exp(logvar[k]))) for k in range(4)]
    )
    - np.log(4)
    for zz in z
  ]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_registry_and_errors():
  assert {"gaussian", "vampprior", "exemplar"} <= set(registered_priors())
  with pytest.raises(ValueError, match="Unknown prior"):
    make_prior("nope", load_config("test"))
  c = load_config("test")
  model = make_model(c, (8, 8, 1))
  prior = make_prior("exemplar", c)
  with pytest.raises(ValueError, match="at least 2 exemplars"):
    prior.init(jax.random.PRNGKey(0), model, num_train=1)
  prior1 = make_prior("exemplar", load_config("test", **{"exemplar.num_exemplars": 1}))
  with pytest.raises(ValueError, match="leave-one-out"):
    prior1.init(jax.random.PRNGKey(0), model, num_train=100)


def test_rat_context_retrieval_union_and_cache():
  """RAT, 'bound' mode: neighbours equal brute force; union counts each exemplar once."""
  c = load_config(
    "test",
    **{
      "exemplar.rat": True,
      "exemplar.rat_k": 3,
      "exemplar.num_exemplars": 40,
      "exemplar.rat_mode": "bound",
    },
  )
  model = make_model(c, (8, 8, 1))
  prior = make_prior("exemplar", c)
  n, b = 60, 5
  rng = np.random.default_rng(4)
  pool = jnp.asarray(rng.uniform(size=(n, 8, 8, 1)).astype(np.float32))
  mparams = model.init(jax.random.PRNGKey(0))
  cache = jnp.asarray(rng.normal(size=(n, c.latent_dim)).astype(np.float32))
  ids = jnp.array([0, 7, 7 + 1, 30, 59], jnp.int32)
  mu = jnp.asarray(rng.normal(size=(b, c.latent_dim)).astype(np.float32))
  key = jax.random.PRNGKey(9)
  inputs = ContextInputs(x=pool[ids], ids=ids, mu=mu, key=key, pool=pool, binary=False)
  ctx, st = prior.context(
    {"log_var": jnp.float32(0.0)}, {"cache": cache}, model, mparams, inputs, train=True
  )
  # Recompute the candidates exactly as the prior does.
  k_idx, _ = jax.random.split(key)
  cand = np.asarray(jax.random.randint(k_idx, (40,), 0, n, dtype=jnp.int32))
  cache_np = np.asarray(cache).copy()
  cache_np[np.asarray(ids)] = np.asarray(mu)
  want = set()
  for r in range(b):
    d = ((cache_np[cand] - np.asarray(mu)[r]) ** 2).sum(1)
    d[cand == int(ids[r])] = np.inf  # leave-one-out in retrieval
    want |= set(cand[np.argsort(d, kind="stable")[:3]].tolist())
  got_ids = np.asarray(ctx.bank_ids)[np.asarray(ctx.bank_mask)]
  assert sorted(got_ids.tolist()) == sorted(want)  # each exemplar exactly once
  assert ctx.bank.shape == (b * 3, c.latent_dim)  # static B*k shape
  # Re-encoded neighbours are written back to the cache; batch means too.
  new_cache = np.asarray(st["cache"])
  np.testing.assert_allclose(
    new_cache[got_ids], np.asarray(ctx.bank)[np.asarray(ctx.bank_mask)], rtol=1e-6
  )
  untouched = np.setdiff1d(np.arange(n), np.concatenate([got_ids, np.asarray(ids)]))
  np.testing.assert_array_equal(new_cache[untouched], np.asarray(cache)[untouched])
  # The RAT density is a lower bound on the full-bank density (weights 1/(N-1)).
  z = mu + 0.1
  full = ref_exemplar_log_prob(
    np.asarray(z, np.float64), new_cache, 0.0, np.asarray(ids), np.arange(n)
  )
  rat = np.asarray(prior.log_prob({"log_var": jnp.float32(0.0)}, z, ctx, ids))
  assert np.all(rat <= full + 1e-4)


def _exemplar_contexts(n=30, **kw):
  """``(prior, params, ids, train_ctx, eval_ctx)`` of the exemplar prior on a random pool."""
  c = load_config("test", **{f"exemplar.{k}": v for k, v in kw.items()})
  model = make_model(c, (8, 8, 1))
  prior = make_prior("exemplar", c)
  rng = np.random.default_rng(5)
  pool = jnp.asarray(rng.uniform(size=(n, 8, 8, 1)).astype(np.float32))
  mparams = model.init(jax.random.PRNGKey(0))
  params = {"log_var": jnp.float32(-0.5)}
  ids = jnp.array([0, 3, 11, n - 1], jnp.int32)
  key = jax.random.PRNGKey(6)
  pool_inputs = ContextInputs(key=key, pool=pool, binary=False)
  state = prior.refresh(params, prior.init_state(model, n), model, mparams, pool_inputs)
  inputs = ContextInputs(
    x=pool[ids], ids=ids, mu=model.encode_mean(mparams, pool[ids]), key=key, pool=pool, binary=False
  )
  train_ctx, _ = prior.context(params, state, model, mparams, inputs, train=True)
  eval_ctx, _ = prior.context(params, {}, model, mparams, pool_inputs, train=False)
  return prior, params, ids, train_ctx, eval_ctx


# Which behaviours each context the prior builds selects: (bank_ids, bank_mask, log_norm) set?
CONTEXT_KINDS = {
  "exact": ({}, (True, False, False)),
  "exact_whole_set": ({"num_exemplars": 0}, (True, False, False)),
  "rat_reference": ({"rat": True, "rat_k": 3, "num_exemplars": 20}, (True, True, False)),
  "rat_bound": (
    {"rat": True, "rat_k": 3, "num_exemplars": 20, "rat_mode": "bound"},
    (True, True, True),
  ),
}


@pytest.mark.parametrize("kind", sorted(CONTEXT_KINDS))
def test_exemplar_contexts_say_which_behaviours_apply(kind):
  """Each training context carries ids (leave-one-out), a mask and a fixed normaliser
  exactly where its mode needs them; the evaluation context is the bare full bank."""
  overrides, want = CONTEXT_KINDS[kind]
  _, _, _, train_ctx, eval_ctx = _exemplar_contexts(**overrides)
  assert isinstance(train_ctx, ExemplarContext) and isinstance(eval_ctx, ExemplarContext)
  got = tuple(getattr(train_ctx, f) is not None for f in ("bank_ids", "bank_mask", "log_norm"))
  assert got == want and not train_ctx.full_bank
  assert eval_ctx.full_bank and eval_ctx.bank.shape[0] == 30
  assert (eval_ctx.bank_ids, eval_ctx.bank_mask, eval_ctx.log_norm) == (None, None, None)


def test_exemplar_leave_one_out_only_where_the_context_has_bank_ids():
  """Leave-one-out masks a query's own exemplar through ``bank_ids`` and nothing else: a
  context without them (the evaluation bank) scores every row, whatever ``ids`` says."""
  prior, params, ids, train_ctx, eval_ctx = _exemplar_contexts(loo=True, num_exemplars=0)
  z = jnp.asarray(np.random.default_rng(7).normal(size=(4, train_ctx.bank.shape[1])), jnp.float32)
  bank = np.asarray(train_ctx.bank, np.float64)
  lv = float(params["log_var"])
  loo = np.asarray(prior.log_prob(params, z, train_ctx, ids))
  want_loo = ref_exemplar_log_prob(
    np.asarray(z, np.float64), bank, lv, np.asarray(ids), np.asarray(train_ctx.bank_ids)
  )
  np.testing.assert_allclose(loo, want_loo, rtol=1e-5, atol=1e-4)
  # Every query's own exemplar is in the whole-set bank, so leave-one-out changes each value.
  full = ref_exemplar_log_prob(np.asarray(z, np.float64), bank, lv)
  assert np.all(np.abs(want_loo - full) > 1e-6)
  no_ids = dataclasses.replace(train_ctx, bank_ids=None)
  np.testing.assert_allclose(
    np.asarray(prior.log_prob(params, z, no_ids, ids)), full, rtol=1e-5, atol=1e-4
  )
  # The evaluation bank holds the same rows (row r is training image r) and no ids.
  np.testing.assert_allclose(np.asarray(eval_ctx.bank), bank, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(prior.log_prob(params, z, eval_ctx, ids)),
    np.asarray(prior.log_prob(params, z, eval_ctx)),
  )
  np.testing.assert_allclose(
    np.asarray(prior.log_prob(params, z, eval_ctx)), full, rtol=1e-5, atol=1e-4
  )


def test_exemplar_context_is_typed():
  """A misspelt field, an untyped dict or an evaluation bank with ids are errors, not
  keys silently never read."""
  prior, params, ids, train_ctx, eval_ctx = _exemplar_contexts()
  bank = train_ctx.bank
  with pytest.raises(TypeError):
    ExemplarContext(bank=bank, bank_id=train_ctx.bank_ids)
  with pytest.raises(TypeError, match="ExemplarContext"):
    prior.log_prob(params, bank[:2], {"bank": bank, "bank_ids": train_ctx.bank_ids}, ids[:2])
  with pytest.raises(ValueError, match="full_bank"):
    ExemplarContext(bank=bank, bank_ids=train_ctx.bank_ids, full_bank=True)


def test_contexts_are_pytrees_that_jit_without_retracing():
  """Contexts go through jit (the evaluation context is returned and passed back) as
  pytrees: new arrays of the same shapes reuse the trace; the leaves keep the order
  of the dicts they replaced."""
  prior, params, ids, train_ctx, eval_ctx = _exemplar_contexts()
  traces = []

  @jax.jit
  def score(ctx, z):
    traces.append(1)
    return prior.log_prob(params, z, ctx)

  z = eval_ctx.bank[:3] + 0.1
  score(eval_ctx, z)
  score(jax.tree.map(lambda a: a + 1.0, eval_ctx), z)
  assert len(traces) == 1
  assert jax.jit(lambda c: c)(eval_ctx).full_bank
  assert [a.shape for a in jax.tree.leaves(train_ctx)] == [
    train_ctx.bank.shape,
    train_ctx.bank_ids.shape,
  ]
  vctx = VampContext(logvar=jnp.zeros((2, 3)), mu=jnp.ones((2, 3)))
  assert [float(a[0, 0]) for a in jax.tree.leaves(vctx)] == [0.0, 1.0]  # sorted keys: logvar, mu


@pytest.mark.slow
def test_vampprior_pseudo_inputs_start_as_the_reference_and_half_stay_frozen():
  from exvae.optim import make_optimizer
  from exvae.errors import ConfigError

  c = load_config("test", **{"vampprior.num_pseudo": 50})
  assert c.vampprior.init == "he"
  model = make_model(c, (28, 28, 1))
  prior = make_prior("vampprior", c)
  u = np.asarray(prior.init(jax.random.PRNGKey(0), model, 100)["pseudo_inputs"])
  assert u.shape == (50, 28, 28, 1)
  # The reference's He initialiser on Linear(K, 784): N(0, 2 / K).
  assert stats.kstest(u.ravel(), stats.norm(0.0, np.sqrt(2.0 / 50)).cdf).pvalue > 1e-3
  frozen = u < 0
  assert 0.45 < frozen.mean() < 0.55

  # One AdamNormGrad step on the prior term: entries below 0 get no gradient through the
  # hardtanh and no update (as in the reference); the others move.
  mparams = model.init(jax.random.PRNGKey(1))
  z = jax.random.normal(jax.random.PRNGKey(2), (8, c.latent_dim))

  def loss(pp):
    ctx, _ = prior.context(pp, None, model, mparams, None, True)
    return -prior.log_prob(pp, z, ctx).mean()

  pp = {"pseudo_inputs": jnp.asarray(u)}
  opt = make_optimizer(c)
  updates, _ = opt.update(jax.grad(loss)(pp), opt.init(pp), pp)
  step = np.asarray(updates["pseudo_inputs"])
  assert np.all(step[frozen] == 0.0)
  assert np.mean(step[~frozen] != 0.0) > 0.9

  c2 = load_config("test", **{"vampprior.init": "normal", "vampprior.num_pseudo": 50})
  u2 = np.asarray(
    make_prior("vampprior", c2).init(jax.random.PRNGKey(0), model, 100)["pseudo_inputs"]
  )
  np.testing.assert_allclose([u2.mean(), u2.std()], [0.05, 0.01], rtol=0.02)
  c3 = load_config("test", **{"vampprior.init": "xavier"})
  with pytest.raises(ConfigError, match="vampprior.init must be"):
    make_prior("vampprior", c3).init(jax.random.PRNGKey(0), model, 100)
