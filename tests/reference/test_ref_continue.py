"""reference/ref_continue.py carries the reference's AdamNormGrad state over to exvae.

The continuation compares how fast the two codes learn from one shared state,
so exvae must continue with the reference's moments and step count, not a
fresh optimiser.  The mapped state's next update is checked against a NumPy
transcription of PyTorch's Adam step (the reference's AdamNormGrad), tensor
by tensor under the reference's names; a transposed, swapped or mis-counted
moment makes it fail.
"""

import jax
import numpy as np
import pytest

from conftest import load_config

from reference import ref_continue, ref_step_check


def _reference_tensors(params, rng, positive=False):
  """Random tensors under the reference's names, shaped as the reference stores them."""
  out = {}
  draw = (lambda s: rng.uniform(1e-6, 1e-3, s)) if positive else (lambda s: rng.normal(0, 1e-2, s))
  for path, name in ref_step_check.param_map().items():
    node = ref_step_check._node(params["model"], path)
    out[f"{name}.weight"] = draw(node["kernel"].shape[::-1]).astype(np.float32)  # (out, in)
    out[f"{name}.bias"] = draw(node["bias"].shape).astype(np.float32)
  out["prior_log_variance"] = draw((1,)).astype(np.float32)
  return out


def _fresh_state(c):
  """``(setup, state)`` at step 0: parameters and optimiser only (no RAT cache refresh,
  which these tests do not need and which costs a compile)."""
  from exvae import train_lib

  splits = train_lib.load_data(c)
  setup = train_lib.make_setup(c, splits)
  return setup, train_lib.init_state(c, setup, splits.train_x.shape[0])


def _torch_adamnormgrad(g, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
  """One AdamNormGrad step's parameter change for one tensor (PyTorch's order of operations)."""
  g = g / (np.sqrt(np.sum(g.astype(np.float64) ** 2)) + 1e-7)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  t = step + 1
  return -lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)


@pytest.mark.parametrize("step", [1, 26000])
def test_mapped_state_takes_the_references_next_step(step):
  c = load_config("test", prior="exemplar")
  setup, state = _fresh_state(c)
  rng = np.random.default_rng(step)
  w = {}
  for prefix, positive in (("m/", False), ("v/", True)):
    w.update({prefix + k: a for k, a in _reference_tensors(state.params, rng, positive).items()})
  opt_state = ref_continue.adam_state_from_reference(setup.optimizer, w, state.params, step)
  grads_ref = _reference_tensors(state.params, rng)
  grads = ref_step_check.reference_params(grads_ref, state.params["model"])
  updates, new_state = jax.jit(setup.optimizer.update)(grads, opt_state, state.params)
  assert int(new_state[1].count) == step + 1
  lr = float(c.learning_rate)
  for path, name in ref_step_check.param_map().items():
    node = ref_step_check._node(updates["model"], path)
    for part, got in (("weight", np.asarray(node["kernel"]).T), ("bias", np.asarray(node["bias"]))):
      key = f"{name}.{part}"
      want = _torch_adamnormgrad(grads_ref[key], w["m/" + key], w["v/" + key], step, lr)
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9, err_msg=key)
  want = _torch_adamnormgrad(
    grads_ref["prior_log_variance"], w["m/prior_log_variance"], w["v/prior_log_variance"], step, lr
  )
  np.testing.assert_allclose(np.asarray(updates["prior"]["log_var"]), want[0], rtol=2e-5)


def test_an_optimiser_without_adam_is_refused():
  import optax

  c = load_config("test", prior="exemplar")
  _, state = _fresh_state(c)
  w = {}
  for prefix in ("m/", "v/"):
    w.update(
      {
        prefix + k: a
        for k, a in _reference_tensors(state.params, np.random.default_rng(0), True).items()
      }
    )
  with pytest.raises(ValueError, match="not AdamNormGrad"):
    ref_continue.adam_state_from_reference(optax.sgd(0.1), w, state.params, 3)


def test_fresh_start_is_a_fresh_optimiser():
  """--ref_fresh_seed hands exvae zero moments at step 0: exactly optax's fresh state."""
  c = load_config("test", prior="exemplar")
  setup, state = _fresh_state(c)
  w = {}
  for prefix in ("m/", "v/"):
    w.update(
      {
        prefix + k: np.zeros_like(a)
        for k, a in _reference_tensors(state.params, np.random.default_rng(0)).items()
      }
    )
  mapped = ref_continue.adam_state_from_reference(setup.optimizer, w, state.params, 0)
  fresh = setup.optimizer.init(state.params)
  assert jax.tree.structure(mapped) == jax.tree.structure(fresh)
  for got, want in zip(jax.tree.leaves(mapped), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fresh_seed_refuses_other_reference_seeds(capsys):
  with pytest.raises(SystemExit) as e:
    ref_continue.main(["--ref_fresh_seed", "20", "--ref_seeds", "21", "--out", "/tmp/unused"])
  assert e.value.code == 2
  assert "can only run with that seed" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ref_continue.main(["--ref_fresh_seed", "20", "--ref_checkpoint", "x.pth", "--out", "/tmp/u"])
