"""The downstream commands behind ``uses.py`` (callable in-process, e.g. from tests).

Each command restores the best-on-validation parameters of a trained workdir
(:func:`exvae.bank.restore_trained`), builds the training bank (or loads
``bank_path``), writes its outputs under ``out`` and returns a JSON-able
summary dict:

* ``bank``:     ``bank.npz``; size on disk vs the raw uint8 images.
* ``generate``: ``conditional.png``, ``unconditional.png``, ``cyclic.png``,
  ``interpolation.png`` (+ ``generate.json``).
* ``knn``:      ``knn.json``: kNN error per k, validation and test settings, and
                ``knn_per_example.npz``: each test and validation image's label and
                prediction per k.
* ``augment``:  ``augment.json``: MLP test error without / with augmentation.
* ``plots``:    ``tsne.png`` (codes coloured by label), ``curves.png``.
* ``grow``:     ``bank_grown.npz`` (train + validation exemplars, no
  retraining) and ``grow.json`` (log p(z) of validation / test codes before
  and after).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exvae import atomic
from exvae import bank as bank_lib
from exvae import progress as progress_lib
from exvae import published, runinfo
from exvae.uses import augment as augment_lib
from exvae.uses import generation, knn, plots


def _write_json(path: str, obj: dict) -> str:
  return atomic.write_json(path, atomic.finite_or_none(obj))


def provenance(trained, workdir: str) -> dict[str, Any]:
  """What a downstream result was computed from: the model's parameters and the code.

  Call it before the computation: ``commit`` is the code the command started
  with (a checkout may move on during a long run) and ``date`` its start.

  Returns:
    ``{"model": {"path", "best_epoch", ...}, "commit", "date"}``; a published
    model (:mod:`exvae.published`) adds its ``params_sha256``, ``source_run``
    and ``source_commit``.
  """
  model: dict[str, Any] = {"path": workdir}
  if trained.meta.get("best_epoch") is not None:  # 1-based (bank.restore_trained)
    model["best_epoch"] = int(trained.meta["best_epoch"])
  if published.is_published(workdir):
    meta = published.read_meta(workdir)
    for key in ("best_epoch", "params_sha256", "source_run", "source_commit"):
      if key in meta:
        model[key] = meta[key]
  out: dict[str, Any] = {"model": model}
  if trained.splits.identity is not None:  # a user's data set: its path (or plug-in), SHA-256
    out["data_identity"] = trained.splits.identity
  return {
    **out,
    "commit": runinfo.code_commit(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
  }


def _load(config, workdir: str, bank_path: str | None, allow_bank_mismatch: bool = False):
  """(trained, bank): the restored run and its training bank (built or loaded).

  A loaded bank must record this run's model (:func:`exvae.bank.check_bank_source`)
  unless ``allow_bank_mismatch``.
  """
  trained = bank_lib.restore_trained(config, workdir)
  progress = bool(config.progress)
  if bank_path:
    bank = bank_lib.ExemplarBank.load(bank_path)
    if bank.latent_dim != trained.setup.model.latent_dim:
      raise bank_lib.BankMismatchError(
        f"bank {bank_path} has d={bank.latent_dim}, the model "
        f"d={trained.setup.model.latent_dim}: built from another model."
      )
    bank_lib.check_bank_source(
      bank, trained.params["model"], bank_path, allow_mismatch=allow_bank_mismatch
    )
  else:
    bank = bank_lib.from_checkpoint(config, workdir, trained=trained, progress=progress)
  return trained, bank


def _encode(trained, x: np.ndarray) -> np.ndarray:
  """Encoder means of already-binarised (val/test) images (N, d)."""
  return bank_lib.encode_images(
    trained.setup.model,
    trained.params["model"],
    x,
    np.arange(x.shape[0]),
    jax.random.PRNGKey(0),
    binary=False,
  )


def cmd_bank(
  config,
  workdir: str,
  out: str,
  *,
  bank_path: str | None = None,
  allow_bank_mismatch: bool = False,
  **_,
) -> dict[str, Any]:
  """Builds the training bank, saves ``<out>/bank.npz``, reports its size."""
  trained, bank = _load(config, workdir, bank_path, allow_bank_mismatch)
  path = os.path.join(out, "bank.npz")
  bank.save(path)
  rep = dict(
    bank.size_report(path), path=path, log_var=bank.log_var, labels=bank.labels is not None
  )
  print(
    f"bank: {rep['num_exemplars']} exemplars x d={rep['latent_dim']} -> {path}: "
    f"{rep['bank_bytes']:,} bytes on disk vs {rep['raw_images_bytes']:,} bytes of raw uint8 "
    f"images ({100 * rep['ratio']:.1f}%); log s2 = {bank.log_var:.3f}",
    flush=True,
  )
  return rep


def cmd_generate(
  config,
  workdir: str,
  out: str,
  *,
  bank_path: str | None = None,
  allow_bank_mismatch: bool = False,
  num_exemplars: int = 8,
  num_samples: int = 10,
  chain_steps: int = 10,
  interp_steps: int = 10,
  num_unconditional: int = 64,
  seed: int = 0,
  **_,
) -> dict[str, Any]:
  """Conditional, unconditional, cyclic and interpolation PNGs from test exemplars."""
  trained, bank = _load(config, workdir, bank_path, allow_bank_mismatch)
  model, mp, mean_fn = trained.setup.model, trained.params["model"], trained.setup.mean_fn
  test_x = trained.splits.test_x
  e = max(2, min(int(num_exemplars), test_x.shape[0]))
  x = jnp.asarray(test_x[:e])
  lv = jnp.float32(bank.log_var)
  key = jax.random.PRNGKey(seed)
  k_cond, k_unc, k_cyc = jax.random.split(key, 3)
  res: dict[str, Any] = {"log_var": bank.log_var, "num_exemplars": e}
  imgs, _, _ = generation.conditional_samples(
    model, mp, x, lv, k_cond, int(num_samples), mean_fn=mean_fn
  )
  res["conditional_png"] = generation.save_conditional_grid(
    os.path.join(out, "conditional.png"), np.asarray(x), np.asarray(imgs)
  )
  u, _ = generation.unconditional_samples(
    model, mp, jnp.asarray(bank.codes), lv, k_unc, int(num_unconditional), mean_fn=mean_fn
  )
  res["unconditional_png"] = generation.save_samples_grid(
    os.path.join(out, "unconditional.png"), np.asarray(u)
  )
  chains = generation.cyclic_chains(
    model, mp, x, lv, k_cyc, int(chain_steps), binary=bool(trained.splits.binary), mean_fn=mean_fn
  )
  res["cyclic_png"] = generation.save_chains(
    os.path.join(out, "cyclic.png"), np.asarray(x), np.asarray(chains)
  )
  p = e // 2
  xa, xb = x[:p], x[p : 2 * p]
  za = model.encode_mean(mp, xa)
  zb = model.encode_mean(mp, xb)
  path_imgs = generation.interpolate(model, mp, za, zb, int(interp_steps), mean_fn=mean_fn)
  res["interpolation_png"] = generation.save_interpolation(
    os.path.join(out, "interpolation.png"), np.asarray(xa), np.asarray(xb), np.asarray(path_imgs)
  )
  _write_json(os.path.join(out, "generate.json"), res)
  print("generate: " + ", ".join(res[k] for k in res if k.endswith("_png")), flush=True)
  return res


def cmd_knn(
  config,
  workdir: str,
  out: str,
  *,
  bank_path: str | None = None,
  allow_bank_mismatch: bool = False,
  ks: Sequence[int] = knn.DEFAULT_KS,
  query_images: str = "grey",
  tie_break: str = "lowest_label",
  **_,
) -> dict[str, Any]:
  """kNN error per k on encoder means (val: ref = train; test: ref = train + val, and train)."""
  trained, bank = _load(config, workdir, bank_path, allow_bank_mismatch)
  prov = provenance(trained, workdir)
  res = knn.evaluate_knn(
    trained,
    bank,
    ks,
    query_images=query_images,
    tie_break=tie_break,
    progress=bool(config.progress),
  )
  res.update(prov)
  res["per_example"] = knn.PER_EXAMPLE
  arrays = knn.per_example_arrays(res)
  for _, split in knn.SETTINGS:
    del res[f"{split}_predictions"], res[f"{split}_labels"]
  npz, js = os.path.join(out, knn.PER_EXAMPLE), os.path.join(out, "knn.json")
  res["path"] = js

  def summary_writer(digests):  # written after the scores, recording their digest
    res["per_example_sha256"] = digests[npz]
    text = atomic.dumps(atomic.finite_or_none(res), indent=2) + "\n"
    return lambda f: f.write(text.encode())

  # One unit: both files to temporaries, then renamed, the summary last.
  atomic.commit([(npz, lambda _: lambda f: np.savez(f, **arrays)), (js, summary_writer)])
  print(f"kNN error (%) on encoder means [{trained.splits.name}, prior={config.prior}]")
  print("   k   val (ref=train)   test (ref=train+val)   test (ref=train)")
  for k in res["ks"]:
    print(
      f"  {k:2d}   {100 * res['val'][str(k)]:14.2f}   {100 * res['test'][str(k)]:19.2f}"
      f"   {100 * res['test_on_train'][str(k)]:15.2f}"
    )
  print(f"-> {res['path']}", flush=True)
  return res


def cmd_augment(
  config,
  workdir: str,
  out: str,
  *,
  epochs: int = 100,
  hidden: int = 1024,
  use_val: bool = True,
  seed: int = 0,
  seeds: Sequence[int] | None = None,
  encode_input: str = "grey",
  max_steps: int | None = None,
  aug_log_var: float | None = None,
  arms: Sequence[str] = augment_lib.ARMS,
  **_,
) -> dict[str, Any]:
  """MLP test error without and with generative augmentation (per seed, and their mean)."""
  trained = bank_lib.restore_trained(config, workdir)
  prov = provenance(trained, workdir)
  res = augment_lib.run_augmentation(
    trained,
    epochs=int(epochs),
    hidden=int(hidden),
    use_val=bool(use_val),
    seed=int(seed),
    seeds=seeds,
    encode_input=encode_input,
    log_var=aug_log_var,
    max_steps=max_steps or None,
    progress=bool(config.progress),
    arms=arms,
    log_every=10,  # lines only where no bar is shown
    # one record per finished classifier: run again with
    # the same --out, it trains only the missing ones
    done_dir=os.path.join(out, "augment_runs"),
  )
  res.update(prov)
  res["path"] = _write_json(os.path.join(out, "augment.json"), res)
  n = len(res["runs"])
  pm = lambda tag: (
    f"{100 * res[f'test_error_{tag}']:.2f}"  # noqa: E731
    + (f" +- {100 * res[f'test_error_{tag}_std']:.2f}" if n > 1 else "")
    + "%"
  )
  errs = " -> ".join(f"{pm(tag)} {tag}" for tag in res["arms"])
  print(
    f"MLP {res['num_train']}-example training set, h={hidden}, {epochs} epochs, "
    f"{n} seed{'s' if n > 1 else ''}, s2 = exp({res['log_var']:.3f}): test error {errs} "
    f"augmentation{'' if res['grey_eval'] else ' (binarised val/test images)'}; "
    f"-> {res['path']}",
    flush=True,
  )
  for tag in res["arms"]:
    print(
      f"  on {res['probe']} of its training images, the classifier trained {tag} "
      f"augmentation misreads {100 * res[f'aug_error_{tag}']:.2f}% of their augmented "
      f"copies ({100 * res[f'train_error_{tag}']:.2f}% of the real ones)",
      flush=True,
    )
  return res


def cmd_plots(
  config,
  workdir: str,
  out: str,
  *,
  bank_path: str | None = None,
  allow_bank_mismatch: bool = False,
  tsne_points: int = 5000,
  seed: int = 0,
  **_,
) -> dict[str, Any]:
  """t-SNE of training codes coloured by label, and the training curves."""
  trained, bank = _load(config, workdir, bank_path, allow_bank_mismatch)
  emb, labels, _ = plots.tsne_embedding(
    bank.codes, bank.labels, num_points=int(tsne_points), seed=int(seed)
  )
  res = {
    "tsne_png": plots.plot_embedding(
      os.path.join(out, "tsne.png"),
      emb,
      labels,
      title=f"t-SNE of {emb.shape[0]} encoder means ({trained.splits.name}, {config.prior} prior)",
    ),
    "tsne_points": int(emb.shape[0]),
  }
  res["curves_png"] = plots.plot_training_curves(workdir, os.path.join(out, "curves.png"))
  print(f"plots: {res['tsne_png']}, {res['curves_png']}", flush=True)
  return res


def cmd_grow(
  config,
  workdir: str,
  out: str,
  *,
  bank_path: str | None = None,
  allow_bank_mismatch: bool = False,
  **_,
) -> dict[str, Any]:
  """Adds the validation split to the bank (no training); log p(z) before/after."""
  trained, bank = _load(config, workdir, bank_path, allow_bank_mismatch)
  s = trained.splits
  model, mp = trained.setup.model, trained.params["model"]
  val_codes, test_codes = _encode(trained, s.val_x), _encode(trained, s.test_x)
  before_val, before_test = bank.log_prob(val_codes), bank.log_prob(test_codes)
  labels = s.val_y if bank.labels is not None else None
  grown = bank.add(model, mp, s.val_x, labels=labels, progress=bool(config.progress))
  meta = dict(grown.metadata, source=f"{bank.metadata.get('source', 'train')}+val")
  mine = bank_lib.params_fingerprint(mp)
  if meta.get("model_fingerprint") not in (None, mine):  # allowed mismatch: a mixed bank
    meta["model_fingerprint"] = f"mixed:{meta.get('model_fingerprint')}+{mine}"
  grown = dataclasses.replace(grown, metadata=meta)
  after_val, after_test = grown.log_prob(val_codes), grown.log_prob(test_codes)
  path = os.path.join(out, "bank_grown.npz")
  grown.save(path)
  res = {
    "num_before": bank.size,
    "num_after": grown.size,
    "path": path,
    "val_log_pz_before": float(before_val.mean()),
    "val_log_pz_after": float(after_val.mean()),
    "test_log_pz_before": float(before_test.mean()),
    "test_log_pz_after": float(after_test.mean()),
    "bank_bytes": grown.nbytes_on_disk(path),
    "raw_images_bytes": grown.raw_images_nbytes,
  }
  _write_json(os.path.join(out, "grow.json"), res)
  print(
    f"grow: {bank.size} -> {grown.size} exemplars (parameters unchanged) -> {path}\n"
    f"  mean log p(z) of validation codes: {res['val_log_pz_before']:.3f} -> "
    f"{res['val_log_pz_after']:.3f}\n"
    f"  mean log p(z) of test codes:       {res['test_log_pz_before']:.3f} -> "
    f"{res['test_log_pz_after']:.3f}",
    flush=True,
  )
  return res


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
  "bank": cmd_bank,
  "generate": cmd_generate,
  "knn": cmd_knn,
  "augment": cmd_augment,
  "plots": cmd_plots,
  "grow": cmd_grow,
}


def run(command: str, config, workdir: str, out: str | None = None, **opts) -> dict[str, Any]:
  """Runs one command.

  Args:
    command: one of :data:`COMMANDS`.
    config: the run's ConfigDict.
    workdir: the training workdir.
    out: output directory (default ``<workdir>/uses``).
    **opts: command options (see the ``cmd_*`` functions).

  Returns:
    The command's summary dict.

  Raises:
    ValueError: unknown command.
    CheckpointNotFoundError: ``workdir`` holds no checkpoint.
  """
  if command not in COMMANDS:
    raise ValueError(f"Unknown command {command!r}; commands: {sorted(COMMANDS)}")
  out = out or os.path.join(workdir, "uses")
  try:
    os.makedirs(out, exist_ok=True)
    probe = atomic.write_bytes(os.path.join(out, f".write-test-{os.getpid()}"), b"")
    os.remove(probe)  # a read-only --out fails here, before any work, in one line
  except OSError as e:
    from exvae import errors

    if errors.is_read_only(e):
      raise errors.ReadOnlyError(
        f"Cannot write the outputs in {out}: read-only or no "
        "permission. Give --out=DIR to write elsewhere."
      ) from e
    if errors.is_disk_full(e):
      raise errors.DiskFullError(
        f"Disk full while writing the outputs in {out}. Free some "
        "space, or give --out=DIR to write elsewhere."
      ) from e
    raise
  if bool(config.progress) and not progress_lib.enabled(True):
    # No terminal (a redirected log, CI): no \r progress bars in it.
    config = copy.deepcopy(config)
    config.progress = False
  return COMMANDS[command](config, workdir, out, **opts)
