"""Training speed: steps/s, seconds per epoch and the arithmetic of one step, for each prior.

Usage: python bench/train_speed.py [--configs rat,exact,gaussian,vampprior] [--steps 60]
                                   [--model vae|hvae|convhvae|pixelcnn]
                                   [--matmul_dtype float32|bfloat16] [--matmul_dtype_ab ROUNDS]
                                   [--profile] [--out results/speed]
                                   [--options_ab ROUNDS --options 'k=v,k2=v2;k=v3']
                                   [--rat_compact 0|1] [--rat_compact_ab ROUNDS --rat_chunks 125]
                                   [--objectives_ab ROUNDS --objective_samples 5]

Uses the genuine Fashion-MNIST if installed (50000 training images, batch 100,
500 steps per epoch), else random binary images of the same size (speed does
not depend on pixel values).  For each prior it prints the time per step and
per epoch, then (MLP VAE) the FLOP account of one step: matrix-product
FLOPs of the forward pass, the backward pass and the rematerialised forward,
split into the batch, the exemplars encoded with gradients, the retrieval and
the prior kernel; and the fraction of the machine's float32 matmul rate
(2048^3, measured in the same run) that the step achieves.  XLA's own count
of the compiled step's FLOPs is printed beside it as a check.  The figures
go to ``<out>/train_speed.json`` (per config: ms per step, GFLOP per step,
the achieved rate and its share of the matmul rate; the machine, the load
and the provenance).

``--profile``: instead, a per-operation profile of each config's compiled
train step over ``--steps`` steps (bench/op_profile.py: a jax.profiler trace
joined with the compiled HLO): time by kind of operation (matrix products by
shape, element-wise fusions, reductions, gathers and scatters, copies and
transposes, sorts) and by part of the step (batch networks, exemplar
encoder, retrieval, prior kernel, optimiser), printed and written to
``<out>/profile.json``; docs/speed.md shows it.

``--rat_compact_ab``: the RAT step encoding every row of its static B*k union
against encoding only the chunks that hold the union's distinct exemplars
(``exemplar.rat_compact``, one run per ``--rat_chunks`` chunk size): loss and
gradients of each at the same states, the distinct rows of those states'
unions, then alternated timings.  The plain timing mode prints each timed RAT
step's distinct union rows, and its FLOP account counts the rows encoded.

``--objectives_ab``: the train step under the ELBO, the k-sample IWAE bound
with reparameterised gradients and with DReG, timed in alternated rounds
(``<out>/objectives_<model>.json``; docs/objectives.md shows it).

``--options_ab``: the train step compiled with the default XLA options and
with each ``--options`` variant (e.g. which operations go to YNNPACK
library fusions): loss and gradients of each at one state, then alternated
timings.

Side-by-side figures against the authors' PyTorch code come from
bench/vs_reference.py, which runs both on the same machine in one run.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from exvae import config_registry, data, runinfo, train_lib
from exvae.config_base import base_config

TARGETS = {"rat": 9.0, "exact": 145.0}


# Config overrides of every timed run (--set): (dotted key, text) pairs applied last by
# make_config with the command line's own parser (exvae.config_registry.apply_overrides).
OVERRIDES: list = []


def parse_set(spec: str) -> list[tuple[str, str]]:
  """``'exemplar.encode_chunk=2500,seed=1'`` -> ``[('exemplar.encode_chunk', '2500'), ('seed', '1')]``."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"train_speed: --set takes key=value items, got {item!r}")
    out.append((key.strip(), value.strip()))
  return out


def make_config(name, model="vae", matmul_dtype="float32", rat_compact: bool | None = None):
  c = _make_config(name, model, matmul_dtype, rat_compact)
  try:
    return config_registry.apply_overrides(c, OVERRIDES)
  except config_registry.ConfigNameError as e:
    raise SystemExit(f"train_speed: --set: {e}") from None


def _make_config(name, model, matmul_dtype, rat_compact):
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = model
  c.matmul_dtype = matmul_dtype
  if rat_compact is not None:
    c.exemplar.rat_compact = rat_compact
  if name == "rat":
    c.prior, c.exemplar.rat = "exemplar", True
  elif name == "exact":
    c.prior, c.exemplar.rat = "exemplar", False
  else:
    c.prior = name
  return c


def load_splits():
  """Genuine Fashion-MNIST if installed, else random images of its size (speed only)."""
  try:
    splits = data.load("fashion_mnist")
    return splits, splits.source
  except data.DataNotFoundError:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(50000, 28, 28, 1)).astype(np.float32)
    v = (rng.uniform(size=(10000, 28, 28, 1)) < 0.286).astype(np.float32)
    splits = data.Splits("synthetic", x, None, v, None, v, None, True, "synthetic")
    return splits, "synthetic random images (Fashion-MNIST not installed)"


# ----------------------------------------------------------------------------
# Timing (also used by bench/vs_reference.py, which alternates it with the reference)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A compiled, warm training run of one config: time it in pieces with the functions below."""

  config: Any
  setup: Any
  state: Any
  perm: jax.Array
  compile_s: float
  grad_fn: Any = None
  metrics: Any = None


# Untimed RAT steps before any RAT timing (--rat_pretrain).  A RAT step's work
# depends on its state: from initialisation the codes are bunched, the B*k = 1000
# retrieved rows hold 280-870 distinct exemplars, and from about step 250 on
# 890-990 (Fashion-MNIST, measured every 50 steps over 6 epochs and at epoch 107
# of a paper-protocol run: 957-987).  Timing from initialisation times a step
# that training hardly ever takes.
RAT_PRETRAIN = 500


def _is_rat(c) -> bool:
  return c.prior == "exemplar" and bool(c.exemplar.rat)


def prepare(c, splits, pool, pretrain: int | None = None):
  """Builds the run of config ``c`` and compiles its refresh and train step (one of each).

  Args:
    c: the run's config.
    splits: the data (its sizes and binarisation).
    pool: the training images on the device.
    pretrain: untimed training steps before the run is returned, followed by
      an epoch-start refresh (None: :data:`RAT_PRETRAIN` for RAT, 0 otherwise).

  Returns:
    A :class:`Run`.
  """
  setup = train_lib.make_setup(c, splits)
  n = splits.train_x.shape[0]
  state = train_lib.init_state(c, setup, n)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  t0 = time.perf_counter()
  state = train_lib.refresh_step(state, pool, setup=setup)
  state, m = train_lib.train_step(state, pool, perm, setup=setup)
  jax.block_until_ready(m)
  run = Run(c, setup, state, perm, time.perf_counter() - t0)
  if pretrain is None:
    pretrain = RAT_PRETRAIN if _is_rat(c) else 0
  if pretrain > 0:
    time_steps(run, pool, pretrain)
    time_refresh(run, pool)
  return run


def time_steps(run: Run, pool, steps: int) -> float:
  """Mean seconds per train step over ``steps`` steps (dispatched back to back)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    run.state, m = train_lib.train_step(run.state, pool, run.perm, setup=run.setup)
  jax.block_until_ready(m)
  run.metrics = m
  return (time.perf_counter() - t0) / steps


def time_refresh(run: Run, pool) -> float:
  """Seconds of the epoch-start refresh (RAT: re-encoding the cache); 0 for other priors."""
  c = run.config
  if not (c.prior == "exemplar" and c.exemplar.rat):
    return 0.0
  t0 = time.perf_counter()
  run.state = train_lib.refresh_step(run.state, pool, setup=run.setup)
  jax.block_until_ready(run.state)
  return time.perf_counter() - t0


def time_config(c, splits, pool, steps):
  """Times config ``c``: its refresh once and ``steps`` train steps, after compiling both.

  Returns:
    dict: ``ms_per_step``, ``steps_per_s``, ``steps_per_epoch``, ``refresh_s``
    (the RAT cache re-encoding; 0 for other priors), ``epoch_s`` (the steps of
    an epoch plus the refresh), ``compile_s`` and the last step's ``loss``.
  """
  run = prepare(c, splits, pool)
  t_refresh = time_refresh(run, pool)
  dt = time_steps(run, pool, steps)
  spe = run.setup.steps_per_epoch
  return {
    "ms_per_step": dt * 1e3,
    "steps_per_s": 1.0 / dt,
    "steps_per_epoch": spe,
    "refresh_s": t_refresh,
    "epoch_s": dt * spe + t_refresh,
    "compile_s": run.compile_s,
    "loss": float(run.metrics["loss"]),
  }


@functools.partial(jax.jit, static_argnames=("setup",))
def _union_valid(state, pool, perm, *, setup):
  """RAT: components in this step's retrieved union (the rest of its B*k rows are masked)."""
  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  k_ctx, k_z = jax.random.split(key)
  model, params = setup.model, state.params
  sc = model.score(params["model"], x, k_z, 1, setup.log_lik)
  inputs = setup.context_inputs(pool, k_ctx, x=x, ids=ids, mu=sc.mu)
  ctx, _ = setup.prior.context(
    params["prior"], state.prior_state, model, params["model"], inputs, train=True
  )
  return ctx.bank_mask.sum()


def union_valid_rows(run: Run, pool) -> int:
  """RAT: distinct retrieved exemplars of the next step (what the reference encodes)."""
  return int(_union_valid(run.state, pool, run.perm, setup=run.setup))


def union_counts(run: Run, pool, state, steps: int) -> list[int]:
  """RAT: distinct exemplars in the union of each of ``steps`` steps taken from ``state``.

  Works on a copy (the train step donates its state): ``state`` and the run
  are left as they are.  Each count is the step's number of distinct rows,
  i.e. what the compact encoding covers with whole chunks.
  """
  state = jax.tree.map(jnp.copy, state)
  counts = []
  for _ in range(steps):
    counts.append(int(_union_valid(state, pool, run.perm, setup=run.setup)))
    state, _ = train_lib.train_step(state, pool, run.perm, setup=run.setup)
  return counts


def mean_flops(
  c, params, batch: int, num_train: int, steps_per_epoch: int, counts: list[int]
) -> dict | None:
  """:func:`step_flops` averaged over steps whose RAT unions hold ``counts`` distinct rows."""
  fs = [step_flops(c, params, batch, num_train, steps_per_epoch, union_rows=u) for u in counts]
  if not fs or fs[0] is None:
    return None
  return {k: float(np.mean([f[k] for f in fs])) for k in fs[0]}


def matmul_rate(reps: int = 3) -> float:
  """This machine's float32 2048^3 XLA matmul rate, FLOP/s (bench/prior_kernel.py's limit)."""
  from bench.prior_kernel import limit_fns, timeit

  mm, args = limit_fns()["matmul"]
  return 2.0 * 2048**3 / timeit(mm, *args, reps=reps)


# ----------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------


def dense_layers(params, prefix: str, exclude=()) -> list:
  """(fan_in, fan_out) of each dense layer whose name starts with ``prefix``, in order.

  A gated layer (``{"h": ..., "g": ...}``) counts as one layer of twice the width.
  """
  out = []
  for name in sorted(params):
    if not name.startswith(prefix) or name in exclude:
      continue
    p = params[name]
    kernels = [p["kernel"]] if "kernel" in p else [p[k]["kernel"] for k in sorted(p)]
    out.append((int(kernels[0].shape[0]), int(sum(k.shape[1] for k in kernels))))
  return out


def forward_flops(layers, rows: int) -> float:
  """Matrix-product FLOPs of the forward pass of ``layers`` over ``rows`` rows."""
  return float(sum(2 * rows * i * o for i, o in layers))


def backward_flops(layers, rows: int, input_grad_first: bool = False) -> float:
  """Weight gradients of every layer, input gradients of all but the first (data) layer."""
  w = forward_flops(layers, rows)
  x = forward_flops(layers if input_grad_first else layers[1:], rows)
  return w + x


def step_flops(
  c,
  params,
  batch: int,
  num_train: int,
  steps_per_epoch: int,
  union_rows: int | None = None,
  remat: bool | None = None,
  act_bytes_per_row: int | None = None,
  distinct: bool = True,
) -> dict | None:
  """Matrix-product FLOPs of one training step of the MLP VAE, by part.

  Args:
    c: the config (prior, exemplar and VampPrior sizes).
    params: the model's parameters (layer shapes; names ``enc_*``/``dec_*``).
    batch: B.
    num_train: N (the RAT cache refresh encodes all of it once per epoch).
    steps_per_epoch: steps over which the per-epoch refresh is spread.
    union_rows: RAT: the distinct exemplars in the step's retrieved union
      (None: B * k, none repeated).  exvae (``distinct``) encodes the whole
      chunks of ``exemplar.rat_compact_chunk`` rows that hold them (all B * k
      rows with ``exemplar.rat_compact`` off) and its prior kernel runs over
      the static B * k union (masked rows included); the reference
      (``distinct=False``) encodes and sums exactly ``union_rows``.  Averaged
      over steps, pass each step's count and average the dicts: the chunks
      round up per step.
    remat: exemplar forward recomputed in the backward pass (None: as the
      exemplar prior decides: when keeping the activations of all rows would
      exceed ``exemplar.encode_remat_mb``).
    act_bytes_per_row: the encoder's activation bytes per row for that
      decision (``exemplar.activation_bytes_per_row``; None: 16 bytes per
      unit of every encoder layer's matmul output, a gated layer's two halves
      included, plus the input row: the traced MLP VAE's count within 2%).
    distinct: exact prior: exvae encodes each distinct exemplar of the M draws
      once (``distinct_capacity`` rows, padded to whole chunks); False: all M
      rows (the reference).  RAT: see ``union_rows``.

  Returns:
    dict of FLOPs: ``batch_fwd``, ``batch_bwd``, ``exemplar_fwd``, ``exemplar_remat``,
    ``exemplar_bwd``, ``retrieval`` (RAT top-k distances), ``prior_fwd``,
    ``prior_bwd`` (the kernel), ``total`` (all of these), ``refresh_per_step``
    (per-epoch work / steps_per_epoch, not in ``total``) and ``exemplar_rows``;
    None for models other than the MLP VAE.
  """
  if "enc_0" not in params or "enc_mu" not in params:
    return None
  enc = dense_layers(params, "enc_")
  enc_mean = dense_layers(params, "enc_", exclude=("enc_logvar",))
  dec = dense_layers(params, "dec_")
  d = int(params["enc_mu"]["kernel"].shape[1])
  f = dict.fromkeys(
    (
      "batch_fwd",
      "batch_bwd",
      "exemplar_fwd",
      "exemplar_remat",
      "exemplar_bwd",
      "retrieval",
      "prior_fwd",
      "prior_bwd",
      "refresh_per_step",
    ),
    0.0,
  )
  f["batch_fwd"] = forward_flops(enc + dec, batch)
  f["batch_bwd"] = backward_flops(enc, batch) + backward_flops(dec, batch, input_grad_first=True)
  rows, comps = 0, 0
  if c.prior == "exemplar":
    m = int(c.exemplar.num_exemplars) or num_train
    if c.exemplar.rat:
      static = batch * int(c.exemplar.rat_k)
      rows = comps = static if union_rows is None else int(union_rows)
      if distinct:
        comps = static
        chunk = max(1, min(int(c.exemplar.rat_compact_chunk), static))
        rows = min(static, -(-rows // chunk) * chunk) if c.exemplar.rat_compact else static
      f["retrieval"] = 2.0 * batch * m * d
      f["refresh_per_step"] = forward_flops(enc_mean, num_train) / steps_per_epoch
    else:
      rows = comps = m
      if distinct and m < num_train:
        from exvae.priors.exemplar import balanced_chunk, distinct_capacity

        cap = distinct_capacity(num_train, m)
        chunk = balanced_chunk(cap, int(c.exemplar.encode_chunk))
        rows = min(m, -(-cap // chunk) * chunk)
    f["exemplar_fwd"] = forward_flops(enc_mean, rows)
    if remat is None:
      budget = float(c.exemplar.encode_remat_mb)
      if act_bytes_per_row is None:
        act_bytes_per_row = 16 * sum(o for _, o in enc_mean) + 4 * enc_mean[0][0]
      remat = budget >= 0 and rows * act_bytes_per_row > budget * 2**20
    if remat:
      f["exemplar_remat"] = f["exemplar_fwd"]
    f["exemplar_bwd"] = backward_flops(enc_mean, rows)
  elif c.prior == "vampprior":
    rows = comps = int(c.vampprior.num_pseudo)
    f["exemplar_fwd"] = forward_flops(enc, rows)
    f["exemplar_bwd"] = backward_flops(enc, rows, input_grad_first=True)  # pseudo-inputs learn
  if comps:
    n_mm = 2 if c.prior == "vampprior" else 1  # VampPrior: z^2 @ 1/var and z @ mu/var
    f["prior_fwd"] = n_mm * 2.0 * batch * comps * d
    f["prior_bwd"] = 2.0 * f["prior_fwd"]  # gradients w.r.t. both operands
  f["total"] = sum(v for k, v in f.items() if k != "refresh_per_step")
  f["exemplar_rows"] = rows
  return f


def xla_step_flops(run: Run, pool) -> float:
  """XLA's cost analysis of the compiled train step (all ops; a loop body counts once)."""
  lowered = train_lib.train_step.lower(run.state, pool, run.perm, setup=run.setup)
  ca = lowered.compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def describe_flops(f: dict, sec_per_step: float, rate: float) -> str:
  """One line: GFLOP per part, the total, its time at ``rate`` and the fraction achieved."""
  g = {k: v / 1e9 for k, v in f.items() if k != "exemplar_rows"}
  return (
    f"  flops/step (GFLOP, matmuls): batch fwd {g['batch_fwd']:.3f} bwd {g['batch_bwd']:.3f}"
    f" | exemplars x{f['exemplar_rows']:.0f} fwd {g['exemplar_fwd']:.3f} remat "
    f"{g['exemplar_remat']:.3f} bwd {g['exemplar_bwd']:.3f} | retrieval {g['retrieval']:.3f}"
    f" | prior kernel fwd {g['prior_fwd']:.3f} bwd {g['prior_bwd']:.3f} | total "
    f"{g['total']:.3f} (+ per-epoch refresh {g['refresh_per_step']:.3f}/step) -> "
    f"{f['total'] / rate * 1e3:.1f} ms at {rate / 1e9:.0f} GFLOP/s; step achieves "
    f"{f['total'] / sec_per_step / rate:.0%} of the matmul rate"
  )


# ----------------------------------------------------------------------------
# A/B of the rematerialisation in encode_rows (on: the old code; off: RAT's new default)
# ----------------------------------------------------------------------------


def prepare_with_remat(c, splits, pool, remat):
  """:func:`prepare` with ``encode_rows(remat=remat)`` (traced while it is patched in)."""
  from exvae.priors import exemplar

  orig = exemplar.encode_rows
  exemplar.encode_rows = functools.partial(orig, remat=remat)
  try:
    run = prepare(c, splits, pool)
    run.grad_fn = jax.jit(functools.partial(_loss_and_grads, setup=run.setup))
    jax.block_until_ready(run.grad_fn(run.state, pool, run.perm))  # traced under the patch
  finally:
    exemplar.encode_rows = orig
  return run


def _loss_and_grads(state, pool, perm, *, setup):
  """The train step's loss and gradients at ``state`` (what train_step computes, no update)."""
  from exvae.objectives import elbo_loss, kl_beta

  x, ids, key = train_lib.train_batch(state.key, state.step, pool, perm, setup=setup)
  beta = kl_beta(state.step, setup.steps_per_epoch, setup.warmup_epochs)
  (loss, _), grads = jax.value_and_grad(elbo_loss, has_aux=True)(
    state.params, state.prior_state, setup, x, ids, key, beta, pool
  )
  return loss, grads


def remat_ab(name, splits, pool, rounds: int, steps: int, check_steps: int = 3):
  """encode_rows with (the old code) and without rematerialisation: equivalence, then time.

  ``encode_rows`` now rematerialises only when the rows span more than one
  chunk (the exact prior), so for RAT "off" is the new code; for the exact
  prior "off" stores every chunk's activations (~540 MB at M = 25000), now the default.
  Equivalence: at ``check_steps`` successive states of the "on" run, the loss
  and every gradient of both versions; max |difference| is printed.  Timing:
  ``rounds`` rounds, each ``steps`` steps of one run then of the other
  (so both see the same background load); the median per-round ratio.
  """
  c = make_config(name)
  old = prepare_with_remat(c, splits, pool, True)
  new = prepare_with_remat(c, splits, pool, False)
  dl, dg, gmax = 0.0, 0.0, 0.0
  for _ in range(check_steps):
    lo, go = old.grad_fn(old.state, pool, old.perm)
    ln, gn = new.grad_fn(old.state, pool, old.perm)
    dl = max(dl, abs(float(lo) - float(ln)))
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), go, gn)
    dg = max(dg, max(jax.tree.leaves(diffs)))
    gmax = max(gmax, max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(go)))
    time_steps(old, pool, 1)
  print(
    f"{name}: encode_rows remat on (old code) vs off, {check_steps} states: "
    f"max|d loss| = {dl:.3g}, max|d grad| = {dg:.3g} (largest |grad| {gmax:.3g})",
    flush=True,
  )
  t_old, t_new = [], []
  for _ in range(rounds):
    t_old.append(time_steps(old, pool, steps))
    t_new.append(time_steps(new, pool, steps))
  ratio = np.median(np.array(t_old) / np.array(t_new))
  load = os.getloadavg()
  print(
    f"{name}: {rounds} alternated rounds of {steps} steps: remat on {np.median(t_old) * 1e3:.1f} "
    f"ms/step, off {np.median(t_new) * 1e3:.1f} ms/step (medians); median per-round on/off = "
    f"{ratio:.3f}x; loadavg {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}",
    flush=True,
  )
  return ratio


# ----------------------------------------------------------------------------
# A/B of the RAT union encoding: all B*k rows vs the distinct ones in whole chunks
# ----------------------------------------------------------------------------


def alternate(variants: dict, rounds: int, steps: int, flip: bool = False) -> tuple[dict, dict]:
  """Times variants round by round, so that every variant sees the same background load.

  Args:
    variants: ``{label: run}``, ``run(steps)`` runs that many steps and blocks until done.
    rounds: timed rounds; each runs every variant once, in turn.
    steps: steps per variant and round.
    flip: reverse the order every other round (no variant always runs first).

  Returns:
    ``(wall, cpu)``: ``{label: [seconds per step, one per round]}`` of wall-clock
    and of this process's CPU time.
  """
  wall = {k: [] for k in variants}
  cpu = {k: [] for k in variants}
  for r in range(rounds):
    order = list(variants)[::-1] if (flip and r % 2) else list(variants)
    for k in order:
      c0, t0 = time.process_time(), time.perf_counter()
      variants[k](steps)
      wall[k].append((time.perf_counter() - t0) / steps)
      cpu[k].append((time.process_time() - c0) / steps)
  return wall, cpu


def per_round_speedup(times: dict, base: str, label: str) -> float:
  """Median over rounds of ``base``'s time over ``label``'s (above 1: ``label`` is faster)."""
  return float(np.median(np.array(times[base]) / np.array(times[label])))


def _grad_diffs(ref, other) -> tuple[float, float]:
  """(largest per-tensor max|a - b| / max|a|, ||a - b|| / ||a|| over all tensors) of two trees."""
  per = [
    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(other))
  ]
  num = sum(
    float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(other))
  )
  den = sum(float(jnp.sum(a * a)) for a in jax.tree.leaves(ref))
  return max(per), (num / max(den, 1e-30)) ** 0.5


def rat_compact_ab(
  splits, pool, rounds: int, steps: int, chunks: list[int], check_steps: int = 4, model: str = "vae"
) -> dict:
  """RAT step encoding all B*k union rows vs only whole chunks holding the distinct ones.

  Runs ``exemplar.rat_compact`` off, then on with each of ``chunks`` as
  ``rat_compact_chunk``, all from the same state (the "off" run's after
  :data:`RAT_PRETRAIN` steps).  Equivalence: at ``check_steps`` successive
  states of the "off" run, the loss and every gradient of each variant
  (relative differences printed), and each state's distinct union rows.  Timing: ``rounds`` rounds, each ``steps`` steps of
  every variant in turn (same background load); medians of wall and process
  CPU time per step and the median per-round speed-up over "off".

  Returns:
    ``{label: {"wall_ms", "cpu_ms", "speedup_wall", "speedup_cpu"}}`` and
    ``"distinct_rows"``: the counts at the checked states.
  """
  variants = [("all rows", {"exemplar.rat_compact": False})] + [
    (f"compact chunk {ch}", {"exemplar.rat_compact": True, "exemplar.rat_compact_chunk": ch})
    for ch in chunks
  ]
  runs = []
  for label, over in variants:
    c = make_config("rat", model)
    for k, v in over.items():
      sub, key = k.split(".")
      c[sub][key] = v
    # The first run trains RAT_PRETRAIN steps; every variant starts from its state.
    run = prepare(c, splits, pool, pretrain=None if not runs else 0)
    if runs:
      run.state = jax.tree.map(jnp.copy, runs[0][1].state)
    run.grad_fn = jax.jit(functools.partial(_loss_and_grads, setup=run.setup))
    runs.append((label, run))
  ref_run = runs[0][1]
  state = jax.tree.map(jnp.copy, ref_run.state)
  counts = union_counts(ref_run, pool, state, check_steps)
  worst = {label: [0.0, 0.0, 0.0] for label, _ in runs[1:]}
  for _ in range(check_steps):
    l0, g0 = ref_run.grad_fn(state, pool, ref_run.perm)
    for label, run in runs[1:]:
      l1, g1 = run.grad_fn(state, pool, run.perm)
      dl = abs(float(l1) - float(l0)) / abs(float(l0))
      dt, dn = _grad_diffs(g0, g1)
      w = worst[label]
      worst[label] = [max(w[0], dl), max(w[1], dt), max(w[2], dn)]
    state, _ = train_lib.train_step(state, pool, ref_run.perm, setup=ref_run.setup)
  static = ref_run.setup.batch_size * int(ref_run.config.exemplar.rat_k)
  print(
    f"rat: distinct rows of the {static}-row union at {check_steps} successive states: "
    f"{counts} (mean {np.mean(counts):.0f})",
    flush=True,
  )
  for label, run in runs[1:]:
    ch = int(run.config.exemplar.rat_compact_chunk)
    enc = [min(static, -(-u // ch) * ch) for u in counts]
    dl, dt, dn = worst[label]
    print(
      f"rat [{label}] vs [all rows]: rows encoded {enc}; max over the states: rel. loss diff "
      f"{dl:.1e}, per-tensor max|d grad|/max|grad| {dt:.1e}, ||d grad||/||grad|| {dn:.1e}",
      flush=True,
    )
  wall, cpu = alternate(
    {label: functools.partial(time_steps, run, pool) for label, run in runs}, rounds, steps
  )
  load = os.getloadavg()
  out = {"distinct_rows": counts}
  base = runs[0][0]
  for label, _ in runs:
    rw, rc = per_round_speedup(wall, base, label), per_round_speedup(cpu, base, label)
    out[label] = {
      "wall_ms": float(np.median(wall[label])) * 1e3,
      "cpu_ms": float(np.median(cpu[label])) * 1e3,
      "speedup_wall": rw,
      "speedup_cpu": rc,
    }
    print(
      f"rat [{label}]: {rounds} alternated rounds of {steps} steps: wall "
      f"{out[label]['wall_ms']:.1f} ms/step, CPU {out[label]['cpu_ms']:.1f} ms/step (medians;"
      f" per round {', '.join(f'{t * 1e3:.0f}' for t in wall[label])} ms); median per-round "
      f"speed-up over [all rows]: wall {rw:.3f}x, CPU {rc:.3f}x; "
      f"loadavg {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}",
      flush=True,
    )
  return out


# ----------------------------------------------------------------------------
# A/B of config.matmul_dtype: float32 vs bfloat16 operands of the networks' products
# ----------------------------------------------------------------------------


def matmul_dtype_ab(name, splits, pool, rounds: int, steps: int, model: str = "vae"):
  """float32 vs bfloat16 network products: loss at the same state, then time.

  Both runs start from the same initial state (same seed).  The loss of both
  at that state is printed (relative difference), then ``rounds`` rounds,
  each ``steps`` steps of the float32 run then of the bfloat16 run (both see
  the same background load); the median per-round ratio f32 / bf16 (> 1:
  bfloat16 faster), in wall-clock time and in this process's CPU time (with
  XLA single-threaded, the CPU time is the step's work and does not count
  the time other jobs hold the cores).
  """
  runs = {}
  for dt in ("float32", "bfloat16"):
    runs[dt] = prepare(make_config(name, model, dt), splits, pool)
    runs[dt].grad_fn = jax.jit(functools.partial(_loss_and_grads, setup=runs[dt].setup))
  ref_state = runs["float32"].state
  l32 = float(runs["float32"].grad_fn(ref_state, pool, runs["float32"].perm)[0])
  l16 = float(runs["bfloat16"].grad_fn(ref_state, pool, runs["bfloat16"].perm)[0])
  print(
    f"{name}: loss at the same state: float32 {l32:.4f}, bfloat16 {l16:.4f} "
    f"(relative difference {abs(l16 - l32) / abs(l32):.2e}); compile f32 "
    f"{runs['float32'].compile_s:.1f} s, bf16 {runs['bfloat16'].compile_s:.1f} s",
    flush=True,
  )
  wall, cpu = alternate(
    {dt: functools.partial(time_steps, runs[dt], pool) for dt in ("float32", "bfloat16")},
    rounds,
    steps,
  )
  load = os.getloadavg()
  for what, t in (("wall", wall), ("cpu", cpu)):
    ratio = per_round_speedup(t, "float32", "bfloat16")
    print(
      f"{name}: {rounds} alternated rounds of {steps} steps, {what} time: float32 "
      f"{np.median(t['float32']) * 1e3:.1f} ms/step, bfloat16 "
      f"{np.median(t['bfloat16']) * 1e3:.1f} ms/step (medians); median per-round f32/bf16 = "
      f"{ratio:.3f}x (>1: bf16 faster); loadavg {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}",
      flush=True,
    )
  return np.median(np.array(cpu["float32"]) / np.array(cpu["bfloat16"]))


# ----------------------------------------------------------------------------
# Per-step cost of each training objective
# ----------------------------------------------------------------------------


def objective_variants(k: int) -> dict:
  """``{label: config overrides}``: the ELBO, and the k-sample IWAE bound with each estimator."""
  return {
    "elbo": {},
    f"iwae{k}_reparam": {"objective": "iwae", "objective_samples": k},
    f"iwae{k}_dreg": {"objective": "iwae", "objective_samples": k, "gradient_estimator": "dreg"},
  }


def objectives_ab(name, splits, pool, rounds: int, steps: int, k: int, model: str = "vae") -> dict:
  """The train step of config ``name`` under each objective, timed in alternated rounds.

  Returns:
    ``{label: {"ms_per_step", "cpu_ms_per_step", "epoch_s", "vs_elbo"}}``, medians over
    rounds; ``vs_elbo`` is the median per-round ratio of the step's wall time to the ELBO's.
  """
  runs = {}
  for label, over in objective_variants(k).items():
    c = config_registry.apply_overrides(
      make_config(name, model), [(key, str(v)) for key, v in over.items()]
    )
    runs[label] = prepare(c, splits, pool)
  wall, cpu = alternate(
    {label: functools.partial(time_steps, run, pool) for label, run in runs.items()},
    rounds,
    steps,
    flip=True,
  )
  load = os.getloadavg()
  out = {}
  for label, run in runs.items():
    ms = float(np.median(wall[label])) * 1e3
    out[label] = {
      "ms_per_step": ms,
      "cpu_ms_per_step": float(np.median(cpu[label])) * 1e3,
      "epoch_s": ms / 1e3 * run.setup.steps_per_epoch,
      "vs_elbo": 1.0 / per_round_speedup(wall, "elbo", label),
    }
    print(
      f"{model} {name:9s} {label:14s} {ms:8.1f} ms/step (cpu {out[label]['cpu_ms_per_step']:.1f})"
      f"  epoch {out[label]['epoch_s']:6.1f} s  x{out[label]['vs_elbo']:.2f} of the ELBO's step"
      f"  ({rounds} alternated rounds of {steps} steps; loadavg {load[0]:.2f})",
      flush=True,
    )
  return out


# ----------------------------------------------------------------------------
# A/B of XLA compiler options of the train step (e.g. which ops go to YNNPACK)
# ----------------------------------------------------------------------------


def parse_options(spec: str) -> dict:
  """``"k=v,k2=v2"`` -> ``{k: v, k2: v2}`` (values kept as strings; ``k=`` is an empty string).

  A value may itself hold commas when it names several enum values: a token
  without ``=`` continues the previous value (``k=A,B`` -> ``{k: "A,B"}``).
  """
  out, last = {}, None
  for tok in [t for t in spec.split(",") if t.strip()]:
    if "=" in tok:
      k, v = tok.split("=", 1)
      out[k.strip()] = v.strip()
      last = k.strip()
    elif last is not None:
      out[last] += "," + tok.strip()
    else:
      raise ValueError(f"bad option token {tok!r} in {spec!r}")
  return out


def options_ab(name, splits, pool, variants: list, rounds: int, steps: int) -> dict:
  """The train step compiled with each of ``variants`` (XLA options dicts): loss check, then time.

  All variants start from copies of one state; at that state each one's loss
  and gradient norm are printed (relative difference to the first).  Then
  ``rounds`` rounds, each ``steps`` steps of every variant in turn (same
  background load), wall and process CPU time per step; medians, and the
  median per-round ratio to the first variant.

  Returns:
    ``{label: {"wall_ms", "cpu_ms", "ratio_wall", "ratio_cpu", "loss"}}``.
  """
  run = prepare(make_config(name), splits, pool)
  lowered_grad = jax.jit(functools.partial(_loss_and_grads, setup=run.setup)).lower(
    run.state, pool, run.perm
  )
  lowered = train_lib.train_step.lower(run.state, pool, run.perm, setup=run.setup)
  fns, labels, losses = [], [], []
  for opts in variants:
    label = ",".join(f"{k}={v}" for k, v in opts.items()) or "default"
    g = lowered_grad.compile(compiler_options=opts) if opts else lowered_grad.compile()
    loss, grads = g(run.state, pool, run.perm)
    gnorm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(grads))))
    losses.append((float(loss), gnorm, grads))
    fns.append(lowered.compile(compiler_options=opts) if opts else lowered.compile())
    labels.append(label)
  l0, n0, g0 = losses[0]
  for label, (l, n, g) in zip(labels, losses):
    dg = max(
      float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0))
    )
    print(
      f"{name} [{label}]: loss {l:.6f} (rel. diff {abs(l - l0) / abs(l0):.1e}), |grad| {n:.6g},"
      f" max per-tensor rel. grad diff {dg:.1e}",
      flush=True,
    )
  states = [jax.tree.map(jnp.copy, run.state) for _ in fns]

  def runner(i):
    def go(n):
      for _ in range(n):
        states[i], m = fns[i](states[i], pool, run.perm)
      jax.block_until_ready(m)

    return go

  wall, cpu = alternate({label: runner(i) for i, label in enumerate(labels)}, rounds, steps)
  load = os.getloadavg()
  out = {}
  for i, label in enumerate(labels):
    rw, rc = per_round_speedup(wall, labels[0], label), per_round_speedup(cpu, labels[0], label)
    out[label] = {
      "wall_ms": float(np.median(wall[label])) * 1e3,
      "cpu_ms": float(np.median(cpu[label])) * 1e3,
      "speedup_wall": rw,
      "speedup_cpu": rc,
      "loss": losses[i][0],
    }
    print(
      f"{name} [{label}]: {rounds} alternated rounds of {steps} steps: wall "
      f"{out[label]['wall_ms']:.1f} ms/step, CPU {out[label]['cpu_ms']:.1f} ms/step (medians); "
      f"median per-round speed-up over [{labels[0]}]: wall {rw:.3f}x, CPU {rc:.3f}x; "
      f"loadavg {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}",
      flush=True,
    )
  return out


def layer_rates(rows=(100, 1000), reps: int = 20) -> None:
  """CPU-time GFLOP/s of the first gated layer's product (rows x 784 x 600): f32 vs bf16 operands."""
  from exvae.nets.gated import mixed_matmul

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(784, 600)), jnp.float32)
  fns = {
    "float32": jax.jit(lambda x, w: x @ w),
    "bfloat16": jax.jit(lambda x, w: mixed_matmul(x, w, jnp.bfloat16)),
  }
  for r in rows:
    x = jnp.asarray(rng.normal(size=(r, 784)), jnp.float32)
    best = {}
    for _ in range(3):  # alternated, best of 3 batches of reps calls
      for name, fn in fns.items():
        jax.block_until_ready(fn(x, w))
        c0 = time.process_time()
        for _ in range(reps):
          out = fn(x, w)
        jax.block_until_ready(out)
        best[name] = min(best.get(name, np.inf), (time.process_time() - c0) / reps)
    flop = 2.0 * r * 784 * 600
    print(
      f"  {r} x 784 x 600 product, CPU time: float32 {flop / best['float32'] / 1e9:.0f} "
      f"GFLOP/s, bf16 operands + f32 accumulation {flop / best['bfloat16'] / 1e9:.0f} GFLOP/s",
      flush=True,
    )


# ----------------------------------------------------------------------------
# JSON summaries (results/speed/*.json)
# ----------------------------------------------------------------------------


def provenance(argv: list[str] | None = None) -> dict:
  """``{"commit", "date", "command"}`` of this run: git HEAD of the checkout, UTC time, argv."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = sys.argv if argv is None else argv
  return {
    "commit": runinfo.code_commit(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "command": " ".join(
      ["python"]
      + [os.path.relpath(argv[0], root) if os.path.isabs(argv[0]) else argv[0]]
      + argv[1:]
    ),
  }


def write_json(path: str, obj: dict) -> str:
  """Writes ``obj`` as indented JSON to ``path`` (directories created; replaced atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
  return path


def step_record(
  name: str, sec_per_step: float, flops: dict | None, rate: float | None, **extra
) -> dict:
  """One config's entry of train_speed.json.

  Args:
    name: the config (rat, exact, ...).
    sec_per_step: measured seconds per training step.
    flops: :func:`step_flops` of the step, or None (no hand account).
    rate: the matmul rate in FLOP/s measured in the same run, or None.
    extra: more fields (epoch seconds, load).

  Returns:
    dict with ``config``, ``ms_per_step``, ``gflop_per_step`` (matrix products,
    None without an account), ``achieved_gflops``, ``share_of_matmul_rate``.
  """
  gflop = flops["total"] / 1e9 if flops else None
  achieved = gflop / sec_per_step if gflop is not None else None
  share = achieved * 1e9 / rate if (achieved is not None and rate) else None
  return dict(
    {
      "config": name,
      "ms_per_step": sec_per_step * 1e3,
      "gflop_per_step": gflop,
      "achieved_gflops": achieved,
      "share_of_matmul_rate": share,
    },
    **extra,
  )


def machine_record(rate: float | None) -> dict:
  """The machine of a summary: CPU, cores, the XLA matmul rate of this run, the load."""
  load = os.getloadavg()
  return {
    "cpu": runinfo.cpu_name(with_isa=True),
    "cores": os.cpu_count(),
    "xla_matmul_gflops": rate / 1e9 if rate else None,
    "loadavg": [round(x, 2) for x in load],
  }


def profile_config(
  name, splits, pool, steps: int, model: str = "vae", matmul_dtype: str = "float32"
) -> dict:
  """Per-operation profile of config ``name``'s compiled train step (bench/op_profile.py)."""
  from bench import op_profile

  run = prepare(make_config(name, model, matmul_dtype), splits, pool)
  compiled = train_lib.train_step.lower(run.state, pool, run.perm, setup=run.setup).compile()
  time_steps(run, pool, 2)  # warm
  start = jax.tree.map(jnp.copy, run.state)
  wall = time_steps(run, pool, steps)
  # RAT: the rows encoded (exemplar.rat_compact) follow each unprofiled step's distinct
  # union rows, counted by replaying those steps from their first state.
  counts = (
    union_counts(run, pool, start, steps)
    if run.config.exemplar.rat and run.config.prior == "exemplar"
    else None
  )
  del start
  p = op_profile.profile(
    lambda: time_steps(run, pool, 1), compiled.as_text(), "jit__train_step", steps
  )
  p["config"] = name
  p["unprofiled_ms_per_step"] = wall * 1e3
  if counts:
    p["distinct_union_rows"] = counts
    f = mean_flops(
      run.config,
      run.state.params["model"],
      run.setup.batch_size,
      run.setup.num_train,
      run.setup.steps_per_epoch,
      counts,
    )
  else:
    f = step_flops(
      run.config,
      run.state.params["model"],
      run.setup.batch_size,
      run.setup.num_train,
      run.setup.steps_per_epoch,
    )
  p["gflop_per_step"] = f["total"] / 1e9 if f else None
  return p


def run_profiles(args, splits, pool) -> None:
  """``--profile``: prints each config's table and writes ``<out>/profile.json``."""
  from bench import op_profile

  rate = matmul_rate()
  print(f"matmul 2048^3 f32 (XLA, this run): {rate / 1e9:.1f} GFLOP/s", flush=True)
  out = {
    "machine": machine_record(rate),
    "provenance": provenance(),
    "steps": args.steps,
    "configs": [],
  }
  for name in args.configs.split(","):
    p = profile_config(name, splits, pool, args.steps, args.model, args.matmul_dtype)
    out["configs"].append(p)
  # Each shape's product alone, alternated with 2048^3: what the step's matmuls could reach.
  shapes = sorted({e["shape"] for p in out["configs"] for e in p["matmuls"]})
  rates = op_profile.isolated_rates(shapes)
  out["machine"]["isolated_matmul_gflops"] = rates
  for p in out["configs"]:
    op_profile.add_ceiling(p, rates)
    print(op_profile.format_table(p["config"], p, rate), flush=True)
  out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  print("wrote", write_json(os.path.join(args.out, "profile.json"), out))


def main():
  global RAT_PRETRAIN
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="rat,exact,gaussian,vampprior")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--model", default="vae", help="vae | hvae | convhvae | pixelcnn")
  ap.add_argument("--no_flops", action="store_true", help="skip the FLOP account")
  ap.add_argument(
    "--remat_ab",
    type=int,
    default=0,
    metavar="ROUNDS",
    help="instead: A/B of encode_rows with and without rematerialisation over "
    "ROUNDS alternated rounds of --steps steps, after an equivalence check",
  )
  ap.add_argument(
    "--matmul_dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="config.matmul_dtype of the timed runs (operands of the networks' products)",
  )
  ap.add_argument(
    "--matmul_dtype_ab",
    type=int,
    default=0,
    metavar="ROUNDS",
    help="instead: A/B of matmul_dtype float32 vs bfloat16 over ROUNDS alternated "
    "rounds of --steps steps, after the loss of both at the same state",
  )
  ap.add_argument(
    "--options_ab",
    type=int,
    default=0,
    metavar="ROUNDS",
    help="instead: A/B of the train step compiled with the default XLA options and "
    "with each ';'-separated --options variant, over ROUNDS alternated rounds",
  )
  ap.add_argument(
    "--options",
    default="xla_cpu_experimental_ynn_fusion_type=",
    help="variants for --options_ab: 'k=v,k2=v2;k=v3' (default: no YNNPACK fusions)",
  )
  ap.add_argument(
    "--objectives_ab",
    type=int,
    default=0,
    metavar="ROUNDS",
    help="time the ELBO, IWAE (reparam) and IWAE (DReG) steps in alternated rounds",
  )
  ap.add_argument(
    "--objective_samples", type=int, default=5, help="k of the IWAE variants of --objectives_ab"
  )
  ap.add_argument(
    "--rat_compact_ab",
    type=int,
    default=0,
    metavar="ROUNDS",
    help="instead: A/B of the RAT step encoding all B*k union rows vs only the "
    "chunks holding the distinct ones (exemplar.rat_compact), over ROUNDS "
    "alternated rounds of --steps steps, after a loss and gradient check",
  )
  ap.add_argument(
    "--rat_compact",
    type=int,
    default=None,
    choices=(0, 1),
    help="exemplar.rat_compact of the timed RAT runs (default: the config's; "
    "0: encode all B*k union rows, 1: only the chunks of distinct ones)",
  )
  ap.add_argument(
    "--rat_pretrain",
    type=int,
    default=RAT_PRETRAIN,
    metavar="STEPS",
    help="untimed RAT training steps (then a refresh) before RAT timings and "
    "profiles: the step's work follows its union's distinct rows",
  )
  ap.add_argument(
    "--rat_chunks",
    default="125",
    help="exemplar.rat_compact_chunk values for --rat_compact_ab (comma-separated)",
  )
  ap.add_argument(
    "--profile",
    action="store_true",
    help="instead: per-operation profile of each config's train step over --steps "
    "steps (printed, and written to <out>/profile.json)",
  )
  ap.add_argument(
    "--repeat",
    type=int,
    default=1,
    metavar="R",
    help="timing mode: R rounds of the same --steps steps from the same state, "
    "each with its own matmul rate; medians and the range are printed",
  )
  ap.add_argument(
    "--set",
    default="",
    metavar="KEY=VALUE,...",
    help="config overrides of every timed run (e.g. exemplar.encode_chunk=2500)",
  )
  ap.add_argument(
    "--out",
    default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "speed"
    ),
    help="directory of the JSON summaries (train_speed.json, profile.json)",
  )
  args = ap.parse_args()
  OVERRIDES.extend(parse_set(args.set))
  RAT_PRETRAIN = max(0, args.rat_pretrain)
  splits, src = load_splits()
  load = os.getloadavg()
  print(
    f"model={args.model} matmul_dtype={args.matmul_dtype} device={jax.devices()[0].device_kind} backend={jax.default_backend()} "
    f"cpus={os.cpu_count()} data={src} N={splits.train_x.shape[0]} "
    f"loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}"
  )
  pool = jnp.asarray(splits.train_x)
  if args.matmul_dtype_ab:
    layer_rates()
    for name in args.configs.split(","):
      matmul_dtype_ab(name, splits, pool, args.matmul_dtype_ab, args.steps, args.model)
    return
  if args.rat_compact_ab:
    rat_compact_ab(
      splits,
      pool,
      args.rat_compact_ab,
      args.steps,
      [int(v) for v in args.rat_chunks.split(",")],
      model=args.model,
    )
    return
  if args.remat_ab:
    for name in args.configs.split(","):
      remat_ab(name, splits, pool, args.remat_ab, args.steps)
    return
  if args.profile:
    run_profiles(args, splits, pool)
    return
  if args.objectives_ab:
    res = {
      name: objectives_ab(
        name, splits, pool, args.objectives_ab, args.steps, args.objective_samples, args.model
      )
      for name in args.configs.split(",")
    }
    print(
      "wrote",
      write_json(
        os.path.join(args.out, f"objectives_{args.model}.json"),
        {
          "machine": machine_record(None),
          "provenance": provenance(),
          "data": src,
          "model": args.model,
          "steps_timed": args.steps,
          "rounds": args.objectives_ab,
          "configs": res,
        },
      ),
    )
    return
  if args.options_ab:
    variants = [{}] + [parse_options(v) for v in args.options.split(";")]
    for name in args.configs.split(","):
      options_ab(name, splits, pool, variants, args.options_ab, args.steps)
    return
  rate = None if args.no_flops else matmul_rate()
  if rate:
    print(f"matmul 2048^3 f32 (XLA, this run): {rate / 1e9:.1f} GFLOP/s")
  summary = {
    "machine": machine_record(rate),
    "provenance": provenance(),
    "data": src,
    "model": args.model,
    "matmul_dtype": args.matmul_dtype,
    "steps_timed": args.steps,
    "config_overrides": dict(OVERRIDES),
    "steps": [],
  }
  for name in args.configs.split(","):
    run = prepare(
      make_config(
        name,
        args.model,
        args.matmul_dtype,
        None if args.rat_compact is None else bool(args.rat_compact),
      ),
      splits,
      pool,
    )
    t_refresh = time_refresh(run, pool)
    start = jax.tree.map(jnp.copy, run.state)  # the timed steps' first state
    # --repeat R: R rounds of the same steps from the same state (the same work each
    # round), each after its own 2048^3 matmul rate; the figures are the medians.
    rounds = []
    for r in range(max(1, args.repeat)):
      if r:
        run.state = jax.tree.map(jnp.copy, start)
      r_rate = matmul_rate() if (rate and args.repeat > 1) else rate
      rounds.append((time_steps(run, pool, args.steps), r_rate))
    dt = float(np.median([t for t, _ in rounds]))
    c_rate = float(np.median([q for _, q in rounds])) if rate else rate  # this config's rate
    spe = run.setup.steps_per_epoch
    epoch = dt * spe + t_refresh
    line = (
      f"{name:10s} {1 / dt:8.2f} steps/s  {dt * 1e3:8.1f} ms/step  epoch={epoch:7.1f} s"
      f" (steps_per_epoch={spe}, epoch-start refresh {t_refresh:.2f} s, training steps only)"
    )
    if name in TARGETS and args.model == "vae":
      line += f"  target<={TARGETS[name]:.0f} s"
    print(line, flush=True)
    # RAT: the rows encoded depend on each step's distinct union rows, counted
    # by replaying the timed steps (untimed) from their first state.
    counts = union_counts(run, pool, start, args.steps) if name == "rat" else None
    del start
    if counts:
      static = run.setup.batch_size * int(run.config.exemplar.rat_k)
      print(
        f"  distinct rows of the {static}-row RAT union per timed step: {counts} (mean "
        f"{np.mean(counts):.0f}; exemplar.rat_compact={bool(run.config.exemplar.rat_compact)}"
        f", chunk {int(run.config.exemplar.rat_compact_chunk)})",
        flush=True,
      )
    if rate is None:
      f = None
    elif counts:
      f = mean_flops(
        run.config,
        run.state.params["model"],
        run.setup.batch_size,
        run.setup.num_train,
        spe,
        counts,
      )
    else:
      f = step_flops(
        run.config, run.state.params["model"], run.setup.batch_size, run.setup.num_train, spe
      )
    summary["steps"].append(
      step_record(
        name,
        dt,
        f,
        c_rate,
        epoch_s=epoch,
        refresh_s=t_refresh,
        steps_per_epoch=spe,
        loadavg=[round(x, 2) for x in os.getloadavg()],
      )
    )
    if rate is None:
      continue
    if f is None:
      print(
        f"  flops: no hand account for model {args.model}; XLA counts "
        f"{xla_step_flops(run, pool) / 1e9:.3f} GFLOP/step"
      )
      continue
    print(describe_flops(f, dt, c_rate))
    if args.repeat > 1:
      shares = [f["total"] / t / q for t, q in rounds]
      summary["steps"][-1].update(
        ms_per_step_rounds=[t * 1e3 for t, _ in rounds],
        matmul_gflops_rounds=[q / 1e9 for _, q in rounds],
        share_rounds=shares,
        share_median=float(np.median(shares)),
      )
      print(
        f"  {len(rounds)} rounds: ms/step {', '.join(f'{t * 1e3:.1f}' for t, _ in rounds)}; "
        f"matmul GFLOP/s {', '.join(f'{q / 1e9:.0f}' for _, q in rounds)}; share of the rate "
        f"(each round at its own rate) median {np.median(shares):.0%}, "
        f"range {min(shares):.0%}-{max(shares):.0%}",
        flush=True,
      )
    extra = ""
    if counts:
      summary["steps"][-1]["distinct_union_rows"] = counts
      fa = step_flops(
        run.config,
        run.state.params["model"],
        run.setup.batch_size,
        run.setup.num_train,
        spe,
        union_rows=static,
      )
      extra = (
        f"; {f['exemplar_rows']:.0f} union rows encoded on average, all {static} would "
        f"be {fa['total'] / f['total'] - 1:.1%} more FLOPs"
      )
    print(
      f"  XLA cost analysis of the compiled step: {xla_step_flops(run, pool) / 1e9:.3f} GFLOP"
      f" (all ops; a lax.map body counted once){extra}",
      flush=True,
    )
  print("wrote", write_json(os.path.join(args.out, "train_speed.json"), summary))


if __name__ == "__main__":
  main()
