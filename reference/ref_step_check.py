"""Step-by-step check of exvae's RAT training step against the authors' code.

  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python reference/ref_step_check.py [--ref_checkpoint DIR/checkpoint_last.pth] [--steps 5]

Both codes take the same optimisation steps from the same weights on the same
randomness, and every intermediate is compared:

1. exvae draws everything random for ``--steps`` steps of epoch ``--epoch``
   with its own keys (batch ids, the binarised batch, the reparameterisation
   noise, the M candidate exemplars of RAT) and writes them to a file.
2. The reference (``reference/ref_step_check.py --side torch``, run by
   ``$EXVAE_REF_PYTHON`` through ``../shared/reference/driver.py``) builds its
   model (fresh, seed ``--seed``, or the weights of ``--ref_checkpoint``),
   computes its epoch-start cache, then runs THEIR ``calculate_loss`` /
   ``backward`` / ``AdamNormGrad.step`` on those inputs: ``torch.randint``
   and ``model.reparameterize`` are patched to return exvae's draws, nothing
   else is touched.  It records loss, RE, KL, every gradient of the first
   step, the cache and the parameters after each step.
3. exvae loads the reference's starting weights and runs its jitted
   ``train_step`` on the same steps.

It prints the relative difference of each quantity (float32 level, ~1e-6 to
1e-4, means the two steps are the same computation) and ends with one line
``max_rel_grad=... max_rel_param=... max_loss_diff=...``.  It needs the
reference installed (see bench/vs_reference.py); it is not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per model: the exvae config, the reference's --model_name, and how exvae's parameter
# paths name the reference's state_dict tensors (weights transposed): gated layers
# (their h and g halves) and plain dense layers.
MODELS = {
  "vae": {
    "config": "fashion_vae_exemplar_rat",
    "model_name": "vae",
    "gated": {
      ("enc_0",): "q_z_layers.0",
      ("enc_1",): "q_z_layers.1",
      ("dec_0",): "p_x_layers.0",
      ("dec_1",): "p_x_layers.1",
    },
    "dense": {
      ("enc_mu",): "q_z_mean",
      ("enc_logvar",): "q_z_logvar.linear",
      ("dec_out",): "p_x_mean.linear",
    },
  },
  "hvae": {
    "config": "fashion_hvae_exemplar_rat",
    "model_name": "hvae_2level",
    "gated": {
      ("q_z2_0",): "q_z_layers.0",
      ("q_z2_1",): "q_z_layers.1",
      ("q_z1_x",): "q_z1_layers_x.0",
      ("q_z1_z2",): "q_z1_layers_z2.0",
      ("q_z1_joint",): "q_z1_layers_joint.0",
      ("p_z1_0",): "p_z1_layers_z2.0",
      ("p_z1_1",): "p_z1_layers_z2.1",
      ("p_x_z1",): "p_x_layers_z1.0",
      ("p_x_z2",): "p_x_layers_z2.0",
      ("p_x_joint",): "p_x_layers_joint.0",
    },
    "dense": {
      ("q_z2_head", "mu"): "q_z_mean",
      ("q_z2_head", "logvar"): "q_z_logvar.linear",
      ("q_z1_head", "mu"): "q_z1_mean",
      ("q_z1_head", "logvar"): "q_z1_logvar.linear",
      ("p_z1_head", "mu"): "p_z1_mean",
      ("p_z1_head", "logvar"): "p_z1_logvar.linear",
      ("p_x_head", "out"): "p_x_mean.linear",
    },
  },
}


def param_map(model: str = "vae") -> dict[tuple[str, ...], str]:
  """exvae model-parameter path -> reference tensor name (without .weight / .bias).

  Args:
    model: a key of :data:`MODELS`.
  """
  spec = MODELS[model]
  out = {}
  for ex, ref in spec["gated"].items():
    for half in ("h", "g"):
      out[ex + (half,)] = f"{ref}.{half}"
  out.update(spec["dense"])
  return out


def _node(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def reference_params(weights, template_model, prefix: str = "", model_kind: str = "vae") -> dict:
  """exvae ``{"model", "prior"}`` parameters holding the reference's tensors.

  Args:
    weights: mapping from ``prefix + <state_dict name>`` to NumPy arrays.
    template_model: exvae model parameters (structure and dtypes only).
    prefix: key prefix of the reference's tensors in ``weights``.
    model_kind: a key of :data:`MODELS`.
  """
  import jax
  import jax.numpy as jnp

  pmap = param_map(model_kind)
  n_leaves = len(jax.tree.leaves(template_model))
  if n_leaves != 2 * len(pmap):  # kernel and bias of each mapped layer, nothing left out
    raise ValueError(f"{model_kind}: {n_leaves} exvae tensors, {2 * len(pmap)} mapped")
  model = jax.tree.map(np.asarray, template_model)
  for path, name in pmap.items():
    node = _node(model, path)
    node["kernel"] = weights[f"{prefix}{name}.weight"].T.copy()
    node["bias"] = weights[f"{prefix}{name}.bias"].copy()
  return {
    "model": jax.tree.map(jnp.asarray, model),
    "prior": {"log_var": jnp.asarray(weights[f"{prefix}prior_log_variance"][0], jnp.float32)},
  }


def rel_by_name(params, weights, prefix: str, model_kind: str = "vae") -> dict[str, float]:
  """|exvae - reference| / |reference| per reference tensor, for a ``{"model", "prior"}`` tree."""
  out = {}
  for path, name in param_map(model_kind).items():
    node = _node(params["model"], path)
    out[f"{name}.weight"] = _rel(np.asarray(node["kernel"]).T, weights[f"{prefix}{name}.weight"])
    out[f"{name}.bias"] = _rel(node["bias"], weights[f"{prefix}{name}.bias"])
  out["prior_log_variance"] = _rel(
    params["prior"]["log_var"], weights[f"{prefix}prior_log_variance"][0]
  )
  return out


# ---------------------------------------------------------------------------
# The reference's side (runs under $EXVAE_REF_PYTHON)
# ---------------------------------------------------------------------------


def their_loss_backward(model, opt, batch, beta, cache, dataset, eps=None, cand=None):
  """Their ``calculate_loss`` and ``backward`` on one batch (gradients left in the
  model for ``opt.step()``), with the given reparameterisation noise ``eps`` and RAT
  candidates ``cand`` (torch tensors) in place of their own draws when given.

  The patches (``model.reparameterize``, ``torch.randint``) hold for this call only:
  their validation and the next step see their own methods again.
  Returns their (loss, RE, KL) tensors.
  """
  import torch

  real_randint = torch.randint
  if eps is not None:
    # One noise tensor per reparameterisation, in call order (z, or z2 then z1).
    noise = list(eps) if isinstance(eps, (list, tuple)) else [eps]

    def reparameterize(mu, logvar):
      if not noise:
        raise RuntimeError("the reference drew more reparameterisation noise than given")
      return noise.pop(0).mul(logvar.mul(0.5).exp()).add(mu)

    model.reparameterize = reparameterize
  if cand is not None:
    torch.randint = lambda *a, **k: cand.clone()
  try:
    opt.zero_grad()
    loss, re_, kl = model.calculate_loss(batch, beta, average=True, cache=cache, dataset=dataset)
    loss.backward()
  finally:
    torch.randint = real_randint
    model.__dict__.pop("reparameterize", None)
  return loss, re_, kl


def torch_side(
  io_dir: str,
  driver_path: str,
  seed: int,
  threads: int,
  checkpoint: str | None,
  model_kind: str = "vae",
):
  sys.path.insert(0, os.path.dirname(os.path.abspath(driver_path)))
  import driver  # noqa: E402  (puts the shim and the authors' tree on the path)
  import torch

  inp = np.load(os.path.join(io_dir, "in.npz"))
  argv = driver.their_argv(
    "rat", seed=seed, extra=["--model_name", MODELS[model_kind]["model_name"]]
  )
  args, train_loader, _, _, model, opt = driver.build(argv, threads)
  if checkpoint:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
  model.train()
  dataset = train_loader.dataset
  out = {f"init/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
  out["pool_rows"] = dataset.tensors[0][torch.from_numpy(inp["ids"][0].astype(np.int64))].numpy()
  with torch.no_grad():
    cached_z, cached_log_var = model.cache_z(dataset)
  cache = (cached_z, cached_log_var)
  out["cache0"] = cached_z.numpy().copy()
  epoch = int(inp["epoch"])
  beta = min(1.0, epoch / args.warmup)  # their set_beta (epoch is 1-based there)
  names = [n for n, _ in model.named_parameters()]
  for s in range(inp["ids"].shape[0]):
    x = torch.from_numpy(inp["x"][s])
    ids = torch.from_numpy(inp["ids"][s].astype(np.int64)).reshape(-1, 1)
    eps = [torch.from_numpy(inp["eps"][s])]
    if "eps1" in inp:
      eps.append(torch.from_numpy(inp["eps1"][s]))
    loss, re_, kl = their_loss_backward(
      model,
      opt,
      (x, ids),
      beta,
      cache,
      dataset,
      eps=eps,
      cand=torch.from_numpy(inp["cand"][s].astype(np.int64)),
    )
    if s == 0:
      for n, p in model.named_parameters():
        out[f"grad/{n}"] = p.grad.detach().numpy().copy()
    opt.step()
    cache = (cache[0].detach(), cache[1].detach())
    out[f"loss/{s}"] = np.float64(loss.item())
    out[f"re/{s}"] = np.float64(-re_.item())
    out[f"kl/{s}"] = np.float64(kl.item())
    out[f"cache/{s}"] = cache[0].numpy().copy()
  out.update({f"final/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()})
  out["beta"] = np.float64(beta)
  out["names"] = np.array(names)
  np.savez(os.path.join(io_dir, "out.npz"), **out)


# ---------------------------------------------------------------------------
# exvae's side
# ---------------------------------------------------------------------------


def exvae_draws(base_key, setup, pool, perm, step0: int, steps: int, m: int) -> dict:
  """Everything random in exvae's training steps ``step0 .. step0 + steps - 1``.

  Derived with the keys exvae's ``train_step`` uses (``train_batch``, then
  ``elbo_loss``'s split into the prior's and the sampler's keys, then the
  exemplar prior's split into the candidate draw and the binarisation key).

  Returns:
    dict of stacked arrays: ``x`` (T, B, H*W*C) binarised batch, ``ids`` (T, B),
    ``eps`` (T, B, d) reparameterisation noise of z (z2 for a two-level model),
    ``eps1`` (T, B, d1) that of z1 (two-level models only), ``cand`` (T, m) the
    RAT candidates.
  """
  import jax
  import jax.numpy as jnp
  from exvae import train_lib
  from exvae.models import hvae

  d = setup.model.latent_dim
  d1 = getattr(setup.model.module, "z1_dim", None)
  n = pool.shape[0]
  draws = {"x": [], "ids": [], "eps": [], "cand": []} | ({"eps1": []} if d1 else {})
  for s in range(steps):
    x, ids, k_loss = train_lib.train_batch(base_key, jnp.int32(step0 + s), pool, perm, setup=setup)
    k_ctx, k_z = jax.random.split(k_loss)  # objectives.elbo_loss
    b = x.shape[0]
    if d1:  # models.hvae.hierarchical_noise
      eps2, eps1 = hvae.hierarchical_noise(k_z, b, 1, d, int(d1))
      noise = {"eps": eps2[:, 0], "eps1": eps1[:, 0]}
    else:  # models.vae.gaussian_score
      noise = {"eps": jax.random.normal(k_z, (b, 1, d))[:, 0]}
    k_idx, _ = jax.random.split(k_ctx)  # ExemplarPrior.context
    cand = jax.random.randint(k_idx, (m,), 0, n, dtype=jnp.int32)
    for k, v in (("x", np.asarray(x).reshape(b, -1)), ("ids", ids), ("cand", cand), *noise.items()):
      draws[k].append(np.asarray(v))
  return {k: np.stack(v) for k, v in draws.items()}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--side", default="exvae", choices=("exvae", "torch"))
  ap.add_argument("--io", default=None, help="(internal) exchange directory")
  ap.add_argument("--driver", default=None, help="(internal) path of driver.py")
  ap.add_argument(
    "--ref_checkpoint",
    default=None,
    help="a reference checkpoint (.pth) to start from; default: their fresh "
    "initialisation with --seed",
  )
  ap.add_argument("--seed", type=int, default=15, help="the reference's seed (fresh init)")
  ap.add_argument(
    "--epoch", type=int, default=50, help="1-based epoch the steps belong to (sets the KL weight)"
  )
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument(
    "--model",
    default="vae",
    choices=sorted(MODELS),
    help="vae: the MLP VAE (fashion_vae_exemplar_rat, their vae); hvae: the "
    "two-level MLP HVAE (fashion_hvae_exemplar_rat, their hvae_2level)",
  )
  args = ap.parse_args(argv)
  if args.steps < 1 or args.epoch < 1:
    ap.error("--steps and --epoch must be >= 1")
  if args.side == "torch":
    torch_side(args.io, args.driver, args.seed, args.threads, args.ref_checkpoint, args.model)
    return 0

  sys.path.insert(0, ROOT)
  from bench.vs_reference import require_reference

  py, src, drv = require_reference()

  import jax
  import jax.numpy as jnp
  from exvae import config_registry, train_lib
  from exvae.objectives import elbo_loss, kl_beta

  config = config_registry.get_config(MODELS[args.model]["config"])
  config.progress = False
  splits = train_lib.load_data(config)
  setup = train_lib.make_setup(config, splits)
  pool = jnp.asarray(splits.train_x)
  n = splits.train_x.shape[0]
  state = train_lib.init_state(config, setup, n)
  e0 = args.epoch - 1  # exvae's 0-based epoch
  step0 = e0 * setup.steps_per_epoch
  perm = jnp.asarray(train_lib.epoch_permutation(config.seed, e0, n))
  m = int(config.exemplar.num_exemplars)

  # 1. exvae's randomness for each step (it does not depend on the weights).
  draws = exvae_draws(state.key, setup, pool, perm, step0, args.steps, m)
  io = tempfile.mkdtemp(prefix="exvae_ref_step_")
  np.savez(os.path.join(io, "in.npz"), epoch=args.epoch, **draws)

  # 2. The reference's steps.
  cmd = [
    py,
    "-u",
    os.path.abspath(__file__),
    "--side",
    "torch",
    "--io",
    io,
    "--driver",
    drv,
    "--seed",
    str(args.seed),
    "--threads",
    str(args.threads),
    "--model",
    args.model,
  ]
  if args.ref_checkpoint:
    cmd += ["--ref_checkpoint", os.path.abspath(os.path.expanduser(args.ref_checkpoint))]
  proc = subprocess.run(
    cmd, env=dict(os.environ, EXVAE_REF_SRC=src), capture_output=True, text=True
  )
  if proc.returncode != 0:
    print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    print(f"the reference's side failed (exit {proc.returncode})", file=sys.stderr)
    return 1
  ref = np.load(os.path.join(io, "out.npz"))

  # 3. exvae from the reference's weights.
  pool_err = float(
    np.abs(
      ref["pool_rows"] - np.asarray(pool[draws["ids"][0]]).reshape(len(draws["ids"][0]), -1)
    ).max()
  )
  params = reference_params(ref, state.params["model"], prefix="init/", model_kind=args.model)
  state = state.replace(
    params=params, opt_state=setup.optimizer.init(params), step=jnp.int32(step0)
  )
  state = train_lib.refresh_step(state, pool, setup=setup)
  rows = [
    ("data: pool rows of the first batch, max |diff|", pool_err),
    ("epoch-start cache, rel", _rel(state.prior_state["cache"], ref["cache0"])),
    (
      "KL weight beta (exvae - ref)",
      float(kl_beta(jnp.int32(step0), setup.steps_per_epoch, setup.warmup_epochs))
      - float(ref["beta"]),
    ),
  ]

  x0 = jnp.asarray(draws["x"][0]).reshape((-1,) + splits.image_shape)
  ids0 = jnp.asarray(draws["ids"][0])
  _, k_loss0 = train_lib.train_batch(state.key, jnp.int32(step0), pool, perm, setup=setup)[1:]
  beta = kl_beta(jnp.int32(step0), setup.steps_per_epoch, setup.warmup_epochs)
  grad_fn = jax.jit(jax.value_and_grad(elbo_loss, has_aux=True), static_argnames=("setup",))
  (_, (metrics0, _)), grads = grad_fn(
    state.params, state.prior_state, setup, x0, ids0, k_loss0, beta, pool
  )
  grad_rel = rel_by_name(grads, ref, "grad/", args.model)

  loss_diffs = []
  step_rows = []
  for s in range(args.steps):
    state, metrics = train_lib.train_step(state, pool, perm, setup=setup)
    dl = float(metrics["loss"]) - float(ref[f"loss/{s}"])
    dre = float(metrics["recon"]) - float(ref[f"re/{s}"])
    dkl = float(metrics["kl"]) - float(ref[f"kl/{s}"])
    loss_diffs.append(abs(dl))
    step_rows.append(
      (
        s,
        float(ref[f"loss/{s}"]),
        dl,
        dre,
        dkl,
        _rel(state.prior_state["cache"], ref[f"cache/{s}"]),
      )
    )
  final_rel = rel_by_name(state.params, ref, "final/", args.model)
  init_rel = {}  # how far the parameters moved, for scale
  for _path, name in param_map(args.model).items():
    init_rel[f"{name}.weight"] = _rel(ref[f"final/{name}.weight"], ref[f"init/{name}.weight"])

  print(
    f"model: {args.model} ({MODELS[args.model]['config']} against their "
    f"{MODELS[args.model]['model_name']})"
  )
  print(
    f"start: {'checkpoint ' + args.ref_checkpoint if args.ref_checkpoint else 'fresh, seed %d' % args.seed}"
    f"; epoch {args.epoch} (beta {float(ref['beta']):.2f}), {args.steps} steps"
  )
  for name, v in rows:
    print(f"  {name}: {v:.3g}")
  print(f"  step 0 loss: exvae {float(metrics0['loss']):.5f}  ref {float(ref['loss/0']):.5f}")
  print("gradients of step 0, |g_exvae - g_ref| / |g_ref|:")
  for k, v in grad_rel.items():
    print(f"  {k:32s} {v:.3g}")
  print("per step: ref loss, exvae - ref (loss, RE, KL), cache rel")
  for s, l, dl, dre, dkl, c in step_rows:
    print(f"  {s:3d} {l:10.4f} {dl:+.2e} {dre:+.2e} {dkl:+.2e} {c:.2e}")
  print(f"parameters after {args.steps} steps, rel diff (and rel move of the ref's weights):")
  for k, v in final_rel.items():
    mv = init_rel.get(k)
    print(f"  {k:32s} {v:.3g}" + (f"   (moved {mv:.3g})" if mv is not None else ""))
  summary = {
    "max_rel_grad": max(grad_rel.values()),
    "max_rel_param": max(final_rel.values()),
    "max_loss_diff": max(loss_diffs),
  }
  print(" ".join(f"{k}={v:.3g}" for k, v in summary.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
