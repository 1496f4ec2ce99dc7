"""The two-level MLP HVAE does what the authors' ``HVAE_2level`` does, under every prior.

The reference (sajadn/Exemplar-VAE, ``models/HVAE_2level.py``, ``models/AbsHModel.py``,
``models/BaseModel.py``) is transcribed here into NumPy, independently of
exvae's modules, and exvae is checked against it:

* the parameter inventory: every reference tensor (and nothing else), with the
  input width that says which variables each network sees;
* the initialisation of every tensor: He-normal weights N(0, 2 / fan_in) on
  every ``nn.Linear`` (the VampPrior pseudo-inputs included), PyTorch's
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases, a N(0, 1) exemplar log-variance
  (Kolmogorov-Smirnov tests against ``scipy.stats``);
* the training loss (every KL term scaled by the warm-up beta, the prior on
  z2, exemplar codes = q(z2|x) means of grey exemplars, leave-one-out) and the
  importance weights of the test NLL, for the Gaussian, VampPrior and
  exemplar priors, with every log-variance clipped to [-6, 2].

With ``EXVAE_REF_PYTHON`` (a Python with torch) and ``EXVAE_REF_SRC`` (the
authors' checkout) set, :func:`test_against_the_authors_code` also runs THEIR
model on exvae's weights and draws (``tests/ref_hvae_torch.py``) and compares
the loss, every gradient and the IWAE log-weights, RAT included.
"""

import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from conftest import load_config
from exvae.config_base import paper_config
from exvae.likelihoods import get_likelihood
from exvae.models import make_model
from exvae.models.hvae import hierarchical_noise
from exvae.objectives import Setup, elbo_loss, log_importance_weights
from exvae.optim import make_optimizer
from exvae.priors import ContextInputs, make_prior

# ----------------------------------------------------------------------------
# The reference's tensors: exvae path -> (reference name, in_features, out_features)
# ----------------------------------------------------------------------------

D, H, Z1, Z2 = 784, 300, 40, 40


def reference_linears(d=D, h=H, z1=Z1, z2=Z2):
  """Every ``nn.Linear`` of the reference HVAE_2level (binary input), keyed by exvae path.

  GatedDense layers hold two Linears, ``h`` and ``g``; the widths say what
  each network reads: q(z2|x) reads x, q(z1|x,z2) reads x and z2 in separate
  branches joined by a layer of width 2h, p(z1|z2) reads z2, p(x|z1,z2) reads
  z1 and z2 in separate branches joined likewise.
  """
  gated = {
    "q_z2_0": ("q_z_layers.0", d, h),
    "q_z2_1": ("q_z_layers.1", h, h),
    "q_z1_x": ("q_z1_layers_x.0", d, h),
    "q_z1_z2": ("q_z1_layers_z2.0", z2, h),
    "q_z1_joint": ("q_z1_layers_joint.0", 2 * h, h),
    "p_z1_0": ("p_z1_layers_z2.0", z2, h),
    "p_z1_1": ("p_z1_layers_z2.1", h, h),
    "p_x_z1": ("p_x_layers_z1.0", z1, h),
    "p_x_z2": ("p_x_layers_z2.0", z2, h),
    "p_x_joint": ("p_x_layers_joint.0", 2 * h, h),
  }
  out = {}
  for path, (ref, i, o) in gated.items():
    for half in ("h", "g"):
      out[(path, half)] = (f"{ref}.{half}", i, o)
  out.update(
    {
      ("q_z2_head", "mu"): ("q_z_mean", h, z2),
      ("q_z2_head", "logvar"): ("q_z_logvar.linear", h, z2),
      ("q_z1_head", "mu"): ("q_z1_mean", h, z1),
      ("q_z1_head", "logvar"): ("q_z1_logvar.linear", h, z1),
      ("p_z1_head", "mu"): ("p_z1_mean", h, z1),
      ("p_z1_head", "logvar"): ("p_z1_logvar.linear", h, z1),
      ("p_x_head", "out"): ("p_x_mean.linear", h, d),
    }
  )
  return out


def _leaves(params):
  return {
    tuple(k.key for k in path): np.asarray(leaf, np.float64)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_parameter_inventory_is_the_references():
  m = make_model(paper_config("fashion_mnist", "hvae", "gaussian"), (28, 28, 1))
  abstract = jax.eval_shape(m.init, jax.random.PRNGKey(0))  # shapes only: no compute
  shapes = {
    tuple(k.key for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  want = {}
  for path, (_, i, o) in reference_linears().items():
    want[path + ("kernel",)] = (i, o)  # torch's (out, in) weight, transposed
    want[path + ("bias",)] = (o,)
  assert shapes == want


@pytest.fixture(scope="module")
def paper_init():
  """Paper-size HVAE parameters and the three priors' parameters, from a fixed key."""
  c = paper_config("fashion_mnist", "hvae", "vampprior")
  m = make_model(c, (28, 28, 1))
  model = _leaves(m.init(jax.random.PRNGKey(0)))
  pseudo = np.asarray(
    make_prior("vampprior", c).init(jax.random.PRNGKey(1), m, 50000)["pseudo_inputs"], np.float64
  )
  ce = paper_config("fashion_mnist", "hvae", "exemplar", rat=True)
  prior = make_prior("exemplar", ce)
  keys = jax.random.split(jax.random.PRNGKey(2), 200)
  log_vars = np.asarray(jax.vmap(lambda k: prior.init(k, m, 50000)["log_var"])(keys))
  return c, model, pseudo, log_vars


def _ks(values, dist) -> float:
  return stats.kstest(np.ravel(values), dist.cdf).pvalue


def test_every_weight_is_he_normal_and_every_bias_torch_uniform(paper_init):
  _, params, _, _ = paper_init
  for path, (ref, fan_in, _) in reference_linears().items():
    w, b = params[path + ("kernel",)], params[path + ("bias",)]
    # he_init: weight.normal_(0, sqrt(2 / in_features)), untruncated.
    assert _ks(w, stats.norm(0.0, np.sqrt(2.0 / fan_in))) > 1e-4, ref
    bound = 1.0 / np.sqrt(fan_in)
    assert _ks(b, stats.uniform(-bound, 2 * bound)) > 1e-4, ref


def test_the_ks_check_rejects_other_initialisers(paper_init):
  """The check above can fail: LeCun scaling or a 2-sigma truncation are rejected."""
  rng = np.random.default_rng(0)
  fan_in = 300
  he = stats.norm(0.0, np.sqrt(2.0 / fan_in))
  lecun = rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(fan_in, 300))
  trunc = stats.truncnorm(-2, 2, scale=np.sqrt(2.0 / fan_in)).rvs((fan_in, 300), random_state=1)
  assert _ks(lecun, he) < 1e-6 and _ks(trunc, he) < 1e-6
  zeros_bias = np.zeros(300)
  assert _ks(zeros_bias, stats.uniform(-(fan_in**-0.5), 2 * fan_in**-0.5)) < 1e-6


def test_pseudo_inputs_and_exemplar_log_variance_start_as_the_references(paper_init):
  c, _, pseudo, log_vars = paper_init
  k = int(c.vampprior.num_pseudo)
  assert pseudo.shape == (k, 28, 28, 1)
  # BaseModel.he_initializer overwrites the pseudo-input Linear(K, 784): N(0, 2 / K).
  assert _ks(pseudo, stats.norm(0.0, np.sqrt(2.0 / k))) > 1e-4
  # prior_log_variance = torch.randn(1), one draw per run.
  assert _ks(log_vars, stats.norm(0.0, 1.0)) > 1e-3


def test_paper_rows_use_the_reference_hyper_parameters():
  """density_estimation.py's flags, AbsHModel/BaseModel constants, the README's components."""
  for prior in ("gaussian", "vampprior", "exemplar"):
    c = paper_config("fashion_mnist", "hvae", prior, rat=prior == "exemplar")
    assert (c.model, c.latent_dim, c.hvae.z1_dim, tuple(c.hidden)) == ("hvae", 40, 40, (300, 300))
    assert (c.likelihood, c.optimizer, c.learning_rate, c.batch_size) == (
      "bernoulli",
      "adamnormgrad",
      5e-4,
      100,
    )
    assert (c.num_epochs, c.warmup_epochs, c.early_stopping_patience) == (2000, 100, 50)
    assert c.eval.num_importance_samples == 5000 and c.eval.use_best
    assert c.matmul_dtype == "float32"
  c = paper_config("fashion_mnist", "hvae", "exemplar", rat=True)
  assert (c.exemplar.num_exemplars, c.exemplar.rat, c.exemplar.rat_k) == (25000, True, 10)
  assert c.exemplar.loo and not c.exemplar.binarize_exemplars and c.exemplar.rat_mode == "reference"
  assert (c.exemplar.log_var_init_mean, c.exemplar.log_var_init_std) == (0.0, 1.0)
  c = paper_config("fashion_mnist", "hvae", "vampprior")
  assert c.vampprior.init == "he"


# ----------------------------------------------------------------------------
# The reference HVAE in NumPy (float64), from the parameter tree
# ----------------------------------------------------------------------------


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


class NumpyHVAE:
  """HVAE_2level's forward pass: GatedDense = Linear_h(x) * sigmoid(Linear_g(x)), Hardtanh(-6, 2)."""

  def __init__(self, params):
    self.p = _leaves(params)

  def lin(self, path, x):
    return x @ self.p[path + ("kernel",)] + self.p[path + ("bias",)]

  def gated(self, name, x):
    return self.lin((name, "h"), x) * _sigmoid(self.lin((name, "g"), x))

  def head(self, name, h):
    return self.lin((name, "mu"), h), np.clip(self.lin((name, "logvar"), h), -6.0, 2.0)

  def q_z2(self, x):  # BaseModel.q_z: q_z_layers, q_z_mean, q_z_logvar
    return self.head("q_z2_head", self.gated("q_z2_1", self.gated("q_z2_0", x)))

  def q_z1(self, x, z2):  # AbsHModel.q_z1: cat(x-branch, z2-branch), joint
    h = np.concatenate([self.gated("q_z1_x", x), self.gated("q_z1_z2", z2)], -1)
    return self.head("q_z1_head", self.gated("q_z1_joint", h))

  def p_z1(self, z2):  # AbsHModel.p_z1
    return self.head("p_z1_head", self.gated("p_z1_1", self.gated("p_z1_0", z2)))

  def p_x(self, z1, z2):  # AbsHModel.p_x: cat(z1-branch, z2-branch), joint, sigmoid
    h = np.concatenate([self.gated("p_x_z1", z1), self.gated("p_x_z2", z2)], -1)
    return _sigmoid(self.lin(("p_x_head", "out"), self.gated("p_x_joint", h)))

  def unclipped_logvars(self, x, z2):
    hq2 = self.gated("q_z2_1", self.gated("q_z2_0", x))
    hq1 = self.gated(
      "q_z1_joint", np.concatenate([self.gated("q_z1_x", x), self.gated("q_z1_z2", z2)], -1)
    )
    hp1 = self.gated("p_z1_1", self.gated("p_z1_0", z2))
    return [
      self.lin((n, "logvar"), h)
      for n, h in (("q_z2_head", hq2), ("q_z1_head", hq1), ("p_z1_head", hp1))
    ]


def _log_normal(z, mu, logvar):  # utils/distributions.log_normal_diag, summed
  return -0.5 * np.sum(logvar + np.log(2 * np.pi) + (z - mu) ** 2 / np.exp(logvar), -1)


def _log_bernoulli(x, p):  # utils/distributions.log_bernoulli (clamped)
  p = np.clip(p, 1e-5, 1 - 1e-5)
  return np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), -1)


def _log_prior(prior, net, z2, pparams, pool, ids=None):
  """BaseModel.log_p_z on z2: (B, d2) -> (B,)."""
  if prior == "gaussian":
    return -0.5 * np.sum(z2**2 + np.log(2 * np.pi), -1)
  if prior == "vampprior":  # hardtanh(0, 1) pseudo-inputs through q(z2|x)
    u = np.clip(pparams["pseudo_inputs"], 0.0, 1.0).reshape(pparams["pseudo_inputs"].shape[0], -1)
    mu, lv = net.q_z2(u)
    comp = _log_normal(z2[:, None], mu[None], lv[None])
    return logsumexp(comp, 1) - np.log(mu.shape[0])
  # Exemplar prior: q(z2|x) MEANS of the grey exemplars, one scalar log-variance.
  centres, _ = net.q_z2(pool)
  lv = float(pparams["log_var"])
  comp = _log_normal(z2[:, None], centres[None], np.full(centres.shape[1], lv))
  count = np.full(z2.shape[0], centres.shape[0], np.float64)
  if ids is not None:  # leave-one-out in training
    own = ids[:, None] == np.arange(centres.shape[0])[None]
    comp = np.where(own, -np.inf, comp)
    count = count - own.sum(1)
  return logsumexp(comp, 1) - np.log(count)


def _log_w(prior, net, x, eps2, eps1, pparams, pool, ids=None):
  """log p(x|z1,z2) + log p(z1|z2) + log p(z2) - log q(z1|x,z2) - log q(z2|x) per sample."""
  mu2, lv2 = net.q_z2(x)
  z2 = mu2 + np.exp(0.5 * lv2) * eps2
  mu1, lv1 = net.q_z1(x, z2)
  z1 = mu1 + np.exp(0.5 * lv1) * eps1
  pm1, plv1 = net.p_z1(z2)
  log_px = _log_bernoulli(x, net.p_x(z1, z2))
  kl = (
    _log_normal(z2, mu2, lv2)
    + _log_normal(z1, mu1, lv1)
    - _log_normal(z1, pm1, plv1)
    - _log_prior(prior, net, z2, pparams, pool, ids)
  )
  return log_px, kl, z2


SHAPE, N, B, S = (6, 6, 1), 12, 5, 7


@functools.lru_cache(maxsize=None)
def _tiny(prior, rat=False, z1=2):
  """``(config, setup, params, pool, ids, x)`` of a tiny HVAE under ``prior`` (built once)."""
  c = load_config(
    "test",
    model="hvae",
    prior=prior,
    latent_dim=3,
    hidden=(8, 8),
    **{
      "hvae.z1_dim": z1,
      "exemplar.num_exemplars": N,
      "exemplar.rat": rat,
      "vampprior.num_pseudo": 4,
    },
  )
  model = make_model(c, SHAPE)
  p = make_prior(prior, c)
  log_lik, mean_fn = get_likelihood("bernoulli")
  setup = Setup(
    model=model,
    prior=p,
    log_lik=log_lik,
    mean_fn=mean_fn,
    optimizer=make_optimizer(c),
    binary=True,
    batch_size=B,
    steps_per_epoch=N // B,
    warmup_epochs=100,
    num_train=N,
  )
  params = {
    "model": model.init(jax.random.PRNGKey(0)),
    "prior": p.init(jax.random.PRNGKey(1), model, N),
  }
  # Every other log-variance unit's weights 40x larger, so that each Gaussian's clip to
  # [-6, 2] is exercised (and the other units stay inside the range).
  for head in ("q_z2_head", "q_z1_head", "p_z1_head"):
    k = params["model"][head]["logvar"]["kernel"]
    params["model"][head]["logvar"]["kernel"] = k * jnp.where(jnp.arange(k.shape[1]) % 2, 40.0, 1.0)
  rng = np.random.default_rng(0)
  if prior == "vampprior":  # pseudo-inputs on both sides of the hardtanh's range
    params["prior"]["pseudo_inputs"] = jnp.asarray(
      rng.uniform(-0.3, 1.3, (4,) + SHAPE), jnp.float32
    )
  pool = rng.uniform(size=(N,) + SHAPE).astype(np.float32)  # grey training images
  ids = rng.choice(N, B, replace=False).astype(np.int32)
  x = (rng.uniform(size=(B,) + SHAPE) < pool[ids]).astype(np.float32)
  return c, setup, params, pool, ids, x


def _np_prior_params(params):
  return {k: np.asarray(v, np.float64) for k, v in params["prior"].items()}


PRIORS = ("gaussian", "vampprior", "exemplar")


@pytest.mark.slow
@pytest.mark.parametrize("prior", PRIORS)
def test_training_loss_matches_the_reference(prior):
  c, setup, params, pool, ids, x = _tiny(prior)
  key, beta = jax.random.PRNGKey(3), 0.3
  loss, (metrics, _) = elbo_loss(
    params, {}, setup, jnp.asarray(x), jnp.asarray(ids), key, jnp.float32(beta), jnp.asarray(pool)
  )
  _, k_z = jax.random.split(key)  # the score's noise (S = 1)
  eps2, eps1 = (np.asarray(e[:, 0], np.float64) for e in hierarchical_noise(k_z, B, 1, 3, 2))
  net = NumpyHVAE(params["model"])
  xf, poolf = x.reshape(B, -1).astype(np.float64), pool.reshape(N, -1).astype(np.float64)
  log_px, kl, z2 = _log_w(prior, net, xf, eps2, eps1, _np_prior_params(params), poolf, ids)
  # calculate_loss: -RE + beta * KL, the KL holding all four latent terms.
  np.testing.assert_allclose(float(loss), np.mean(-log_px + beta * kl), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["kl"]), np.mean(kl), rtol=2e-5, atol=1e-4)
  # The clip was active in every head (else the test could not see a missing one).
  for lv in net.unclipped_logvars(xf, z2):
    assert ((lv < -6) | (lv > 2)).any() and ((lv > -6) & (lv < 2)).any()


@pytest.mark.slow
@pytest.mark.parametrize("prior", PRIORS)
def test_test_nll_weights_match_the_reference(prior):
  """calculate_likelihood: S joint samples (z2, z1 | z2) per point, full bank, no leave-one-out."""
  c, setup, params, pool, _, x = _tiny(prior)
  ctx, _ = setup.prior.context(
    params["prior"],
    {},
    setup.model,
    params["model"],
    ContextInputs(key=jax.random.PRNGKey(4), pool=jnp.asarray(pool), binary=False, pool_size=N),
    train=False,
  )
  key = jax.random.PRNGKey(5)
  log_w = np.asarray(log_importance_weights(params, setup, ctx, jnp.asarray(x), key, S)[0])
  eps2, eps1 = (np.asarray(e, np.float64) for e in hierarchical_noise(key, B, S, 3, 2))
  net = NumpyHVAE(params["model"])
  xf = np.repeat(x.reshape(B, 1, -1), S, 1).reshape(B * S, -1).astype(np.float64)
  log_px, kl, _ = _log_w(
    prior,
    net,
    xf,
    eps2.reshape(B * S, -1),
    eps1.reshape(B * S, -1),
    _np_prior_params(params),
    pool.reshape(N, -1).astype(np.float64),
  )
  want = (log_px - kl).reshape(B, S)
  np.testing.assert_allclose(log_w, want, rtol=2e-5, atol=2e-3)
  nll = -(logsumexp(want, 1) - np.log(S))
  np.testing.assert_allclose(-(logsumexp(log_w, 1) - np.log(S)), nll, rtol=2e-5)


def test_the_numpy_reference_sees_wiring_changes():
  """The comparisons above can fail: leave-one-out and grey exemplars move the reference's KL."""
  _, setup, params, pool, ids, x = _tiny("exemplar")
  net = NumpyHVAE(params["model"])
  xf, poolf = x.reshape(B, -1).astype(np.float64), pool.reshape(N, -1).astype(np.float64)
  rng = np.random.default_rng(1)
  eps2, eps1 = rng.normal(size=(B, 3)), rng.normal(size=(B, 2))
  log_px, kl, _ = _log_w("exemplar", net, xf, eps2, eps1, _np_prior_params(params), poolf, ids)
  # Without leave-one-out the prior differs.
  kl2 = _log_w("exemplar", net, xf, eps2, eps1, _np_prior_params(params), poolf, None)[1]
  assert np.abs(kl - kl2).max() > 1e-3
  # Exemplars binarised instead of grey give other codes.
  kl3 = _log_w("exemplar", net, xf, eps2, eps1, _np_prior_params(params), np.round(poolf), ids)[1]
  assert np.abs(kl - kl3).max() > 1e-3


# ----------------------------------------------------------------------------
# The authors' code itself (optional: needs their checkout and a Python with torch)
# ----------------------------------------------------------------------------

REF_PYTHON, REF_SRC = os.environ.get("EXVAE_REF_PYTHON", ""), os.environ.get("EXVAE_REF_SRC", "")


@pytest.mark.skipif(
  not (os.path.exists(REF_PYTHON) and os.path.isdir(REF_SRC)),
  reason="set EXVAE_REF_PYTHON (a Python with torch) and EXVAE_REF_SRC "
  "(the authors' checkout) to compare with their code",
)
@pytest.mark.parametrize(
  "prior,rat", [("gaussian", False), ("vampprior", False), ("exemplar", False), ("exemplar", True)]
)
def test_against_the_authors_code(prior, rat, tmp_path):
  """THEIR HVAE_2level with exvae's weights and draws: same loss, gradients and log w."""
  c, setup, params, pool, ids, x = _tiny(prior, rat, z1=3)  # their q_z assumes z1 = z2
  pool_j = jnp.asarray(pool)
  state = setup.prior.init_state(setup.model, N)
  inputs = ContextInputs(key=jax.random.PRNGKey(4), pool=pool_j, binary=False, pool_size=N)
  state = setup.prior.refresh(params["prior"], state, setup.model, params["model"], inputs)
  key, beta = jax.random.PRNGKey(3), 0.3
  (loss, _), grads = jax.value_and_grad(elbo_loss, has_aux=True)(
    params, state, setup, jnp.asarray(x), jnp.asarray(ids), key, jnp.float32(beta), pool_j
  )
  # exvae's draws in this step: the score's noise, then the exemplar candidates.
  k_ctx, k_z = jax.random.split(key)
  eps2, eps1 = (np.asarray(e[:, 0]) for e in hierarchical_noise(k_z, B, 1, 3, 3))
  cand = (
    np.asarray(jax.random.randint(jax.random.split(k_ctx)[0], (N,), 0, N, dtype=jnp.int32))
    if rat
    else np.arange(N)
  )
  ctx, _ = setup.prior.context(
    params["prior"], {}, setup.model, params["model"], inputs, train=False
  )
  kt = jax.random.PRNGKey(5)
  log_w = np.asarray(log_importance_weights(params, setup, ctx, jnp.asarray(x), kt, S)[0])
  te2, te1 = (np.asarray(e) for e in hierarchical_noise(kt, B, S, 3, 3))
  flat = {
    "params/" + "/".join(str(k.key) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
  np.savez(
    src,
    **flat,
    prior=prior,
    rat=rat,
    N=N,
    M=N,
    K=4,
    rat_k=int(c.exemplar.rat_k),
    hidden=8,
    z1=3,
    z2=3,
    input_size=np.array([1, 6, 6]),
    pool=pool.reshape(N, -1),
    x=x.reshape(B, -1),
    ids=ids,
    eps2=eps2,
    eps1=eps1,
    cand=cand,
    beta=beta,
    xt=x.reshape(B, -1),
    te2=te2,
    te1=te1,
  )
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref_hvae_torch.py")
  subprocess.run(
    [REF_PYTHON, "-W", "ignore", script, str(src), str(dst)],
    check=True,
    capture_output=True,
    env=dict(os.environ, EXVAE_REF_SRC=REF_SRC),
  )
  ref = np.load(dst)
  np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=1e-5)
  g = {
    "grads/" + "/".join(str(k.key) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
  }
  their = {k for k in ref.files if k.startswith("grads/")}
  assert their == set(g)  # every parameter, and only those
  for k in their:
    want = ref[k].reshape(g[k].shape)
    assert np.linalg.norm(g[k] - want) <= 1e-4 * np.linalg.norm(want) + 1e-7, k
  np.testing.assert_allclose(log_w, ref["log_w"], rtol=1e-5, atol=1e-4)
