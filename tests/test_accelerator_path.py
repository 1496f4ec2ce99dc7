"""The code path taken on a GPU or TPU: no CPU custom call, no host syncs, donation,
and the streamed memory bound.

These run on any backend (`bench/device_check.py` runs them on the GPU); the
non-CPU backend of the first test is simulated on a CPU by patching the backend
query that the dispatch code uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from exvae import evaluation, train_lib
from exvae.kernels import cpu_fused, log_kernel_sum, pruned_log_kernel_sum, topk_neighbors

_FUSED_TARGETS = ("exvae_fused_lse", "exvae_column_median")


def _setups(rats=(False, True)):
  """(config, splits, setup) of the tiny config, exact and/or RAT exemplar prior."""
  out = []
  for rat in rats:
    c = load_config("test", **{"exemplar.rat": rat})
    splits = train_lib.load_data(c)
    out.append((c, splits, train_lib.make_setup(c, splits)))
  return out


@pytest.fixture
def gpu_backend(monkeypatch):
  """The process looks like it runs on a GPU: `jax.default_backend()` answers "gpu",
  the fused library state is fresh, and building, loading or calling the fused
  kernel fails the test. Traces made before and during the test are dropped."""

  def forbidden(*args, **kwargs):
    raise AssertionError("the fused CPU kernel was built, loaded or called off CPU")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(cpu_fused, "_state", {})
  for name in ("_build", "_load", "fused_lse0", "column_median"):
    monkeypatch.setattr(cpu_fused, name, forbidden)
  monkeypatch.delenv("EXVAE_NO_FUSED", raising=False)
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.mark.slow
def test_fused_cpu_kernel_is_never_compiled_or_invoked_off_cpu(gpu_backend):
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(30, 40)), jnp.float32)
  bank = jnp.asarray(rng.normal(size=(300, 40)), jnp.float32)
  ids = jnp.arange(300, dtype=jnp.int32)
  fwd = lambda z, b, lv: log_kernel_sum(z, b, lv, bank_ids=ids, query_ids=ids[:30])[0].sum()
  programs = {
    "forward": (fwd, (z, bank, 0.0)),
    "gradient": (jax.grad(fwd, (0, 1, 2)), (z, bank, 0.0)),
    "topk": (lambda z, b: topk_neighbors(z, b, 5), (z, bank)),
    "pruned": (lambda z, b: pruned_log_kernel_sum(z, z[0], b, 0.0, keep=64).lse, (z, bank)),
  }
  for name, (fn, args) in programs.items():
    text = jax.jit(fn).lower(*args).as_text()
    assert not any(t in text for t in _FUSED_TARGETS), name
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(jax.jit(fn)(*args))[0]))), name
  # The training and evaluation steps of the exact prior (impl="auto" inside).
  for c, splits, setup in _setups(rats=(False,)):
    n = splits.train_x.shape[0]
    state = train_lib.init_state(c, setup, n)
    pool = jnp.asarray(splits.train_x)
    perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
    text = train_lib.train_step.lower(state, pool, perm, setup=setup).as_text()
    assert not any(t in text for t in _FUSED_TARGETS)
    state, m = train_lib.train_step(state, pool, perm, setup=setup)
    ctx = evaluation.eval_context(state.params, pool, jax.random.PRNGKey(0), setup=setup)
    x = jnp.asarray(splits.test_x[:4])
    text = evaluation.eval_batch.lower(
      state.params, ctx, x, jax.random.PRNGKey(1), setup=setup, num_samples=3
    ).as_text()
    assert not any(t in text for t in _FUSED_TARGETS)
    assert np.isfinite(float(m["loss"]))
  assert not cpu_fused.available()
  with pytest.raises(RuntimeError, match="unavailable"):
    log_kernel_sum(z, bank, 0.0, impl="fused")


def test_default_chunks_follow_the_backend(monkeypatch):
  """Cache-sized tiles on CPU; on an accelerator, few large chunks (each one costs
  launches and a loop step): at B = 5000, N = 1e6 under 200 chunks."""
  from exvae.kernels import default_chunk_size

  assert default_chunk_size(5000, 1_000_000, "cpu") == 384
  assert 1_000_000 / default_chunk_size(5000, 1_000_000, "gpu") < 200
  assert default_chunk_size(100, 25_000, "tpu") == 25_000  # a training batch: one chunk
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert default_chunk_size(5000, 1_000_000) == default_chunk_size(5000, 1_000_000, "gpu")


@pytest.mark.slow
def test_steps_need_no_host_transfer_and_donate_the_state():
  """Refresh, train and evaluation steps run with implicit transfers disallowed
  (a host sync inside a step would raise), and the train step updates the donated
  state in place (the old buffers are deleted)."""
  for c, splits, setup in _setups():
    n = splits.train_x.shape[0]
    state = train_lib.init_state(c, setup, n)
    pool = jnp.asarray(splits.train_x)
    perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
    x = jnp.asarray(splits.test_x[:8])
    k_ctx, k_eval = jax.random.split(jax.random.PRNGKey(0))
    state, _ = train_lib.train_step(state, pool, perm, setup=setup)  # compile outside
    before = state
    with jax.transfer_guard("disallow"):
      for _ in range(3):
        state = train_lib.refresh_step(state, pool, setup=setup)
        state, metrics = train_lib.train_step(state, pool, perm, setup=setup)
      ctx = evaluation.eval_context(state.params, pool, k_ctx, setup=setup)
      out = evaluation.eval_batch(state.params, ctx, x, k_eval, setup=setup, num_samples=4)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(before.params))
    assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))
    assert np.all(np.isfinite(np.asarray(out["lse_w"])))


@pytest.mark.parametrize("program", ["forward", "gradient", "topk"])
def test_streamed_memory_does_not_grow_with_the_bank(program):
  """XLA's working memory is O(B * chunk + N * d): 4x the bank adds no B x N buffer."""
  b, d, chunk = 200, 40, 1024
  fns = {
    "forward": lambda z, bk, lv: log_kernel_sum(z, bk, lv, impl="xla", chunk_size=chunk)[0],
    "gradient": jax.grad(
      lambda z, bk, lv: log_kernel_sum(z, bk, lv, impl="xla", chunk_size=chunk)[0].sum(), (0, 1, 2)
    ),
    "topk": lambda z, bk, lv: topk_neighbors(z, bk, 10, chunk_size=chunk),
  }
  temp = {}
  for n in (20_000, 80_000):
    args = (
      jax.ShapeDtypeStruct((b, d), jnp.float32),
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
    )
    temp[n] = jax.jit(fns[program]).lower(*args).compile().memory_analysis().temp_size_in_bytes
  grown = temp[80_000] - temp[20_000]
  per_code = 60_000 * d * 4  # one more (N, d) float32 array
  allowed = 2 * per_code if program == "gradient" else 0  # the bank's cotangent
  assert grown <= allowed + 2**20, (temp, b * 60_000 * 4)
