"""The classifiers of an augmentation experiment, each kept as a record once trained.

:func:`exvae.uses.augment.run_augmentation` trains one classifier per seed and arm
(without and with augmentation) through :func:`train_seeds`. Given a ``done_dir``,
each finished classifier's result is written there (``seed<S>_<arm>.json``,
:func:`classifier_record`), and a classifier whose record there has the same settings
(:func:`classifier_settings`: model parameters, epochs, width, training set, s2,
encoder input, step cap, probe; and its seed and arm) is not trained again. The
classifier in training keeps its state in ``seed<S>_<arm>.partial.npz`` every 10
epochs, so an interrupted run, started again with the same ``done_dir``, loses at
most the last 10 epochs of the classifier it was training.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from exvae import atomic
from exvae import bank as bank_lib
from exvae.uses import classifier


def classifier_settings(
  x: np.ndarray, y: np.ndarray, fit: dict[str, Any], *, encode_input: str, probe: int
) -> dict[str, Any]:
  """What every classifier's result depends on but its seed and arm (its record's identity).

  Args:
    x, y: the classifiers' training images and labels (digested).
    fit: the keyword arguments of :func:`exvae.uses.classifier.train_classifier` the
      classifiers share: the generative model's parameters ``vae_params``
      (fingerprinted), ``epochs``, ``hidden``, ``log_var`` and ``max_steps``.
    encode_input: what the encoder sees (as :func:`exvae.uses.augment.run_augmentation`).
    probe: the number of training images the train and augmented-image errors are measured on.

  Returns:
    A JSON-able dict.
  """
  max_steps = fit["max_steps"]
  return {
    "model": bank_lib.params_fingerprint(fit["vae_params"]),
    "epochs": int(fit["epochs"]),
    "hidden": int(fit["hidden"]),
    "num_train": int(x.shape[0]),
    "train_images": _digest(x, y),
    "log_var": float(fit["log_var"]),
    "encode_input": encode_input,
    "max_steps": None if max_steps is None else int(max_steps),
    "probe": int(probe),
  }


def train_seeds(
  seeds: list[int],
  arms: Sequence[str],
  common: dict[str, Any],
  split: tuple[np.ndarray, ...],
  probes: tuple[np.ndarray, ...],
  done_dir: str | None,
  fit: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[str], int]:
  """Every seed's classifier of every arm: read from ``done_dir`` if finished before, else trained.

  Args:
    seeds, arms: which classifiers.
    common: :func:`classifier_settings`; with the seed and arm, a classifier's identity.
    split, probes, done_dir, fit: as :func:`_train_arm`.

  Returns:
    ``(runs, reused, steps)``: one row per seed (each arm's test error, final
    loss, seconds, train and augmented-image errors), the names of the
    classifiers read from ``done_dir``, and the steps of the last one.
  """
  runs, reused, steps = [], [], None
  for s in seeds:
    row: dict[str, Any] = {"seed": s}
    for tag in arms:
      settings = dict(common, seed=s, arm=tag)
      result = _finished_before(done_dir, s, tag, settings)
      if result is not None:
        reused.append(_name(s, tag))
      else:
        result = _train_arm(split, probes, s, tag, settings, done_dir, fit)
      for what in ("test_error", "final_loss", "seconds", "train_error", "aug_error"):
        row[f"{what}_{tag}"] = result[what]
      steps = result["steps"]
    runs.append(row)
  return runs, reused, steps


def _name(seed: int, tag: str) -> str:
  """A classifier's name in ``done_dir``: ``seed<S>_<arm>`` (``.json``, ``.partial.npz``)."""
  return f"seed{seed}_{tag}"


def _finished_before(
  done_dir: str | None, seed: int, tag: str, settings: dict[str, Any]
) -> dict[str, Any] | None:
  """The classifier's result if ``done_dir`` holds its record made with ``settings``, else None."""
  if done_dir is None:
    return None
  path = os.path.join(done_dir, f"{_name(seed, tag)}.json")
  result = _read_record(path, settings)
  if result is not None:
    print(f"seed {seed} {tag} augmentation: done before, read from {path}", flush=True)
  return result


def _train_arm(
  split: tuple[np.ndarray, ...],
  probes: tuple[np.ndarray, ...],
  seed: int,
  tag: str,
  settings: dict[str, Any],
  done_dir: str | None,
  fit: dict[str, Any],
) -> dict[str, Any]:
  """Trains one classifier (``tag``: without or with augmentation) and measures it.

  Args:
    split: ``(x, y, test_x, test_y)``, its training and test images and labels.
    probes: ``(x, y, x_aug)``: training images, their labels and one augmented copy
      of each, on which its train and augmented-image errors are measured.
    seed: the classifier's seed.
    tag: ``"without"`` or ``"with"``.
    settings: what the result depends on (its record's and checkpoint's identity).
    done_dir: where its record is written (and its state kept while it trains), or None.
    fit: the other arguments of :func:`exvae.uses.classifier.train_classifier`.

  Returns:
    ``{'test_error', 'final_loss', 'seconds', 'train_error', 'aug_error', 'steps'}``.
  """
  x, y, test_x, test_y = split
  probe_x, probe_y, probe_aug = probes
  name = _name(seed, tag)
  ckpt = None if done_dir is None else os.path.join(done_dir, f"{name}.partial.npz")
  r = classifier.train_classifier(
    x,
    y,
    test_x,
    test_y,
    augment=tag == "with",
    seed=seed,
    checkpoint_path=ckpt,
    checkpoint_identity=settings,
    **fit,
  )
  result = {
    "test_error": r["test_error"],
    "final_loss": r["losses"][-1] if r["losses"] else None,
    "seconds": r["seconds"],
    "train_error": classifier.error_rate(r["classifier"], r["params"], probe_x, probe_y),
    "aug_error": classifier.error_rate(r["classifier"], r["params"], probe_aug, probe_y),
    "steps": r["steps"],
  }
  if done_dir is not None:
    os.makedirs(done_dir, exist_ok=True)
    atomic.write_json(os.path.join(done_dir, f"{name}.json"), classifier_record(settings, result))
    if os.path.exists(ckpt):
      os.remove(ckpt)
  return result


# ----------------------------------------------------------------------------
# One record per finished classifier (resuming a long augmentation)
# ----------------------------------------------------------------------------

RECORD_VERSION = 2  # 2: the record carries a digest of itself (atomic.SELF_DIGEST)


def _digest(x: np.ndarray, y: np.ndarray) -> str:
  """A short hash of the classifier's training images and labels."""
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)):
    h.update(f"{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def classifier_record(settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
  """The JSON record of one finished classifier.

  Args:
    settings: everything the result depends on (the model parameters'
      fingerprint, epochs, width, training set, s2, encoder input, step cap,
      probe size, seed and arm).
    result: ``test_error``, ``final_loss``, ``seconds``, ``train_error``,
      ``aug_error`` and ``steps``.

  Returns:
    ``{"version", "settings", "result", "record_sha256"}``: the last is the digest of
    the rest, checked before the result is reused.
  """
  return atomic.with_self_digest(
    {"version": RECORD_VERSION, "settings": settings, "result": result}
  )


def _read_record(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
  """The result in ``path`` if it was made with ``settings``, else None (with a line why)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      rec = json.load(f)
    ok = (
      rec.get("version") == RECORD_VERSION
      and rec.get("settings") == settings
      and isinstance(rec.get("result"), dict)
    )
    if ok:
      atomic.check_self_digest(rec, path, required=True)
  except (OSError, ValueError, AttributeError) as e:
    print(
      f"{path}: unreadable ({type(e).__name__}: {e}); training this classifier again", flush=True
    )
    return None
  if not ok:
    print(f"{path}: made with other settings; training this classifier again", flush=True)
    return None
  return rec["result"]
