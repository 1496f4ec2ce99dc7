"""Priors and models from the user's own code: ``--config.prior=my_pkg.my_prior:MyPrior``.

A config names a prior (``config.prior``) or a model (``config.model``)
either by a registered name (``exemplar``, ``hvae``) or by a plug-in spec
``MODULE:ATTR``:

* ``MODULE`` is a dotted module path (``my_pkg.my_prior``), imported from
  ``sys.path`` and, failing that, from the current directory (as
  ``python -m`` would), or a path to a ``.py`` file (``examples/my_prior.py``,
  relative to the current directory);
* ``ATTR`` is the name in that module (dots reach nested attributes).

The spec is imported on demand, registered under the spec itself, and stays
in the run's config (``config.json``), so resuming and ``exvae-eval`` with the
same ``--config.prior=...`` find it again. Nothing in ``exvae/`` is edited.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any


def is_spec(name: str) -> bool:
  """Whether ``name`` is a ``MODULE:ATTR`` plug-in spec (not a registered name)."""
  module, sep, attr = str(name).rpartition(":")
  return bool(sep and module and attr)


def _import_file(path: str):
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"plug-in file {path} does not exist.")
  # One module per file, whatever the spelling of its path: importing twice
  # would run its registrations twice.
  name = "exvae_plugin_" + hashlib.sha1(path.encode()).hexdigest()[:12]
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def _import_module(dotted: str):
  try:
    return importlib.import_module(dotted)
  except ModuleNotFoundError as e:
    top = dotted.split(".")[0]
    if e.name != top or os.getcwd() in sys.path:
      raise
  sys.path.append(os.getcwd())            # console scripts do not put the cwd on sys.path
  return importlib.import_module(dotted)


def load(spec: str, kind: str = "plug-in") -> Any:
  """Imports and returns the object named by ``spec`` (``MODULE:ATTR``).

  Args:
    spec: ``my_pkg.my_prior:MyPrior`` or ``path/to/file.py:MyPrior``.
    kind: what is loaded, for error messages (``'prior'``, ``'model'``).

  Returns:
    The attribute.

  Raises:
    ValueError: a malformed spec, a module that cannot be found, or a
      missing attribute (the message says which and where it looked).
  """
  module_path, _, attr = str(spec).rpartition(":")
  if not (module_path and attr):
    raise ValueError(f"{kind} plug-in {spec!r}: expected MODULE:ATTR, e.g. my_pkg.my_prior:MyPrior.")
  try:
    if module_path.endswith(".py") or os.sep in module_path or "/" in module_path:
      module = _import_file(module_path)
    else:
      module = _import_module(module_path)
  except ModuleNotFoundError as e:
    raise ValueError(f"{kind} plug-in {spec!r}: cannot import {module_path!r} ({e}); put its "
                     f"directory on PYTHONPATH, run from it, or give a file path "
                     f"(path/to/{module_path.split('.')[-1]}.py:{attr}).") from e
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"{kind} plug-in {spec!r}: {module_path} has no attribute {attr!r}.")
    obj = getattr(obj, part)
  return obj
