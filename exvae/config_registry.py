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
import sys
from typing import Sequence

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.py)?$")


def config_dirs() -> list[str]:
  """Directories searched for configs by name, in order (installed first, then the checkout)."""
  pkg = os.path.dirname(os.path.abspath(__file__))
  dirs = [os.path.join(pkg, "configs"), os.path.join(os.path.dirname(pkg), "configs")]
  return [d for d in dirs if os.path.isdir(d)]


def available() -> list[str]:
  """The names of the shipped configs (``configs/<name>.py``)."""
  names = set()
  for d in config_dirs():
    names.update(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(d, "*.py"))
                 if not os.path.basename(f).startswith("_"))
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
  raise ValueError(f"--config={value}: no such file and no shipped config of that name; "
                   f"known names: {', '.join(available())}.")


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """``argv`` with the value of ``--<flag>`` resolved by :func:`resolve`.

  Handles ``--config=VALUE`` and ``--config VALUE``; ``--config.key=...``
  overrides are left alone.
  """
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith(f"--{flag}="):
      out[i] = f"--{flag}=" + resolve(a[len(flag) + 3:])
    elif a == f"--{flag}" and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out


def resolve_argv_or_exit(argv: Sequence[str]) -> list[str]:
  """:func:`resolve_argv` for a console script: an unknown name exits with a one-line error."""
  try:
    return resolve_argv(argv)
  except ValueError as e:
    print(f"{os.path.basename(str(argv[0])) if argv else 'exvae'}: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def get_config(name_or_path: str):
  """Loads a config by name or path and returns its ``get_config()`` (locked ConfigDict)."""
  path = resolve(name_or_path).partition(":")[0]
  spec = importlib.util.spec_from_file_location(
      "exvae_config_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()
