"""Priors, models and data sets from the user's own code: ``--config.prior=my_pkg.my_prior:MyPrior``.

A config names a prior (``config.prior``), a model (``config.model``) or a
data set (``config.dataset``, see :mod:`exvae.data.user`)
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

This module loads and builds plug-ins, and imports nothing that uses them: what
is checked of a plug-in prior lives in :mod:`exvae.priors.checks`, of a data set
in :mod:`exvae.data.user`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any

from exvae import errors


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
  sys.path.append(os.getcwd())  # console scripts do not put the cwd on sys.path
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
      missing attribute (the message says which and where it looked);
      :class:`exvae.errors.SourceSyntaxError` for a module that does not compile.
  """
  module_path, _, attr = str(spec).rpartition(":")
  if not (module_path and attr):
    raise ValueError(
      f"{kind} plug-in {spec!r}: expected MODULE:ATTR, e.g. my_pkg.my_prior:MyPrior."
    )
  try:
    if module_path.endswith(".py") or os.sep in module_path or "/" in module_path:
      module = _import_file(module_path)
    else:
      module = _import_module(module_path)
  except ModuleNotFoundError as e:
    raise ValueError(
      f"{kind} plug-in {spec!r}: cannot import {module_path!r} ({e}); put its "
      f"directory on PYTHONPATH, run from it, or give a file path "
      f"(path/to/{module_path.split('.')[-1]}.py:{attr})."
    ) from e
  except SyntaxError as e:  # the plug-in's own mistake, in one line
    raise errors.source_syntax_error(e, f"{kind} plug-in {spec!r}") from None
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"{kind} plug-in {spec!r}: {module_path} has no attribute {attr!r}.")
    obj = getattr(obj, part)
  return obj


# ----------------------------------------------------------------------------
# Constructor options
# ----------------------------------------------------------------------------


class PluginError(ValueError):
  """A plug-in that cannot work: a missing method, a wrong shape or unusable options."""


def options(config, group: str) -> dict[str, Any]:
  """``config.<group>`` (``prior_options`` / ``model_options``) as a plain dict ({} if absent)."""
  if config is None or not hasattr(config, "get"):
    return {}
  opts = config.get(group)
  if opts is None:
    return {}
  return opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)


def construct(factory: Any, spec: str, kind: str, *args: Any, opts: dict[str, Any]) -> Any:
  """``factory(*args, **opts)``: a plug-in built with its options from the config.

  Args:
    factory: the plug-in's class or function.
    spec: its ``MODULE:ATTR`` spec (for messages).
    kind: ``'prior'`` or ``'model'`` (the options group is ``<kind>_options``).
    *args: the positional arguments (the config; the image shape for a model).
    opts: the keyword arguments (``config.<kind>_options``).

  Returns:
    What ``factory`` returns.

  Raises:
    PluginError: the factory does not take these options.
  """
  check_options(factory, spec, kind, *args, opts=opts)
  return factory(*args, **opts)


def check_options(factory: Any, spec: str, kind: str, *args: Any, opts: dict[str, Any]) -> None:
  """``factory`` takes ``opts`` (by name, and by type where its signature says one).

  Args: as :func:`construct` (``args`` only count; their values are not looked at).

  Raises:
    PluginError: an option the factory does not take, or of another type than its
      argument's annotation or default, naming the option.
  """
  import inspect

  if not opts:
    return
  try:
    sig = inspect.signature(factory)
    sig.bind(*args, **opts)
  except TypeError as e:
    raise PluginError(
      f"{kind} plug-in {spec!r} does not take {kind}_options "
      f"{sorted(opts)} ({e}); its constructor's keyword arguments are "
      f"set with --config.{kind}_options.NAME=VALUE."
    ) from None
  except ValueError:  # no signature (a builtin): let the call say
    return
  _check_option_types(factory, sig, spec, kind, opts)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option_type(factory: Any, param: Any) -> type | None:
  """The scalar type a constructor argument takes: its annotation, else its default's type."""
  import typing

  ann = param.annotation
  if isinstance(ann, str):  # `from __future__ import annotations`
    try:
      ann = typing.get_type_hints(getattr(factory, "__init__", factory)).get(param.name, ann)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: use the default)
      ann = None
  if ann in _SCALARS:
    return ann
  default = param.default
  if default is not param.empty and type(default) in _SCALARS:
    return type(default)
  return None


def _check_option_types(factory: Any, sig: Any, spec: str, kind: str, opts: dict[str, Any]) -> None:
  """Each option has the scalar type its constructor argument declares (or defaults to).

  Raises:
    PluginError: naming the option, its value and the type it needs.
  """
  for name, value in opts.items():
    param = sig.parameters.get(name)
    want = None if param is None else _option_type(factory, param)
    if want is None:
      continue
    ok = (
      isinstance(value, want)
      and not (want is int and isinstance(value, bool))
      or want is float
      and isinstance(value, int)
      and not isinstance(value, bool)
    )
    if not ok:
      default = "" if param.default is param.empty else f" (default {param.default!r})"
      raise PluginError(
        f"--config.{kind}_options.{name}={value!r}: {kind} plug-in {spec!r} "
        f"takes {_SCALARS[want]} for {name}{default}."
      )
