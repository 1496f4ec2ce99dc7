"""Evaluation: importance-sampled test NLL against ALL training exemplars.

    NLL(x) = -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x),   z_s ~ q(z|x)

The exemplar prior's bank is built once from every training image with the
final (best-on-validation) encoder; test images are binarised once with a
fixed seed.  Work is chunked (``eval.max_queries`` latent codes per call) so
memory does not depend on S or on the test-set size.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from exvae import (
  atomic,
  config_checks,
  data,
  distributed,
  errors,
  evaluation,
  per_example,
  pictures,
  rundir,
  train_lib,
)
from exvae import bank as bank_lib


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Evaluates on all devices of a data mesh (``config.num_devices``); see :func:`_evaluate`.

  SIGTERM stops it as it stops training: the current batch is finished, the scores so
  far are saved (``eval_partial.npz``, where the next run goes on from) and
  errors.Interrupted is raised (exit code 143); arriving after the last batch, once
  the outputs are written.
  """
  stop: list[int] = []
  main = threading.current_thread() is threading.main_thread()
  prev = signal.signal(signal.SIGTERM, lambda *_: stop.append(1)) if main else None
  lock = None
  try:
    if distributed.is_primary():
      lock = lock_out_dir(str(config.eval.get("out_dir", "")) or workdir)
    with distributed.data_mesh(int(config.num_devices)) as mesh:
      metrics = _evaluate(config, workdir, mesh, stop=lambda: bool(stop))
  finally:
    if lock is not None:
      os.close(lock)
    if main:
      signal.signal(signal.SIGTERM, prev)
  if stop:
    raise errors.Interrupted(
      f"SIGTERM after the last batch: the evaluation is complete and "
      f"its outputs are written ({metrics['per_example']})."
    )
  return metrics


def _evaluate(config, workdir: str, mesh, stop=None) -> dict[str, Any]:
  """Evaluates the checkpoint in ``workdir``; writes ``eval_metrics.json`` and prints it.

  The outputs (``eval_metrics.json``, ``per_example.npz``, ``eval_samples.png``) go to
  ``config.eval.out_dir``, or to ``workdir`` when that is empty.

  Args:
    config: the run's ConfigDict (``config.eval`` controls S and sizes).
    workdir: the training workdir (must hold a checkpoint).

  Returns:
    The metrics dict written to ``<out_dir>/eval_metrics.json``.

  Raises:
    CheckpointNotFoundError: ``workdir`` holds no readable checkpoint.
    errors.ConfigDriftError: ``config`` is not the one the run was trained with.
    errors.NonFiniteMetricsError: the metrics are not finite (nothing is written).

  Reads the run directory without changing it (checkpoints opened read-only),
  so it may run while training writes the same workdir. With ``config.eval.reuse``
  (the default), outputs already in ``out_dir`` from the same parameters, test images
  and settings are returned as they are (the dict has ``reused: True``), not recomputed.
  """
  is_published = bank_lib.check_trained(workdir)
  config_checks.check_values(config)
  rundir.check_reader_config(workdir, config, rundir.EVAL_HINTS)
  splits = train_lib.load_data(config)
  rundir.check_reader_data(workdir, splits.identity)  # a user's data set: the same arrays
  pool, pool_sharded = train_lib.make_pool(config, splits, mesh)
  setup = train_lib.make_setup(config, splits, pool_sharded)
  params, meta, use_best, step = _restore(config, workdir, setup, mesh, is_published)
  in_progress = None if is_published else _in_progress(workdir, meta, use_best, step)
  test_x = splits.test_x
  if config.eval.max_test_examples:
    test_x = test_x[: int(config.eval.max_test_examples)]
  data.validate_images(test_x, image_shape=splits.image_shape, name="test images")
  out_dir = str(config.eval.get("out_dir", "")) or workdir
  # One process only: reading the parameters for their digest needs them all addressable,
  # and every process must agree on whether the outputs are reused.
  identity = _identity(config, params, test_x) if jax.process_count() == 1 else None
  identity_sha256 = (
    None
    if identity is None
    else hashlib.sha256(atomic.dumps(identity, sort_keys=True).encode()).hexdigest()
  )
  if identity is not None and bool(config.eval.get("reuse", True)):
    done = _finished(out_dir, identity_sha256)
    # Outputs of a run then in progress are kept only while it still is (they say so).
    if done is not None and (in_progress is not None or not done.get("run_in_progress")):
      return done
  # Scores saved as the evaluation goes (a stop loses at most a minute of it), for one
  # process; removed once the outputs are written.
  partial = os.path.join(out_dir, PARTIAL) if identity is not None else None
  ctx, res, times = _score(config, params, setup, pool, test_x, partial, identity, stop)
  checkpoint = {
    "checkpoint_step": step,
    "params": "best" if use_best else "last",
    "best_epoch": int(meta["best_epoch"]),
    "best_val_loss": meta.get("best_val"),
    # Training still held the run's writer lock: an interim checkpoint's scores.
    "run_in_progress": in_progress is not None,
    **({"epochs_validated": in_progress} if in_progress is not None else {}),
  }
  metrics = _metrics(config, splits, setup, params, res, times, checkpoint, identity_sha256)
  _check_finite(metrics, step, workdir)
  samples, recons = evaluation.picture_batch(
    params, ctx, jnp.asarray(test_x[:32]), jax.random.PRNGKey(1), setup=setup, num_samples=64
  )
  metrics["samples_png"] = os.path.join(out_dir, "eval_samples.png")
  metrics["num_devices"] = 1 if mesh is None else int(mesh.size)
  metrics["per_example"] = os.path.join(out_dir, per_example.FILENAME)
  if distributed.is_primary():
    _write_outputs(out_dir, metrics, res, test_x, config, samples, recons)
    if partial is not None and os.path.exists(partial):
      os.remove(partial)
  return metrics


def _restore(config, workdir: str, setup, mesh, is_published: bool) -> tuple[Any, dict, bool, int]:
  """The parameters to score (:func:`exvae.bank.restore_params`), placed on ``mesh``.

  Returns:
    ``(params, meta, use_best, step)``: the run's bookkeeping (``best_epoch``
    1-based, 0: none validated), whether ``params`` are the best-on-validation ones,
    and the checkpoint's step (-1 when a published model does not record it).
  """
  r = bank_lib.restore_params(
    config, workdir, setup, is_published=is_published, need_last=not is_published
  )
  # Best-on-validation parameters, unless no epoch was validated yet (a run
  # stopped by max_steps inside its first epoch): then the last ones.
  use_best = is_published or (bool(config.eval.use_best) and int(r.meta["best_epoch"]) >= 1)
  return distributed.replicate(r.best if use_best else r.last, mesh), r.meta, use_best, r.step


def _score(
  config, params, setup, pool, test_x: np.ndarray, partial: str | None, identity: dict | None, stop
) -> tuple[Any, dict[str, np.ndarray], tuple]:
  """Builds the evaluation context and scores ``test_x`` (:func:`evaluation.evaluate_split`).

  Returns:
    ``(ctx, scores, (bank seconds, scoring seconds))``.
  """
  s = int(config.eval.num_importance_samples)
  t0 = time.time()
  ctx = evaluation.eval_context(
    params, pool, jax.random.PRNGKey(config.eval.bank_seed), setup=setup
  )
  jax.block_until_ready(ctx)
  t_bank = time.time() - t0
  t0 = time.time()
  res = evaluation.evaluate_split(
    params,
    setup,
    ctx,
    test_x,
    jax.random.PRNGKey(config.eval.seed),
    num_samples=s,
    max_queries=int(config.eval.max_queries),
    progress=bool(config.progress),
    desc=f"test NLL (S={s})",
    partial_path=partial,
    partial_identity=identity,
    stop=stop,
  )
  return ctx, res, (t_bank, time.time() - t0)


def _metrics(
  config,
  splits: data.Splits,
  setup,
  params,
  res: dict[str, np.ndarray],
  times: tuple[float, float],
  checkpoint: dict[str, Any],
  identity_sha256: str | None,
) -> dict[str, Any]:
  """The record of ``eval_metrics.json``: the scores' means and what they come from.

  Args:
    config: the run's ConfigDict.
    splits: the data.
    setup: the static run description.
    params: the parameters scored.
    res: the scores of :func:`evaluation.evaluate_split`.
    times: (seconds building the bank, seconds scoring).
    checkpoint: which parameters were scored (step, best or last, best epoch, whether
      training still runs).
    identity_sha256: what a later evaluation compares to reuse the outputs (see
      :func:`_finished`).

  Returns:
    The metrics, in the order ``eval_metrics.json`` lists them.
  """
  t_bank, t_eval = times
  m = res["log_px_iwae"].shape[0]
  s = int(config.eval.num_importance_samples)
  metrics = {
    "test_nll": float(-res["log_px_iwae"].mean()),
    "test_nll_stderr": float(res["log_px_iwae"].std(ddof=1) / np.sqrt(m)) if m > 1 else None,
    # Certified pruning: the exact-prior NLL estimate lies in
    # [test_nll - test_nll_certified_gap, test_nll] (0 when exact).
    "test_nll_certified_gap": float(res["max_err"].mean()),
    "prune_keep": int(config.eval.prune_keep),
    "test_elbo": float(-res["elbo"].mean()),  # reported as a positive loss (nats), like NLL
    "test_recon": float(res["recon"].mean()),
    "test_kl": float(res["kl"].mean()),
    "num_importance_samples": s,
    "num_test_examples": int(m),
    "num_exemplars_in_bank": int(splits.train_x.shape[0]) if setup.prior.needs_pool else 0,
    "dataset": splits.name,
    "data_source": splits.source,
    # A user's data set: its path (or plug-in) and the SHA-256 of its arrays.
    **({"data_identity": splits.identity} if splits.identity is not None else {}),
    "eval_binarize": str(config.get("eval_binarize", "exvae")),  # whose fixed test draw
    "prior": config.prior,
    **checkpoint,
    "bank_seconds": t_bank,
    "eval_seconds": t_eval,
    "test_points_per_second": m / max(t_eval, 1e-9),
    "backend": jax.default_backend(),
    "identity_sha256": identity_sha256,
  }
  for k, v in setup.prior.describe(params["prior"]).items():
    metrics[k] = float(v)
  return metrics


def _check_finite(metrics: dict[str, Any], step: int, workdir: str) -> None:
  """Raises errors.NonFiniteMetricsError if a mean is not finite (nothing is written then)."""
  bad = [
    k for k in ("test_nll", "test_elbo", "test_recon", "test_kl") if not np.isfinite(metrics[k])
  ]
  if bad:
    raise errors.NonFiniteMetricsError(
      f"{', '.join(f'{k}={metrics[k]}' for k in bad)} for checkpoint step {step} of "
      f"{workdir}: its parameters diverged; eval_metrics.json was not written. Retrain "
      "(e.g. with a lower learning_rate)."
    )


def _in_progress(workdir: str, meta: dict, use_best: bool, step: int) -> int | None:
  """The epochs validated so far if training holds ``workdir``'s writer lock now, else None.

  Says so in one line: the scores are those of an interim checkpoint.
  """
  writer = rundir.writer_of(workdir)
  if writer is None:
    return None
  done = int(meta.get("epochs_validated", 0))
  which = (
    f"the best epoch {int(meta['best_epoch'])}"
    if use_best
    else f"the last parameters (step {step})"
  )
  who = f" (pid {writer['pid']})" if writer.get("pid") else ""
  if distributed.is_primary():
    print(
      f"{workdir}: scoring {which} of a run in progress{who}, {done} epochs validated so "
      "far; evaluate again when it has finished.",
      flush=True,
    )
  return done


def lock_out_dir(out_dir: str) -> int | None:
  """Takes an exclusive ``flock`` on the directory ``out_dir`` itself (created if missing).

  Two evaluations into one output directory would replace each other's outputs; the
  second is refused at once. Nothing is written for the lock (a directory's own lock
  leaves no file), and the kernel drops it when the process ends, however it ends.

  Returns:
    The locked descriptor (close it to release), or None where the filesystem has no
    locks (then nothing stops a second evaluation).

  Raises:
    errors.WorkdirLockedError: another evaluation writes ``out_dir`` now.
    errors.ReadOnlyError, errors.DiskFullError: ``out_dir`` cannot be created.
  """
  state, fd = rundir.take_flock(
    out_dir, out_dir, os.O_RDONLY, f"the evaluation outputs in {out_dir}"
  )
  if state == "held":
    os.close(fd)
    raise errors.WorkdirLockedError(
      f"{out_dir} is being written by another evaluation: wait for it to finish, or give "
      "this one another --config.eval.out_dir."
    ) from None
  return fd


def _identity(config, params, test_x: np.ndarray) -> dict[str, Any]:
  """What the scores of an earlier evaluation (stopped: ``eval_partial.npz``; finished:
  ``identity_sha256`` in ``eval_metrics.json``) must match to be reused: the parameters,
  the test images, and the config (less the settings that only say how to show, where to
  write, or whether to reuse)."""
  cfg = config.to_dict()
  cfg.pop("progress", None)
  for key in ("out_dir", "reuse"):
    cfg.get("eval", {}).pop(key, None)
  return {
    "params": bank_lib.params_fingerprint(jax.device_get(params)),
    "images": per_example.images_digest(test_x),
    "config": json.loads(atomic.dumps(atomic.finite_or_none(cfg), sort_keys=True)),
  }


def _finished(out_dir: str, identity_sha256: str) -> dict[str, Any] | None:
  """The metrics of a finished evaluation in ``out_dir`` with this identity, else None.

  A run evaluated again with the same parameters, test images and settings (after a
  resumed ``scripts/paper_runs.sh`` retrains nothing, say) gets its outputs back instead
  of hours of the same computation. Outputs that fail :func:`check_outputs`, or that were
  made with other parameters or settings, are evaluated again (and replaced), with a line
  that says so.
  """
  path = os.path.join(out_dir, "eval_metrics.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f).get("identity_sha256")
  except (OSError, ValueError, AttributeError) as e:
    recorded = e
  if recorded != identity_sha256:
    print(
      f"{path}: not this evaluation (other parameters, test images or settings, or "
      "unreadable); evaluating again (its outputs will be replaced)",
      flush=True,
    )
    return None
  try:
    metrics = check_outputs(out_dir)  # its own digest, its files', the means of the scores
  except atomic.NPZ_READ_ERRORS as e:
    print(f"{path}: the outputs there do not check ({e}); evaluating again", flush=True)
    return None
  print(
    f"{path}: this evaluation is already done (same parameters, test images and "
    "settings); its outputs are kept. --config.eval.reuse=False evaluates again.",
    flush=True,
  )
  # The record was written where the evaluation ran; the outputs are here now (a moved or
  # copied folder), and nothing in out_dir is rewritten to say so.
  return {
    **metrics,
    "samples_png": os.path.join(out_dir, "eval_samples.png"),
    "per_example": os.path.join(out_dir, per_example.FILENAME),
    "reused": True,
  }


OUTPUTS = ("eval_samples.png", per_example.FILENAME, "eval_metrics.json")
PARTIAL = "eval_partial.npz"  # the scores of a stopped evaluation, until it finishes


def _write_outputs(
  out_dir: str, metrics: dict, res: dict, test_x: np.ndarray, config, samples, recons
) -> None:
  """Writes the picture, the per-example scores and the metrics as one unit.

  All three go to temporary files in ``out_dir`` first and are renamed in the
  order of :data:`OUTPUTS`, the metrics last; ``eval_metrics.json`` records the
  SHA-256 of the other two (``outputs_sha256``), so a set torn by a crash
  between two renames shows (:func:`check_outputs`).  On a failure nothing is
  renamed and no temporary file is left behind.
  """
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    typed = errors.as_write_error(e, f"the evaluation outputs in {out_dir}")
    if typed is e:
      raise
    raise typed from e
  images, ncols = pictures.samples_and_reconstructions(
    np.asarray(samples), np.asarray(test_x[:32]), np.asarray(recons)
  )
  img = pictures.grid_image(images, ncols)
  arrays = per_example.arrays(*_per_example_parts(res, test_x, config, metrics))
  png, npz, js = (os.path.join(out_dir, name) for name in OUTPUTS)

  def metrics_writer(digests):
    metrics["outputs_sha256"] = {os.path.basename(p): h for p, h in digests.items()}
    record = atomic.with_self_digest(atomic.finite_or_none(metrics))
    metrics[atomic.SELF_DIGEST] = record[atomic.SELF_DIGEST]
    text = atomic.dumps(record, indent=2) + "\n"
    return lambda f: f.write(text.encode())

  atomic.commit(
    [
      (png, lambda _: lambda f: img.save(f, format="PNG")),
      (npz, lambda _: lambda f: np.savez(f, **arrays)),
      (js, metrics_writer),
    ]
  )


def check_outputs(out_dir: str) -> dict[str, Any]:
  """Reads ``eval_metrics.json`` and checks it against itself and its companions.

  Checks the digest the metrics carry of their own content (``record_sha256``;
  a file written before it existed has none), the SHA-256 of the other outputs it
  records (``outputs_sha256``), and that its means are those of ``per_example.npz``
  (``test_nll`` = -mean of ``log_px``, and the ELBO and its terms; the count).

  Returns:
    The metrics.

  Raises:
    ValueError: a file differs from its digest, or the means from the scores.
  """
  path = os.path.join(out_dir, "eval_metrics.json")
  with open(path) as f:
    metrics = json.load(f)
  if not isinstance(metrics, dict):
    raise ValueError(f"{path} is not a JSON object")
  atomic.check_self_digest(metrics, path)
  for name, digest in metrics.get("outputs_sha256", {}).items():
    if atomic.sha256_file(os.path.join(out_dir, name)) != digest:
      raise ValueError(f"{os.path.join(out_dir, name)} is not the file {path} was written with.")
  _check_means(metrics, os.path.join(out_dir, per_example.FILENAME), path)
  return metrics


# (key in eval_metrics.json, score in per_example.npz, sign): the means that must agree.
_MEANS = (
  ("test_nll", "log_px", -1.0),
  ("test_elbo", "elbo", -1.0),
  ("test_recon", "recon", 1.0),
  ("test_kl", "kl", 1.0),
)


def _check_means(metrics: dict, npz: str, path: str) -> None:
  """Raises ValueError if the means in ``metrics`` are not those of the scores in ``npz``.

  The scores are stored as float32 and the means computed in float64 before that, so
  they agree to within 1e-5 of the mean magnitude (a changed digit is far more).
  """
  with np.load(npz, allow_pickle=False) as z:
    scores = {k: np.asarray(z[k], np.float64) for k in z.files if k in per_example.SCORES}
  m = metrics.get("num_test_examples")
  if "log_px" not in scores or (m is not None and scores["log_px"].shape != (int(m),)):
    raise ValueError(f"{npz} does not hold the {m} scores {path} records")
  for key, score, sign in _MEANS:
    if key not in metrics or score not in scores:
      continue
    want = sign * float(scores[score].mean())
    got = metrics[key]
    tol = 1e-5 * max(1.0, float(np.abs(scores[score]).mean()))
    if not isinstance(got, (int, float)) or not abs(float(got) - want) <= tol:
      raise ValueError(f"{path} records {key}={got}, the scores in {npz} give {want:.6f}")


def _per_example_parts(res: dict, test_x: np.ndarray, config, metrics: dict):
  """``(scores, identity, provenance)`` of the per-example archive (:mod:`exvae.per_example`)."""
  return (
    {"log_px": res["log_px_iwae"], "elbo": res["elbo"], "recon": res["recon"], "kl": res["kl"]},
    {
      "dataset": metrics["dataset"],
      "split": "test",
      "eval_binarize_seed": int(config.eval_binarize_seed),
      "count": int(test_x.shape[0]),
      "images_sha256": per_example.images_digest(test_x),
    },
    {
      "num_importance_samples": metrics["num_importance_samples"],
      "eval_seed": int(config.eval.seed),
      "prior": str(config.prior),
      "model": str(config.model),
      "eval_binarize": metrics["eval_binarize"],
      **({"data_sha256": metrics["data_identity"]["sha256"]} if "data_identity" in metrics else {}),
      "checkpoint_step": metrics["checkpoint_step"],
      "params": metrics["params"],
    },
  )
