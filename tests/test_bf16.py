"""config.matmul_dtype: bfloat16 operands for the networks' matrix products.

* 'float32' (the default) is the code as it was: bitwise equal to a plain
  float32 forward written out here, and to an explicit 'float32';
* 'bfloat16': every network product takes bfloat16 operands and accumulates
  in float32 (forward and both backward products), while the prior kernel's
  distance products stay float32 at Precision.HIGHEST; parameters, outputs,
  loss and gradients are float32; the loss moves by rounding only;
* a train step does not retrace, and bad values are one-line errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from conftest import ROOT, fresh_run, load_config, train_traced_once
from exvae import config_checks, train_lib
from exvae.models import check_matmul_dtype, make_model
from exvae.nets.gated import mixed_matmul
from exvae.objectives import elbo_loss

_DOT = re.compile(r"stablehlo\.dot_general[^\n]*")
_OPERANDS = re.compile(
  r": \(tensor<[0-9x]*x?(\w+)>, tensor<[0-9x]*x?(\w+)>\) -> tensor<[0-9x]*x?(\w+)>"
)

CASES = {
  "exemplar": {},
  "rat": {"exemplar.rat": True},
  "gaussian": {"prior": "gaussian"},
  "vampprior": {"prior": "vampprior"},
  "hvae": {"model": "hvae"},
  "logistic": {"likelihood": "logistic"},
}


def _batch(c):
  """Setup, state, pool and one fixed training batch of config ``c``."""
  setup, state, pool, perm = fresh_run(c)
  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  return setup, state, pool, (x, ids, key)


def _loss_fn(setup, state, pool, batch):
  x, ids, key = batch
  return lambda p: elbo_loss(p, state.prior_state, setup, x, ids, key, jnp.float32(0.5), pool)[0]


def _loss_and_grads(case, **overrides):
  c = load_config("test", **CASES[case], **overrides)
  setup, state, pool, batch = _batch(c)
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(setup, state, pool, batch)))(state.params)
  return state.params, loss, grads


def _dot_types(text):
  """(lhs, rhs, result) element types and whether pinned, of every dot_general in ``text``."""
  out = []
  for d in _DOT.findall(text):
    m = _OPERANDS.search(d)
    assert m, d
    out.append((m.group(1), m.group(2), m.group(3), "precision = [HIGHEST, HIGHEST]" in d))
  assert out, "no dot_general found: the check would be vacuous"
  return out


@pytest.fixture
def xla_forward(monkeypatch):
  """The kernel's forward through XLA (its dots visible), not the fused CPU custom call."""
  monkeypatch.setenv("EXVAE_NO_FUSED", "1")
  jax.clear_caches()
  yield
  jax.clear_caches()


# ------------------------------------------------------------------------------
# float32: the code as it was
# ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["exemplar", "hvae"])
def test_float32_default_is_bitwise_explicit_float32_and_bf16_is_not(case):
  assert load_config("test").matmul_dtype == "float32"
  _, l0, g0 = _loss_and_grads(case)
  _, l1, g1 = _loss_and_grads(case, matmul_dtype="float32")
  chex.assert_trees_all_equal(l0, l1)
  chex.assert_trees_all_equal(g0, g1)
  _, l2, g2 = _loss_and_grads(case, matmul_dtype="bfloat16")
  assert float(l2) != float(l0)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)))


def _plain_vae(params, x):
  """The MLP VAE's forward written out in plain float32 jnp (what the code was)."""

  def gated(p, h):
    return (h @ p["h"]["kernel"] + p["h"]["bias"]) * jax.nn.sigmoid(
      h @ p["g"]["kernel"] + p["g"]["bias"]
    )

  def linear(p, h):
    return lax.dot_general(h, p["kernel"], (((1,), (0,)), ((), ()))) + p["bias"][None]

  h = x.reshape(x.shape[0], -1)
  h = gated(params["enc_1"], gated(params["enc_0"], h))
  mu, logvar = linear(params["enc_mu"], h), jnp.clip(linear(params["enc_logvar"], h), -6.0, 2.0)
  h = gated(params["dec_1"], gated(params["dec_0"], mu))
  return mu, logvar, linear(params["dec_out"], h).reshape(x.shape)


def test_float32_vae_is_bitwise_the_plain_float32_forward():
  for overrides in ({}, {"matmul_dtype": "float32"}):
    c = load_config("test", **overrides)
    model = make_model(c, (8, 8, 1))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (20, 8, 8, 1))
    got = jax.jit(lambda p, x: (*model.encode(p, x), model.decode(p, model.encode(p, x)[0])))(
      params, x
    )
    chex.assert_trees_all_equal(got, jax.jit(_plain_vae)(params, x))


def test_config_without_the_key_is_float32():
  c = ml_collections.ConfigDict(
    dict(model="vae", latent_dim=4, hidden=(16, 16), likelihood="bernoulli")
  )
  model = make_model(c, (8, 8, 1))
  assert model.module.matmul_dtype == "float32"
  check_matmul_dtype(c)


# ------------------------------------------------------------------------------
# bfloat16: where the dtypes are
# ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["exemplar", "rat", "vampprior"])
def test_bf16_network_dots_and_f32_prior_kernel_dots_in_lowered_loss_and_grad(case, xla_forward):
  c = load_config("test", matmul_dtype="bfloat16", **CASES[case])
  setup, state, pool, batch = _batch(c)
  f = jax.value_and_grad(_loss_fn(setup, state, pool, batch))
  dots = _dot_types(jax.jit(f).lower(state.params).as_text())
  pinned = [d for d in dots if d[3]]
  network = [d for d in dots if not d[3]]
  assert pinned, "no prior-kernel dot found"
  assert all(d[:3] == ("f32", "f32", "f32") for d in pinned), pinned
  # Every other product (encoder, decoder, forward and backward) is bf16 x bf16 -> f32.
  assert len(network) >= 3 * 7, network  # 7 layers, forward + two backward products
  assert all(d[:3] == ("bf16", "bf16", "f32") for d in network), network

  c32 = load_config("test", **CASES[case])
  setup32, state32, pool32, batch32 = _batch(c32)
  f32 = jax.value_and_grad(_loss_fn(setup32, state32, pool32, batch32))
  assert all(
    d[:3] == ("f32", "f32", "f32") for d in _dot_types(jax.jit(f32).lower(state32.params).as_text())
  )


@pytest.mark.parametrize("model", ["vae", "hvae"])
def test_bf16_encoder_and_decoder_lower_to_bf16_dots(model):
  c = load_config("test", model=model, matmul_dtype="bfloat16")
  m = make_model(c, (8, 8, 1))
  params = m.init(jax.random.PRNGKey(0))
  x = jnp.zeros((5, 8, 8, 1))
  z = jnp.zeros((5, m.latent_dim))
  for fn, arg in ((m.encode, x), (m.encode_mean, x), (m.decode, z)):
    dots = _dot_types(jax.jit(fn).lower(params, arg).as_text())
    assert all(d[:3] == ("bf16", "bf16", "f32") and not d[3] for d in dots), dots


@pytest.mark.slow
@pytest.mark.parametrize("case", ["exemplar", "hvae", "logistic"])
def test_bf16_params_outputs_and_grads_are_float32(case):
  c = load_config("test", matmul_dtype="bfloat16", **CASES[case])
  m = make_model(c, (8, 8, 1))
  params = m.init(jax.random.PRNGKey(0))
  chex.assert_trees_all_equal_dtypes(
    params, jax.tree.map(lambda a: jnp.zeros((), jnp.float32), params)
  )
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1))
  mu, logvar = m.encode(params, x)
  outs = [mu, logvar, m.encode_mean(params, x), *jax.tree.leaves(m.decode(params, mu))]
  from exvae.likelihoods import get_likelihood

  sc = m.score(params, x, jax.random.PRNGKey(2), 3, get_likelihood(c.likelihood)[0])
  outs += [sc.z, sc.mu, sc.log_px, sc.log_p_rest, sc.log_q]
  for o in outs:
    assert o.dtype == jnp.float32, o.dtype
    assert np.isfinite(np.asarray(o)).all()
  _, loss, grads = _loss_and_grads(case, matmul_dtype="bfloat16")
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32, g.dtype
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_loss_is_close_to_float32_but_not_equal(case):
  _, l32, g32 = _loss_and_grads(case)
  _, l16, g16 = _loss_and_grads(case, matmul_dtype="bfloat16")
  rel = abs(float(l16) - float(l32)) / abs(float(l32))
  assert 0 < rel < 5e-3, (float(l32), float(l16))
  # The gradient direction is kept (bf16 operands: ~3 significant digits).
  a = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g32)])
  b = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g16)])
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_mixed_matmul_is_rounded_operands_with_float32_accumulation():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 7, 33)), jnp.float32)  # batch axes are kept
  w = jnp.asarray(rng.normal(size=(33, 5)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
  r = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  out, vjp = jax.vjp(mixed_matmul, x, w)
  dx, dw = vjp(g)
  assert out.dtype == dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), r(x) @ r(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), r(g) @ r(w).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(dw), r(x).reshape(-1, 33).T @ r(g).reshape(-1, 5), rtol=1e-5, atol=1e-5
  )
  # ... and really rounded: the float32 product is a few 1e-3 away.
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.abs(np.asarray(out) - exact).max() > 1e-3


# ------------------------------------------------------------------------------
# Training and errors
# ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rat", [False, True])
def test_bf16_train_step_traces_once_and_loss_decreases(rat):
  c = load_config("test", matmul_dtype="bfloat16", **{"exemplar.rat": rat})
  _, state, _, losses = train_traced_once(c, 30)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert int(state.step) == 30 and int(state.nonfinite) == 0
  chex.assert_trees_all_equal_dtypes(
    state.params, jax.tree.map(lambda a: jnp.zeros((), jnp.float32), state.params)
  )


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"matmul_dtype": "float16"},
      r"matmul_dtype must be one of \['float32', 'bfloat16'\], got 'float16'",
    ),
    ({"matmul_dtype": "bf16"}, r"must be one of"),
    ({"matmul_dtype": "bfloat16", "model": "convhvae"}, r"not 'convhvae'"),
    ({"matmul_dtype": "bfloat16", "model": "pixelcnn"}, r"not 'pixelcnn'"),
  ],
)
def test_bad_value_is_a_one_line_error(overrides, match):
  c = load_config("test", **overrides)
  with pytest.raises(ValueError, match=match) as e:
    config_checks.check_values(c)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=match):  # the factories check too
    make_model(c, (8, 8, 1))


def test_cli_bad_value_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--config={ROOT}/configs/test.py",
      f"--workdir={tmp_path / 'w'}",
      "--config.matmul_dtype=float16",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    cwd=ROOT,
  )
  assert r.returncode == 1, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert (
    lines[-1].startswith("exvae-train: error: ") and "matmul_dtype must be one of" in lines[-1]
  ), r.stderr
  assert "Traceback" not in r.stderr


def test_readers_may_change_matmul_dtype_a_resume_may_not(tmp_path):
  from exvae import errors, rundir

  wd = str(tmp_path)
  rundir.check_config_drift(wd, load_config("test", matmul_dtype="bfloat16"), resuming=False)
  rundir.check_reader_config(wd, load_config("test"))  # evaluate in float32: fine
  with pytest.raises(errors.ConfigDriftError, match="matmul_dtype"):
    rundir.check_config_drift(wd, load_config("test"), resuming=True)
  assert rundir.check_config_drift(wd, load_config("test"), resuming=True, allow_change=True)


def test_a_reader_that_shrinks_max_test_is_told_the_evaluation_key(tmp_path):
  from exvae import errors, rundir

  wd = str(tmp_path)
  rundir.check_config_drift(wd, load_config("test"), resuming=False)
  with pytest.raises(errors.ConfigDriftError) as e:
    rundir.check_reader_config(wd, load_config("test", max_test=20), rundir.EVAL_HINTS)
  msg = str(e.value)
  assert "max_test" in msg and "--config.eval.max_test_examples=n" in msg and "\n" not in msg
  with pytest.raises(errors.ConfigDriftError) as e:  # no hint where none applies
    rundir.check_reader_config(wd, load_config("test", latent_dim=5), rundir.EVAL_HINTS)
  assert "max_test_examples" not in str(e.value)
  with pytest.raises(errors.ConfigDriftError) as e:  # kNN and the bank do not read it
    rundir.check_reader_config(wd, load_config("test", max_test=20))
  assert "max_test_examples" not in str(e.value)
  rundir.check_reader_config(wd, load_config("test", **{"eval.max_test_examples": 20}))


def test_readers_may_score_another_test_binarisation_a_resume_may_not(tmp_path):
  from exvae import errors, rundir

  wd = str(tmp_path)
  rundir.check_config_drift(wd, load_config("test"), resuming=False)
  rundir.check_reader_config(wd, load_config("test", eval_binarize="reference"))
  with pytest.raises(errors.ConfigDriftError, match="eval_binarize"):
    rundir.check_config_drift(wd, load_config("test", eval_binarize="reference"), resuming=True)
