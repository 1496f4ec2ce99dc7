"""exvae does what the authors' code (sajadn/Exemplar-VAE) does, difference by difference.

Each test transcribes one piece of the reference's behaviour into NumPy and
checks exvae against it: the optimiser (per-tensor gradient normalisation on
the separate h and g tensors of a gated layer, PyTorch-ordered Adam), PyTorch's
default bias initialisation, the clamped Bernoulli, grey-level exemplars,
the RAT neighbourhood and its normalisation, and the early-stopping count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import load_config
from exvae import evaluation, train_lib
from exvae.likelihoods import bernoulli_log_prob
from exvae.models import make_model
from exvae.nets.gated import GatedDense
from exvae.nets.init import torch_biases
from exvae.optim import make_optimizer
from exvae.priors import ContextInputs, make_prior


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_gated_dense_has_separate_h_and_g_tensors_and_computes_h_times_sigmoid_g():
  layer = GatedDense(5)
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  p = layer.init(jax.random.PRNGKey(0), x)["params"]
  assert set(p) == {"h", "g"}
  assert p["h"]["kernel"].shape == p["g"]["kernel"].shape == (4, 5)
  p = torch_biases(p, jax.random.PRNGKey(1))
  got = np.asarray(layer.apply({"params": p}, x))
  h = x @ np.asarray(p["h"]["kernel"]) + np.asarray(p["h"]["bias"])
  g = x @ np.asarray(p["g"]["kernel"]) + np.asarray(p["g"]["bias"])
  np.testing.assert_allclose(got, h * _sigmoid(g), rtol=1e-5, atol=1e-6)


def _reference_adamnormgrad(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
  """utils/optimizer.py of the reference, per tensor, in float64."""
  p = {k: v.astype(np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    for k in p:
      g = grads[k].astype(np.float64)
      g = g / (np.linalg.norm(g.ravel()) + 1e-7)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
      p[k] = p[k] - step * m[k] / (np.sqrt(v[k]) + eps)
  return p


def test_adamnormgrad_equals_the_reference_per_tensor_on_a_vae():
  """The whole VAE parameter tree: every reference tensor normalised on its own."""
  c = load_config("test")
  model = make_model(c, (8, 8, 1))
  params = model.init(jax.random.PRNGKey(0))
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(k) for k, _ in flat]
  # The gated layers hold h and g as separate leaves (the reference's tensors).
  assert any(n.endswith("['h']['kernel']") for n in names)
  assert any(n.endswith("['g']['bias']") for n in names)
  rng = np.random.default_rng(1)
  grads_seq = []
  for _ in range(4):
    # Leaves of very different scales (and one tiny one, where eps placement shows).
    grads_seq.append(
      [rng.normal(size=x.shape).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _, x in flat]
    )
  grads_seq[0][0] = np.full_like(grads_seq[0][0], 1e-12)
  opt = make_optimizer(c)
  state = opt.init(params)
  p = params
  for gl in grads_seq:
    g = jax.tree_util.tree_unflatten(tree, [jnp.asarray(a) for a in gl])
    upd, state = opt.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, upd)
  want = _reference_adamnormgrad(
    {n: np.asarray(x) for n, (_, x) in zip(names, flat)},
    [dict(zip(names, gl)) for gl in grads_seq],
    c.learning_rate,
  )
  got = dict(zip(names, [np.asarray(x) for x in jax.tree.leaves(p)]))
  for n in names:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_joint_normalisation_of_h_and_g_would_differ():
  """The per-tensor test above can fail: normalising h and g jointly gives other updates."""
  rng = np.random.default_rng(2)
  gh, gg = rng.normal(size=(4, 3)), 100 * rng.normal(size=(4, 3))
  joint = np.concatenate([gh, gg], 1) / np.linalg.norm(np.concatenate([gh, gg], 1))
  per = np.concatenate([gh / np.linalg.norm(gh), gg / np.linalg.norm(gg)], 1)
  assert np.abs(joint - per).max() > 0.1


@pytest.mark.slow
def test_biases_follow_pytorch_default_uniform_fan_in():
  c = load_config("test", model="convhvae")
  params = make_model(c, (8, 8, 1)).init(jax.random.PRNGKey(0))
  seen = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jax.tree_util.keystr(path).endswith("['bias']"):
      parent = params
      for k in path[:-1]:
        parent = parent[k.key]
      fan_in = int(np.prod(parent["kernel"].shape[:-1]))
      b = np.asarray(leaf)
      bound = 1 / np.sqrt(fan_in)
      assert np.all(np.abs(b) <= bound + 1e-7), jax.tree_util.keystr(path)
      if b.size >= 32:  # not the zeros of flax's default; spread like U(-bound, bound)
        assert 0.4 * bound < b.std() < 0.8 * bound, (jax.tree_util.keystr(path), b.std(), bound)
      seen += 1
  assert seen > 10


def test_bernoulli_clamps_probabilities_like_the_reference():
  rng = np.random.default_rng(3)
  x = (rng.uniform(size=(4, 50)) < 0.5).astype(np.float32)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 20  # many beyond +-11.5
  p = np.clip(_sigmoid(logits.astype(np.float64)), 1e-5, 1 - 1e-5)
  want = (x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)
  got = np.asarray(bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  unclamped = np.asarray(bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits), eps=0.0))
  assert np.abs(unclamped - want).max() > 1.0


def _exemplar_setup(**kw):
  c = load_config("test", **{f"exemplar.{k}": v for k, v in kw.items()})
  model = make_model(c, (8, 8, 1))
  return c, model, make_prior("exemplar", c), model.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("binarize", [False, True])
def test_exemplars_are_encoded_from_grey_levels_by_default(binarize):
  """Exact mode: the M exemplar codes are the encoder means of the GREY images."""
  c, model, prior, mparams = _exemplar_setup(num_exemplars=30, binarize_exemplars=binarize)
  n = 40
  pool = jnp.asarray(np.random.default_rng(4).uniform(size=(n, 8, 8, 1)).astype(np.float32))
  setup = train_lib.make_setup(
    c, type("S", (), dict(train_x=np.asarray(pool), binary=True, image_shape=(8, 8, 1)))()
  )
  assert setup.binary and setup.binary_exemplars == binarize
  ids = jnp.arange(5, dtype=jnp.int32)
  key = jax.random.PRNGKey(5)
  inputs = setup.context_inputs(
    pool, key, x=pool[ids], ids=ids, mu=model.encode_mean(mparams, pool[ids])
  )
  ctx, _ = prior.context({"log_var": jnp.float32(0.0)}, {}, model, mparams, inputs, train=True)
  grey = np.asarray(model.encode_mean(mparams, pool[np.asarray(ctx.bank_ids)]))
  same = np.allclose(np.asarray(ctx.bank), grey, rtol=1e-5, atol=1e-5)
  assert same != binarize
  # The evaluation bank too (all N exemplars, no gradients).
  ectx = evaluation.eval_context(
    {"model": mparams, "prior": {"log_var": jnp.float32(0.0)}}, pool, key, setup=setup
  )
  full = np.asarray(model.encode_mean(mparams, pool))
  assert np.allclose(np.asarray(ectx.bank), full, rtol=1e-5, atol=1e-5) != binarize


def _reference_rat_log_p_z(mu, z, ids, cache, cand, k, log_var, encode):
  """get_approximate_nearest_exemplars + log_p_z_exemplar of the reference, in NumPy."""
  cache = cache.astype(np.float64).copy()
  cache[ids] = mu
  sub = cache[cand]
  d = ((mu[:, None, :] - sub[None]) ** 2).sum(-1)
  nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # self NOT excluded
  pos = np.unique(nearest.ravel())  # unique candidate positions
  ex_ids = cand[pos]
  centers = encode(ex_ids)
  s2 = np.exp(log_var)
  dz = z.shape[1]
  out = []
  for b in range(z.shape[0]):
    logn = -0.5 * dz * np.log(2 * np.pi * s2) - 0.5 * ((z[b] - centers) ** 2).sum(1) / s2
    masked = ex_ids == ids[b]
    logn[masked] = -np.inf
    out.append(logsumexp(logn) - np.log(len(ex_ids) - masked.sum()))
  return np.array(out), set(ex_ids.tolist()), len(pos)


def test_rat_reference_mode_matches_the_reference_neighbourhood_and_normalisation():
  c, model, prior, mparams = _exemplar_setup(
    rat=True, rat_k=4, num_exemplars=30, rat_mode="reference"
  )
  n, b = 25, 6
  rng = np.random.default_rng(6)
  pool = jnp.asarray(rng.uniform(size=(n, 8, 8, 1)).astype(np.float32))
  cache = rng.normal(size=(n, c.latent_dim)).astype(np.float32)
  ids = np.array([0, 3, 7, 11, 20, 24], np.int32)
  mu = rng.normal(size=(b, c.latent_dim)).astype(np.float32)
  key = jax.random.PRNGKey(8)
  inputs = ContextInputs(
    x=pool[ids], ids=jnp.asarray(ids), mu=jnp.asarray(mu), key=key, pool=pool, binary=False
  )
  params = {"log_var": jnp.float32(0.4)}
  ctx, _ = prior.context(params, {"cache": jnp.asarray(cache)}, model, mparams, inputs, train=True)
  k_idx, _ = jax.random.split(key)
  cand = np.asarray(jax.random.randint(k_idx, (30,), 0, n, dtype=jnp.int32))
  assert len(np.unique(cand)) < len(cand)  # 30 draws of 25: duplicates present
  z = mu + 0.3 * rng.normal(size=mu.shape).astype(np.float32)
  encode = lambda r: np.asarray(model.encode_mean(mparams, pool[r]), np.float64)
  want, want_ids, n_pos = _reference_rat_log_p_z(
    mu, z.astype(np.float64), ids, cache, cand, 4, 0.4, encode
  )
  mask = np.asarray(ctx.bank_mask)
  assert mask.sum() == n_pos  # one component per candidate position
  assert set(np.asarray(ctx.bank_ids)[mask].tolist()) == want_ids
  assert ctx.log_norm is None
  got = np.asarray(prior.log_prob(params, jnp.asarray(z), ctx, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _reference_stop(val_losses, warmup, patience):
  """The epoch loop of the reference's density_estimation.py: (stop epoch, best epoch)."""
  best, e, best_epoch = np.inf, 0, 0
  for epoch, v in enumerate(val_losses, start=1):
    if v < best:
      e, best, best_epoch = 0, v, epoch
    else:
      e += 1
      if epoch < warmup:
        e = 0
      if e > patience:
        return epoch, best_epoch
  return len(val_losses), best_epoch


@pytest.mark.parametrize("seed", range(6))
def test_early_stopping_counts_like_the_reference(seed):
  rng = np.random.default_rng(seed)
  warmup, patience = int(rng.integers(1, 8)), int(rng.integers(1, 6))
  # A curve that improves, then plateaus with noise (sometimes during warm-up).
  vals = list(100 - np.minimum(np.arange(40), rng.integers(2, 20)) + rng.normal(0, 0.5, 40))
  want_stop, want_best = _reference_stop(vals, warmup, patience)
  meta = {"best_val": None, "best_epoch": -1, "bad_epochs": 0}
  stop = len(vals)
  for epoch, v in enumerate(vals):
    train_lib.early_stopping_update(meta, float(v), epoch, warmup)
    if train_lib.should_stop_early(meta, patience):
      stop = epoch + 1
      break
  assert (stop, meta["best_epoch"] + 1) == (want_stop, want_best)
