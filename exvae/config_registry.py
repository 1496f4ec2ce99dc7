"""The shipped configs by name: ``--config=fashion_vae_exemplar_rat`` as well as by path.

The repository's ``configs/*.py`` are installed with the package as
``exvae/configs/*.py`` (``pyproject.toml`` maps the package ``exvae.configs``
onto ``configs/``), so a name resolves in an installed package and in a
checkout alike. A ``--config`` value that is an existing file is used as is
(``--config=configs/x.py`` or ``--config=/my/own.py``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from typing import Any, Sequence

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.py)?$")


def config_dirs() -> list[str]:
  """Directories searched for configs by name, in order (installed first, then the checkout)."""
  pkg = os.path.dirname(os.path.abspath(__file__))
  dirs = [os.path.join(pkg, "configs"), os.path.join(os.path.dirname(pkg), "configs")]
  return [d for d in dirs if os.path.isdir(d)]


def shipped_configs() -> list[str]:
  """The names of the shipped configs (``configs/<name>.py``)."""
  names = set()
  for d in config_dirs():
    names.update(
      os.path.basename(f)[:-3]
      for f in glob.glob(os.path.join(d, "*.py"))
      if not os.path.basename(f).startswith("_")
    )
  return sorted(names)


def resolve(value: str) -> str:
  """The config file for ``value``: an existing path, or a shipped config's name.

  Args:
    value: a path (optionally ``path:args``, as ml_collections allows) or a
      name such as ``fashion_vae_exemplar_rat`` (``.py`` optional).

  Returns:
    ``value`` unchanged if it names an existing file or is not a bare name;
    otherwise the path of the shipped config (with any ``:args`` kept).

  Raises:
    ValueError: a bare name that is no shipped config (lists the known names).
  """
  base, sep, rest = value.partition(":")
  if os.path.exists(value) or os.path.exists(base) or not _NAME.match(base):
    return value
  name = base[:-3] if base.endswith(".py") else base
  for d in config_dirs():
    path = os.path.join(d, name + ".py")
    if os.path.isfile(path):
      return path + sep + rest
  raise ValueError(
    f"--config={value}: no such file and no shipped config of that name; "
    f"known names: {', '.join(shipped_configs())}."
  )


def get_config(name_or_path: str):
  """Loads a config by name or path (``.py`` or ``.json``); see :func:`load`."""
  return load(name_or_path)


# ----------------------------------------------------------------------------
# Loading a config (a name, a .py file or a run's config.json) and overriding it
# ----------------------------------------------------------------------------

# Groups whose keys are free: a plug-in's constructor options. ``--config.prior_options.k=5``
# adds the key ``k`` (any other unknown key is a mistake, reported with "did you mean").
FREE_GROUPS = ("prior_options", "model_options")


class ConfigNameError(ValueError):
  """A ``--config`` value, or a ``--config.KEY`` override, that names nothing (a usage error)."""

  exit_code = 2


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
  import difflib

  close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.7)
  return f" Did you mean {' or '.join(close)}?" if close else ""


def from_json(path: str):
  """A run's ``config.json`` as a ConfigDict, read as JSON (never executed).

  The values are laid over :func:`exvae.config_base.base_config`, so tuples
  stay tuples and the key types are the base config's; keys the base config
  does not know (a file written by another version) are kept as stored.

  Args:
    path: a JSON file holding a config (``<workdir>/config.json``).

  Returns:
    The locked ConfigDict (free groups unlocked, see :data:`FREE_GROUPS`).

  Raises:
    ConfigNameError: the file is not a JSON object.
  """
  import json

  from exvae import config_base

  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigNameError(f"--config={path}: cannot read it as JSON ({e}).") from None
  if not isinstance(stored, dict):
    raise ConfigNameError(f"--config={path}: not a JSON object (a config holds keys).")
  c = config_base.base_config()

  def lay(node, values):
    for k, v in values.items():
      if k in node and hasattr(node[k], "items") and isinstance(v, dict):
        with node[k].unlocked():
          lay(node[k], v)
      elif k in node and isinstance(node[k], tuple) and isinstance(v, list):
        node[k] = tuple(v)
      elif k in node and node[k] is not None and v is not None:
        with node.ignore_type():
          node[k] = v
      else:
        with node.unlocked():
          node[k] = v

  lay(c, stored)
  return config_base.finalize(c)


def load(value: str):
  """The config named by ``--config=value``: a shipped name, a ``.py`` path or a ``.json`` file.

  Args:
    value: ``fashion_vae_exemplar_rat``, ``configs/x.py`` (optionally
      ``configs/x.py:ARG``, given to ``get_config(ARG)``) or
      ``runs/fx/config.json``.

  Returns:
    The ConfigDict.

  Raises:
    ConfigNameError: an unknown name (with "did you mean") or a file without
      ``get_config``.
    exvae.errors.SourceSyntaxError: the file does not compile (its file and line).
    Exception: whatever the config file itself raises (its own mistake).
  """
  base, _, arg = value.partition(":")
  path = base if os.path.exists(base) else value
  if os.path.isfile(path) and path.endswith(".json"):
    return from_json(path)
  try:
    resolved = resolve(value)
  except ValueError:
    name = base[:-3] if base.endswith(".py") else base
    hint = _did_you_mean(name, shipped_configs()) if _NAME.match(base) else ""
    raise ConfigNameError(
      f"--config={value}: no such file and no shipped config of that name."
      f"{hint or ' Run `exvae configs` for the names.'}"
    ) from None
  path, _, arg = resolved.partition(":")
  if os.path.isdir(path):
    raise ConfigNameError(
      f"--config={value} is a directory; give a config name, a .py file "
      f"or a run's config.json (--config={os.path.join(path, 'config.json')})."
    )
  if not os.path.isfile(path):
    raise ConfigNameError(f"--config={value}: no such file.")
  spec = importlib.util.spec_from_file_location(
    "exvae_config_" + os.path.basename(path).split(".")[0], path
  )
  if spec is None or spec.loader is None:
    raise ConfigNameError(f"--config={value}: not a Python (.py) or JSON (.json) config file.")
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except SyntaxError as e:  # the file's own mistake, in one line
    from exvae import errors

    raise errors.source_syntax_error(e, f"--config={value}") from None
  if not hasattr(mod, "get_config"):
    raise ConfigNameError(f"--config={value}: {path} defines no get_config().")
  return mod.get_config(arg) if arg else mod.get_config()


def _parse_value(key: str, text: str, current: Any) -> Any:
  """``text`` converted to the type of the key's current value (ml_collections' flag semantics)."""
  import ast

  def literal(t):
    try:
      return ast.literal_eval(t)
    except (ValueError, SyntaxError):
      return t

  def bad(kind):
    return ConfigNameError(f"--config.{key}={text}: expected {kind} (now {current!r}).")

  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes", "t", "y"):
      return True
    if low in ("false", "0", "no", "f", "n"):
      return False
    raise bad("true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      v = literal(text)
      if isinstance(v, float) and v.is_integer():
        return int(v)
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    if "," not in text and text.strip()[:1] not in "([":
      # One value for a tuple (--config.hidden=300) would silently make it one entry long.
      example = ",".join([text.strip()] * max(len(current), 2))
      raise ConfigNameError(
        f"--config.{key}={text}: {key} is a tuple (now {tuple(current)!r}); "
        f"give every entry, e.g. --config.{key}={example} (one entry: "
        f"--config.{key}={text.strip()},)."
      )
    t = text.strip()
    v = literal(t if t[:1] in "([" else f"({t})" if t.endswith(",") else f"({t},)")
    if not isinstance(v, (tuple, list)):
      raise bad("a tuple such as 16,16")
    return type(current)(v)
  return literal(text)


def _keys(node, prefix: str = "") -> list[str]:
  out = []
  for k in node.keys():
    out.append(prefix + k)
    if hasattr(node[k], "items"):
      out.extend(_keys(node[k], prefix + k + "."))
  return out


def apply_overrides(config, overrides: Sequence[tuple[str, str]]):
  """Applies ``--config.KEY=VALUE`` overrides (dotted keys) to ``config`` in place.

  Values are parsed by the type of the key's current value; keys under a
  group of :data:`FREE_GROUPS` may be new (their value is read as a Python
  literal, else kept as a string).

  Args:
    config: the ConfigDict.
    overrides: ``(dotted key, text)`` pairs, applied in order.

  Returns:
    ``config``.

  Raises:
    ConfigNameError: an unknown key (with "did you mean"), a key that is a
      group, or a value of the wrong type.
  """
  for key, text in overrides:
    parts = key.split(".")
    node = config
    for i, p in enumerate(parts[:-1]):
      if p not in node or not hasattr(node[p], "items"):
        if parts[0] in FREE_GROUPS and i > 0 and p not in node:
          import ml_collections

          with node.unlocked():
            node[p] = ml_collections.ConfigDict()
        else:
          raise _unknown(config, key)
      node = node[p]
    leaf = parts[-1]
    free = parts[0] in FREE_GROUPS and len(parts) > 1
    if leaf not in node:
      if not free:
        raise _unknown(config, key)
      with node.unlocked():
        node[leaf] = _parse_value(key, text, None)
      continue
    current = node[leaf]
    if hasattr(current, "items"):
      raise ConfigNameError(
        f"--config.{key} is a group of keys ({', '.join(current.keys())}); "
        f"set one of them, e.g. --config.{key}.KEY=VALUE."
      )
    value = _parse_value(key, text, current)
    if free or current is None:
      with node.ignore_type():
        node[leaf] = value
    else:
      try:
        node[leaf] = value
      except TypeError as e:
        raise ConfigNameError(f"--config.{key}={text}: {e}") from None
  return config


def _unknown(config, key: str) -> ConfigNameError:
  hint = _did_you_mean(key, _keys(config))
  return ConfigNameError(
    f"--config.{key}: the config has no key {key!r}.{hint or ' `--help` lists the keys.'}"
  )
