"""Shared fixtures: the tiny test config and a loaded tiny data set."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(name: str = "test", **overrides):
  """Loads configs/<name>.py and applies dotted overrides (ml_collections semantics)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


@pytest.fixture
def test_config():
  return load_config("test")
