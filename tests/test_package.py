"""The installable package: `pip install .` in a fresh venv, console scripts from outside the repo.

Offline and fast: the fresh venv sees the project's environment through a
.pth file (pip, setuptools and the dependencies; nothing is downloaded), and
exvae itself is installed with --no-deps --no-build-isolation from a copy of
the source tree, so the checkout stays clean.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from conftest import ROOT

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
_IGNORE = shutil.ignore_patterns(
  ".git",
  ".venv",
  "runs",
  "workdirs",
  "results",
  "carry",
  "build",
  "__pycache__",
  "*.egg-info",
  ".pytest_cache",
)


def _fresh_venv(path):
  """A venv without pip whose site-packages also sees this interpreter's (via a .pth)."""
  subprocess.run(
    [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120
  )
  py = os.path.join(str(path), "bin", "python")
  site = subprocess.run(
    [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  parents = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
  with open(os.path.join(site, "_project_env.pth"), "w") as f:
    f.write("\n".join(dict.fromkeys(parents)) + "\n")
  return py


def _pip_install(py, *args, cwd):
  import setuptools

  major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
  assert (major, minor) >= (70, 1), (
    f"setuptools {setuptools.__version__} cannot build a wheel without the `wheel` package; "
    f"install the pinned set: pip install -r requirements.txt"
  )
  r = subprocess.run(
    [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout + r.stderr


def _run(cmd, cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH="")  # nothing from the checkout
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
  assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
  return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv python, bin dir, an empty directory outside the repository)."""
  base = tmp_path_factory.mktemp("pkg")
  src = base / "src"
  shutil.copytree(ROOT, src, ignore=_IGNORE)
  py = _fresh_venv(base / "venv")
  _pip_install(py, str(src), cwd=str(base))
  outside = base / "elsewhere"
  outside.mkdir()
  return py, os.path.dirname(py), outside


def test_installed_package_is_complete_and_outside_the_checkout(installed):
  py, _, outside = installed
  out = _run(
    [
      py,
      "-c",
      "import exvae, exvae.config_registry as r, exvae.kernels.cpu_fused as k; "
      "print(exvae.__file__); print(r.resolve('test')); print(k._SRC.is_file())",
    ],
    cwd=str(outside),
  ).split()
  assert not out[0].startswith(ROOT) and "site-packages" in out[0]
  assert out[1].endswith(os.path.join("exvae", "configs", "test.py")) and "site-packages" in out[1]
  assert out[2] == "True"  # the fused kernel's C++ source is package data
  # Every module of the source tree is in the wheel (a new subpackage must be
  # listed in pyproject.toml), and every shipped config too.
  site_pkg = os.path.dirname(os.path.dirname(out[0]))
  want = {
    os.path.relpath(f, ROOT)
    for f in glob.glob(os.path.join(ROOT, "exvae", "**", "*.py"), recursive=True)
  }
  want |= {
    os.path.join("exvae", "configs", os.path.basename(f))
    for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  }
  have = {
    os.path.relpath(f, site_pkg)
    for f in glob.glob(os.path.join(site_pkg, "exvae", "**", "*.py"), recursive=True)
  }
  assert want <= have, sorted(want - have)
  configs = _run([os.path.join(installed[1], "exvae"), "configs"], cwd=str(outside)).split()
  assert "fashion_vae_exemplar_rat" in configs and "test" in configs and len(configs) >= 38


@pytest.mark.slow
def test_console_scripts_train_and_eval_a_config_by_name_from_anywhere(installed):
  py, bin_dir, outside = installed
  if os.path.exists(FASHION):  # a paper config, shrunk for a CPU test
    name = "fashion_vae_exemplar_rat"
    small = [
      "--config.max_train=600",
      "--config.max_test=100",
      "--config.batch_size=50",
      "--config.exemplar.num_exemplars=200",
      "--config.num_picture_samples=8",
      "--config.eval.num_importance_samples=8",
      "--config.eval.max_test_examples=40",
      "--config.eval.max_queries=400",
      "--config.warmup_epochs=1",
    ]
  else:  # CI without the Debian data package
    name = "test"
    small = []
  wd = str(outside / "runs" / "by_name")
  common = [
    f"--config={name}",
    f"--workdir={wd}",
    "--config.num_epochs=1",
    "--config.progress=False",
    *small,
  ]
  out = _run([os.path.join(bin_dir, "exvae-train"), *common], cwd=str(outside))
  assert out.strip().splitlines()[-1].startswith("finished: step ")
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["num_epochs"] == 1
  if name != "test":
    assert saved["dataset"] == "fashion_mnist" and saved["exemplar"]["rat"] is True
  out = _run([os.path.join(bin_dir, "exvae-eval"), *common], cwd=str(outside))
  m = json.load(open(os.path.join(wd, "eval_metrics.json")))
  assert np.isfinite(m["test_nll"]) and f"test NLL = {m['test_nll']:.2f}" in out
  assert os.path.isfile(os.path.join(wd, "per_example.npz"))
  # The one `exvae` command reaches the same entry points.
  out = _run([os.path.join(bin_dir, "exvae"), "compare", wd, wd], cwd=str(outside))
  assert "diff +0.0000" in out
  _run([os.path.join(bin_dir, "exvae-uses"), "bank", *common], cwd=str(outside))
  assert os.path.isfile(os.path.join(wd, "uses", "bank.npz"))
  r = subprocess.run(
    [os.path.join(bin_dir, "exvae-train"), "--config=no_such_config", f"--workdir={wd}"],
    capture_output=True,
    text=True,
    cwd=str(outside),
  )
  assert r.returncode == 2 and "no shipped config" in r.stderr and "Traceback" not in r.stderr


def test_editable_install_finds_configs_by_name(tmp_path):
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=_IGNORE)
  py = _fresh_venv(tmp_path / "venv")
  _pip_install(py, "-e", str(src), cwd=str(tmp_path))
  out = _run(
    [
      py,
      "-c",
      "import exvae, exvae.config_registry as r; print(exvae.__file__); "
      "print(r.resolve('fashion_vae_exemplar_rat')); "
      "print(r.get_config('mnist_hvae_vampprior').model)",
    ],
    cwd=str(tmp_path),
  ).split()
  assert out[0] == str(src / "exvae" / "__init__.py")
  assert out[1] == str(src / "configs" / "fashion_vae_exemplar_rat.py")
  assert out[2] == "hvae"


def test_setup_script_leaves_the_console_scripts_in_the_venv(tmp_path):
  """scripts/setup.sh (so the quickstart too) installs exvae into .venv with its commands.

  Run as is on a copy of the checkout whose .venv already sees the pinned set (offline:
  PIP_NO_INDEX); the data step finds Fashion-MNIST or only prints a note."""
  if not os.path.exists(FASHION):
    pytest.skip("Fashion-MNIST is not installed: setup.sh would try apt-get")
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=_IGNORE)
  _fresh_venv(src / ".venv")
  env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONPATH="")
  r = subprocess.run(
    ["bash", str(src / "scripts" / "setup.sh")],
    capture_output=True,
    text=True,
    cwd=str(tmp_path),
    env=env,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  bin_dir = src / ".venv" / "bin"
  for name in ("exvae", "exvae-train", "exvae-eval", "exvae-uses", "exvae-compare"):
    assert os.access(bin_dir / name, os.X_OK), name
  out = _run([str(bin_dir / "exvae"), "configs"], cwd=str(tmp_path)).split()
  assert "fashion_vae_exemplar_rat" in out and "quickstart" in out
  out = _run(
    [str(bin_dir / "python"), "-c", "import exvae; print(exvae.__file__)"], cwd=str(tmp_path)
  )
  assert out.strip() == str(src / "exvae" / "__init__.py")  # editable: the checkout


def _pyproject():
  tomllib = pytest.importorskip("tomllib")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _requirement(spec: str):
  from packaging.requirements import Requirement

  return Requirement(spec)


def _verified_jax() -> dict:
  """jax versions the tests passed on: the CPU pin, and each device check that ran tests."""
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
  found = {pins["jax"]: "requirements.txt"}
  for env in glob.glob(os.path.join(ROOT, "results", "device", "*", "env.json")):
    tests = os.path.join(os.path.dirname(env), "tests.json")
    if not os.path.exists(tests):
      continue
    with open(env) as f, open(tests) as g:
      version, counts = json.load(f)["versions"]["jax"], json.load(g).get("counts", {})
    if counts.get("passed", 0) > 0:
      found[version] = os.path.relpath(env, ROOT)
  return found


def test_the_declared_jax_range_is_the_verified_one():
  # Each minor series the range admits holds a version the tests passed on, and every such
  # version is admitted: the range grows only with a device check that records it.
  from packaging.version import Version

  spec = next(
    _requirement(d).specifier for d in _pyproject()["dependencies"] if _requirement(d).name == "jax"
  )
  verified = _verified_jax()
  assert all(spec.contains(v) for v in verified), (spec, verified)
  admitted = {m for m in range(40) for p in (0, 99) if spec.contains(f"0.{m}.{p}")}
  assert admitted == {Version(v).minor for v in verified}, (spec, verified)


# Distribution name -> the module it is imported as; plug-ins and tools are not imported.
_IMPORT_NAMES = {
  "absl-py": "absl",
  "orbax-checkpoint": "orbax",
  "scikit-learn": "sklearn",
  "pillow": "PIL",
  "tensorflow-datasets": "tensorflow_datasets",
  "tensorboardX": "tensorboardX",
}
_NOT_IMPORTED = {"pytest-xdist"}  # a pytest plug-in (`pytest -n 2`)


def test_every_declared_dependency_is_imported():
  import re

  project = _pyproject()
  names = [_requirement(d).name for d in project["dependencies"]]
  names += [
    _requirement(d).name for extra in project["optional-dependencies"].values() for d in extra
  ]
  sources = [
    p
    for p in subprocess.run(
      ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
  ]
  text = "\n".join(
    open(os.path.join(ROOT, p), encoding="utf-8").read()
    for p in sources
    if os.path.exists(os.path.join(ROOT, p))
  )
  unused = []
  for name in names:
    if name in _NOT_IMPORTED:
      continue
    module = _IMPORT_NAMES.get(name, name.replace("-", "_"))
    if not re.search(rf"^\s*(import|from) {re.escape(module)}(\.|\s|$)", text, re.MULTILINE):
      unused.append(name)
  assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
