"""Distances stay exact in float32 whatever the backend's default matmul precision.

On TPU a float32 matmul at the default precision is ONE bfloat16 pass, and on
recent NVIDIA GPUs it may run in TF32: the matmul form |z|^2 + |mu|^2 - 2 z.mu
of the exemplar kernel would then carry errors of tenths of a nat. Every
distance, top-k and weight matmul is therefore pinned to
``lax.Precision.HIGHEST``. XLA:CPU ignores the precision setting, so on a CPU
these tests check it three ways:

* the lowered StableHLO, under ``jax.default_matmul_precision("bfloat16")``,
  carries ``precision = [HIGHEST, HIGHEST]`` on every dot;
* an emulation: the traced program is evaluated with the operands of every
  dot that is NOT pinned rounded to bfloat16 (what a TPU's default pass
  computes), and the error against float64 must stay at the float32 level;
* the same error check on this backend under the low-precision default
  (the real thing on a GPU or TPU; `bench/device_check.py` runs this file there).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore
from scipy.special import logsumexp

from exvae.kernels import log_kernel_sum, pruned_log_kernel_sum, topk_neighbors
from exvae.priors.vampprior import mixture_diag_log_prob

D = 40
LOG_VAR = math.log(0.25)


# ------------------------------------------------------------------------------
# Emulation of a backend whose default float32 matmul is one bfloat16 pass
# ------------------------------------------------------------------------------


def _pinned(precision) -> bool:
  """Whether a dot_general's precision parameter asks for full float32."""
  if isinstance(precision, (tuple, list)):
    return all(p == lax.Precision.HIGHEST for p in precision)
  return precision == lax.Precision.HIGHEST


def _low_precision_dot(eqn, a, b):
  """dot_general as a TPU computes it at the default precision when not pinned:
  float32 operands rounded to bfloat16, exact products, float32 accumulation."""
  params = dict(eqn.params)
  if not _pinned(params["precision"]):
    a, b = (x.astype(jnp.bfloat16).astype(x.dtype) if x.dtype == jnp.float32 else x for x in (a, b))
  params["precision"] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
  return eqn.primitive.bind(a, b, **params)


_CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
}
_BIND_AS_IS = (
  "scatter",
  "scatter-add",
  "scatter_add",
  "scatter-mul",
  "scatter-min",
  "scatter-max",
  "reduce",
  "sort",
  "argsort",
)


def _eval(jaxpr, consts, args):
  """Evaluates a jaxpr eagerly, dots through `_low_precision_dot`."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "dot_general":
      outs = [_low_precision_dot(eqn, *ins)]
    elif name in _CALLS:
      sub = eqn.params[_CALLS[name]]
      outs = _eval(sub.jaxpr, sub.consts, ins)
    elif name == "scan":
      outs = _scan(eqn.params, ins)
    elif any(True for _ in jcore.jaxprs_in_params(eqn.params)) and name not in _BIND_AS_IS:
      raise NotImplementedError(f"emulation does not handle {name}")
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _scan(params, ins):
  """lax.scan as a Python loop over the body (each step through `_eval`)."""
  body, n_consts, n_carry = params["jaxpr"], params["num_consts"], params["num_carry"]
  length = params["length"]
  assert length > 0
  consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
  steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
  ys = []
  for i in steps:
    out = _eval(body.jaxpr, body.consts, consts + carry + [x[i] for x in xs])
    carry, y = out[:n_carry], out[n_carry:]
    ys.append(y)
  if params["reverse"]:
    ys.reverse()
  return carry + [jnp.stack([y[j] for y in ys]) for j in range(len(ys[0]))]


def emulate_low_precision(fn, *args):
  """fn(*args) with every unpinned float32 dot rounded to one bfloat16 pass."""
  closed = jax.make_jaxpr(fn)(*args)
  flat = jax.tree.leaves(args)
  out = _eval(closed.jaxpr, closed.consts, flat)
  return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)), out)


def _on_backend(fn, *args):
  with jax.default_matmul_precision("bfloat16"):
    return jax.jit(fn)(*args)


MODES = {"emulated_bf16_default": emulate_low_precision, "backend_bf16_default": _on_backend}


# ------------------------------------------------------------------------------
# Data and float64 references
# ------------------------------------------------------------------------------


def _codes(b=48, n=700, seed=0):
  """Clustered bank and queries near one of its clusters (as at evaluation)."""
  rng = np.random.default_rng(seed)
  centres = 1.5 * rng.normal(size=(10, D))
  bank = centres[rng.integers(0, 10, n)] + 0.5 * rng.normal(size=(n, D))
  z = centres[3] + 0.5 * rng.normal(size=(b, D))
  return z.astype(np.float32), bank.astype(np.float32)


def _ref(z, bank, log_var):
  """float64 lse (B,) and the gradients of sum(lse) wrt z, bank and log_var."""
  z64, b64 = z.astype(np.float64), bank.astype(np.float64)
  s2 = math.exp(log_var)
  diff = z64[:, None, :] - b64[None, :, :]
  dist = (diff**2).sum(-1)
  logn = -dist / (2 * s2) - 0.5 * D * math.log(2 * math.pi * s2)
  lse = logsumexp(logn, axis=1)
  w = np.exp(logn - lse[:, None])
  gz = -(w[:, :, None] * diff).sum(1) / s2
  gb = (w[:, :, None] * diff).sum(0) / s2
  glv = float((w * dist).sum() / (2 * s2) - 0.5 * D * z.shape[0])
  return lse, gz, gb, glv


def _lse_and_grads(z, bank, log_var):
  f = lambda z, b, lv: log_kernel_sum(z, b, lv, impl="xla", chunk_size=256)[0]
  lse = f(z, bank, log_var)
  g = jax.grad(lambda z, b, lv: f(z, b, lv).sum(), (0, 1, 2))(z, bank, log_var)
  return lse, g


@pytest.fixture
def xla_forward(monkeypatch):
  """Entry points without an `impl` argument (pruned) take the XLA forward, not the
  fused CPU custom call (which has no dot to check); traces made either side of the
  switch are dropped."""
  monkeypatch.setenv("EXVAE_NO_FUSED", "1")
  jax.clear_caches()
  yield
  jax.clear_caches()


# ------------------------------------------------------------------------------
# Numeric checks
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_log_kernel_sum_error_stays_at_float32_level(mode):
  z, bank = _codes()
  lse, (gz, gb, glv) = MODES[mode](
    _lse_and_grads, jnp.asarray(z), jnp.asarray(bank), jnp.float32(LOG_VAR)
  )
  ref, rgz, rgb, rglv = _ref(z, bank, LOG_VAR)
  # float32 level: ~1e-5 of a nat here; one bfloat16 pass is off by tenths.
  assert np.max(np.abs(np.asarray(lse) - ref)) < 2e-3
  np.testing.assert_allclose(np.asarray(gz), rgz, rtol=0, atol=2e-3 * np.abs(rgz).max())
  np.testing.assert_allclose(np.asarray(gb), rgb, rtol=0, atol=2e-3 * np.abs(rgb).max())
  assert abs(float(glv) - rglv) < 2e-3 * abs(rglv) + 1e-2


@pytest.mark.parametrize("mode", sorted(MODES))
def test_topk_distances_stay_at_float32_level(mode):
  z, bank = _codes(b=32, n=900, seed=1)
  dist, idx = MODES[mode](
    lambda z, b: topk_neighbors(z, b, 5, chunk_size=128), jnp.asarray(z), jnp.asarray(bank)
  )
  d64 = ((z.astype(np.float64)[:, None] - bank.astype(np.float64)[None]) ** 2).sum(-1)
  true_d = np.sort(d64, axis=1)[:, :5]
  np.testing.assert_allclose(np.asarray(dist), true_d, rtol=1e-4, atol=1e-4)
  got = np.take_along_axis(d64, np.asarray(idx), axis=1)
  np.testing.assert_allclose(got, true_d, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_pruned_sum_stays_at_float32_level(mode, xla_forward):
  z, bank = _codes(b=64, n=800, seed=2)
  c = z.mean(0)
  res = MODES[mode](
    lambda z, c, b: pruned_log_kernel_sum(z, c, b, jnp.float32(LOG_VAR), keep=800),
    jnp.asarray(z),
    jnp.asarray(c),
    jnp.asarray(bank),
  )
  ref = _ref(z, bank, LOG_VAR)[0]
  assert np.max(np.abs(np.asarray(res.lse) - ref)) < 2e-3


@pytest.mark.parametrize("mode", sorted(MODES))
def test_vampprior_mixture_stays_at_float32_level(mode):
  rng = np.random.default_rng(3)
  mu = (1.5 * rng.normal(size=(50, D))).astype(np.float32)
  logvar = (np.log(0.05) + 0.3 * rng.normal(size=(50, D))).astype(np.float32)
  z = (mu[7] + 0.2 * rng.normal(size=(40, D))).astype(np.float32)
  out = MODES[mode](mixture_diag_log_prob, jnp.asarray(z), jnp.asarray(mu), jnp.asarray(logvar))
  z64, mu64, lv64 = (a.astype(np.float64) for a in (z, mu, logvar))
  quad = (((z64[:, None] - mu64[None]) ** 2) / np.exp(lv64)[None]).sum(-1)
  log_comp = -0.5 * (D * math.log(2 * math.pi) + lv64.sum(-1)[None] + quad)
  ref = logsumexp(log_comp, axis=1) - math.log(50)
  # Variances ~0.05 make the quadratic form ~1e3 nats before cancellation.
  assert np.max(np.abs(np.asarray(out) - ref)) < 5e-3


def test_emulation_is_what_it_claims():
  """The emulated default really rounds an unpinned dot and leaves a pinned one exact
  (otherwise the checks above would pass vacuously)."""
  rng = np.random.default_rng(4)
  a = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  loose = emulate_low_precision(lambda a, b: a @ b, a, b)
  pinned = emulate_low_precision(lambda a, b: jnp.matmul(a, b, precision="highest"), a, b)
  assert np.max(np.abs(np.asarray(loose) - ref)) > 1e-2
  assert np.max(np.abs(np.asarray(pinned) - ref)) < 1e-4


# ------------------------------------------------------------------------------
# The lowered programs pin every dot
# ------------------------------------------------------------------------------


def _lowered_cases():
  z, bank = (jnp.asarray(a) for a in _codes(b=16, n=300))
  lv = jnp.float32(LOG_VAR)
  ids = jnp.arange(300, dtype=jnp.int32)
  kw = dict(bank_ids=ids, query_ids=ids[:16], bank_mask=ids % 7 != 0, chunk_size=64, impl="xla")
  fwd = lambda z, b, lv: log_kernel_sum(z, b, lv, **kw)[0].sum()
  mu, logvar = bank[:20], jnp.full((20, D), -2.0)
  return {
    "log_kernel_sum": (fwd, (z, bank, lv)),
    "log_kernel_sum_grad": (jax.grad(fwd, (0, 1, 2)), (z, bank, lv)),
    "log_kernel_sum_bf16_bank": (
      lambda z, b, lv: log_kernel_sum(z, b, lv, bank_dtype=jnp.bfloat16, chunk_size=64)[0],
      (z, bank, lv),
    ),
    "topk_neighbors": (
      lambda z, b: topk_neighbors(
        z, b, 4, chunk_size=64, **{k: kw[k] for k in ("bank_ids", "query_ids", "bank_mask")}
      ),
      (z, bank),
    ),
    "pruned_log_kernel_sum": (
      lambda z, b, lv: pruned_log_kernel_sum(z, z[0], b, lv, keep=128).lse,
      (z, bank, lv),
    ),
    "vampprior": (mixture_diag_log_prob, (z, mu, logvar)),
    "vampprior_grad": (
      jax.grad(lambda z, m, v: mixture_diag_log_prob(z, m, v).sum(), (0, 1, 2)),
      (z, mu, logvar),
    ),
  }


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*")


@pytest.mark.parametrize("name", sorted(_lowered_cases()))
def test_every_distance_dot_is_pinned_to_highest(name, xla_forward):
  fn, args = _lowered_cases()[name]
  with jax.default_matmul_precision("bfloat16"):
    text = jax.jit(fn).lower(*args).as_text()
  dots = _DOT.findall(text)
  assert dots, "no dot_general found: the check would be vacuous"
  loose = [d for d in dots if "precision = [HIGHEST, HIGHEST]" not in d]
  assert not loose, f"{len(loose)} of {len(dots)} dots not pinned, e.g. {loose[0][:200]}"
