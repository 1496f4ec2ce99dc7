"""Published models: a trained run's best-on-validation parameters, without its training state.

A published model is a directory of three files:

* ``config.json``: the run's config (the same file a run directory holds);
* ``params.npz``: the parameters ``{"model": ..., "prior": ...}``, one array per
  leaf, keyed by its '/'-joined path;
* ``model.json``: provenance (source run, commit, epoch, best validation loss),
  the SHA-256 of ``params.npz``, checked on every load, and the digest of the
  values of ``config.json`` (``config_sha256``, :func:`exvae.atomic.json_digest`),
  checked by every reader (:func:`exvae.rundir.check_reader_config`).

It is a few MB, where a run directory with its optimiser state and checkpoint
history is tens. ``exvae-eval`` and ``exvae-uses`` read one like a run
directory (``--workdir=results/<config>/model``); they never write into it
unless asked to (``--config.eval.out_dir``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from exvae import atomic

PARAMS_FILE = "params.npz"
META_FILE = "model.json"
CONFIG_FILE = "config.json"
_SEP = "/"

PyTree = Any


class PublishedModelError(ValueError):
  """A published model directory is incomplete, corrupt or does not fit the config."""

  exit_code = 1


def is_published(directory: str) -> bool:
  """True if ``directory`` holds a published model (``model.json`` and ``params.npz``)."""
  return os.path.isfile(os.path.join(directory, META_FILE)) and os.path.isfile(
    os.path.join(directory, PARAMS_FILE)
  )


def check_complete(directory: str) -> None:
  """Raises PublishedModelError if ``directory`` holds part of a published model only.

  A folder with ``params.npz`` but no ``model.json`` (or the other way round) was
  copied incompletely; without this it would read as a run directory that holds no
  checkpoint ("train first").
  """
  have = [n for n in (META_FILE, PARAMS_FILE) if os.path.isfile(os.path.join(directory, n))]
  if len(have) == 1:
    missing = PARAMS_FILE if have[0] == META_FILE else META_FILE
    raise PublishedModelError(
      f"{directory} holds {have[0]} but no {missing}: an incomplete published model. "
      f"Copy the whole folder ({CONFIG_FILE}, {PARAMS_FILE}, {META_FILE}) again."
    )


def save(directory: str, params: PyTree, config_json: dict, meta: dict[str, Any]) -> str:
  """Writes a published model into ``directory`` (created if missing).

  Args:
    directory: the target directory; existing files of a published model are replaced.
    params: ``{"model": ..., "prior": ...}`` parameter pytree (nested dicts of arrays).
    config_json: the run's config as a JSON-able dict (its ``config.json``).
    meta: provenance to record (e.g. ``commit``, ``source_run``, ``best_epoch``,
      ``best_val_loss``); must be JSON-able.

  Returns:
    The path of ``params.npz``.
  """
  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep=_SEP)
  params_path = os.path.join(directory, PARAMS_FILE)
  atomic.write_npz(params_path, {k: np.asarray(v) for k, v in sorted(flat.items())})
  atomic.write_json(os.path.join(directory, CONFIG_FILE), config_json, sort_keys=True)
  record = dict(
    meta,
    params_sha256=atomic.sha256_file(params_path),
    config_sha256=atomic.json_digest(config_json),
    num_parameters=int(sum(np.asarray(v).size for v in flat.values())),
  )
  atomic.write_json(os.path.join(directory, META_FILE), record, sort_keys=True)
  return params_path


def read_meta(directory: str) -> dict[str, Any]:
  """The provenance record (``model.json``) of a published model."""
  path = os.path.join(directory, META_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PublishedModelError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def load(directory: str, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
  """Loads and checks a published model's parameters.

  Args:
    directory: a published model directory.
    template: a parameter pytree of the config's model (e.g. freshly initialised);
      its structure, shapes and dtypes are what the file must hold.

  Returns:
    ``(params, meta)``: the parameters with ``template``'s structure, and ``model.json``.

  Raises:
    PublishedModelError: a file is missing, the digest does not match, or the arrays
      do not fit ``template``.
  """
  meta = read_meta(directory)
  path = os.path.join(directory, PARAMS_FILE)
  if not os.path.isfile(path):
    raise PublishedModelError(f"{path} is missing")
  digest = atomic.sha256_file(path)
  if digest != meta.get("params_sha256"):
    raise PublishedModelError(
      f"{path} does not match the SHA-256 recorded in {META_FILE} ({digest} != "
      f"{meta.get('params_sha256')}): the file is damaged, or {META_FILE} was edited"
    )
  with np.load(path) as z:
    stored = {k: z[k] for k in z.files}
  # Empty subtrees (a prior without parameters) hold no array but keep their place.
  want = traverse_util.flatten_dict(template, sep=_SEP, keep_empty_nodes=True)
  empty = {k for k, v in want.items() if v is traverse_util.empty_node}
  want = {k: v for k, v in want.items() if k not in empty}
  missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
  if missing or extra:
    raise PublishedModelError(
      f"{path} does not fit this config's model: missing {missing[:3]}, unexpected "
      f"{extra[:3]} (pass the model's own config.json)"
    )
  for k, v in want.items():
    if stored[k].shape != np.shape(v) or stored[k].dtype != np.asarray(v).dtype:
      raise PublishedModelError(
        f"{path}: {k} is {stored[k].dtype}{list(stored[k].shape)}, the config's model "
        f"needs {np.asarray(v).dtype}{list(np.shape(v))}"
      )
  flat = {k: stored[k] for k in want}
  flat.update({k: traverse_util.empty_node for k in empty})
  return traverse_util.unflatten_dict(flat, sep=_SEP), meta
