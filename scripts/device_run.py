"""Paper runs in device-sized chunks: the helper behind ``scripts/device_run.sh``.

A lent GPU machine gets a copy of the working tree (at most 64 MiB), runs one
command of at most 10 minutes, and returns at most 8 files of 16 MiB from
``$OUT``. A run therefore travels as a gzipped tar of its newest checkpoint
(``scripts/carry_runs.py``'s packing) split into parts of 15 MiB, kept in
``carry/device/<config>/`` with a ``manifest.json`` (step, epoch, best
validation loss, SHA-256 of the whole archive).

Here (with the venv):
  prepare CONFIG [--eval]  fill ``.carry-run/`` (the ml_collections wheel, the
                           data as .xz), hold aside the tracked files the device
                           does not need, print what would travel; exit 1 if > 64 MiB
  restore                  put the held files back
  unpack CONFIG DIR        the files a call returned (``DIR/CONFIG/``) into
                           ``carry/device/CONFIG/``; then ``restore``
There (called by device_run.sh):
  setup CONFIG WORKDIR     the carried run into WORKDIR (fresh); prints the data dir
  pack CONFIG WORKDIR OUT  WORKDIR's newest checkpoint into OUT/CONFIG/run.tar.gz.NN
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LIMIT_BYTES = 64 * 2**20  # what travels to the device
PART_BYTES = 15 * 2**20  # each returned file is at most 16 MiB
CARRIED = ".carry-run"  # git-ignored; named in the run tool's carry list
CACHE = ".carry-run-cache"  # git-ignored; never travels (the full .xz data, the wheel)
HOLD = ".device-hold"  # git-ignored; tracked files held aside during a call
ARCHIVE = "run.tar.gz"
MANIFEST = "manifest.json"
EVAL_FILES = ("eval_metrics.json", "per_example.npz", "eval_samples.png", "eval_partial.npz")
IDX = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
# A training call reads no test image (only eval.py does), but the IDX loader wants all
# four files: it gets the first TRAIN_CALL_TEST genuine test images, 3.7 MB less to carry.
TRAIN_CALL_TEST = 100
# Tracked paths a device_run.sh call never reads: the published models and results (46 MB),
# the documentation and its pictures, the tests and benchmarks (2 MB).
HOLD_PREFIXES = ("results/", "docs/", "tests/", "bench/", "reference/", "examples/")


class DeviceRunError(Exception):
  """A step that cannot be done; the message is one line for the user."""


def carry_dir(config: str, root: str = ROOT) -> str:
  """Where the run of ``config`` is kept between calls (``DEVICE_RUN_CARRY`` overrides)."""
  base = os.environ.get("DEVICE_RUN_CARRY") or os.path.join(root, "carry", "device")
  return os.path.join(base, config)


def carried_dir(root: str = ROOT) -> str:
  """The folder the run tool carries (``DEVICE_RUN_CARRIED`` overrides, for tests)."""
  return os.environ.get("DEVICE_RUN_CARRIED") or os.path.join(root, CARRIED)


def _git_files(root: str, *args: str) -> list[str]:
  out = subprocess.run(
    ["git", "ls-files", "-z", *args], cwd=root, check=True, capture_output=True
  ).stdout.decode()
  return [p for p in out.split("\0") if p]


def _dir_bytes(path: str) -> int:
  total = 0
  for base, _, files in os.walk(path):
    total += sum(
      os.path.getsize(os.path.join(base, f)) for f in files if os.path.isfile(os.path.join(base, f))
    )
  return total


def travel_bytes(root: str = ROOT, carried: tuple[str, ...] = (CARRIED,)) -> dict[str, int]:
  """What a device call would copy: tracked files that exist, untracked-not-ignored, carried."""
  paths = set(_git_files(root)) | set(_git_files(root, "--others", "--exclude-standard"))
  tree = sum(
    os.path.getsize(os.path.join(root, p)) for p in paths if os.path.isfile(os.path.join(root, p))
  )
  extra = sum(_dir_bytes(os.path.join(root, c)) for c in carried)
  return {"tree": tree, "carried": extra, "total": tree + extra}


def hold(root: str, keep: str) -> int:
  """Moves the files the device does not need under ``HOLD/`` (same relative paths).

  Held: ``HOLD_PREFIXES`` and every other run's ``carry/`` archives; ``keep`` (a path
  prefix, the config's carry directory) stays.
  """
  moved = 0
  for rel in _git_files(root) + _git_files(root, "--others", "--exclude-standard"):
    src = os.path.join(root, rel)
    if not os.path.isfile(src) or (keep and rel.startswith(keep)):
      continue
    if rel.startswith(HOLD_PREFIXES) or rel.startswith("carry/"):
      dst = os.path.join(root, HOLD, rel)
      if os.path.exists(dst):
        raise DeviceRunError(f"{dst} exists: run 'scripts/device_run.sh --restore' first")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
      moved += 1
  return moved


def restore(root: str = ROOT) -> int:
  """Moves every held file back; returns how many. A file present in the tree is kept."""
  held = os.path.join(root, HOLD)
  n = 0
  for base, _, files in os.walk(held):
    for f in files:
      src = os.path.join(base, f)
      dst = os.path.join(root, os.path.relpath(src, held))
      if os.path.exists(dst):
        print(f"{dst} exists: left {src} where it is", file=sys.stderr)
        continue
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
      n += 1
  if os.path.isdir(held) and not any(files for _, _, files in os.walk(held)):
    shutil.rmtree(held)
  return n


def _xz(src: str, dst: str, limit_items: int | None = None) -> None:
  """The IDX file ``src`` (raw or .gz) as ``dst`` (.xz of the raw IDX), its first
  ``limit_items`` items only if given (the header's count is changed to match)."""
  with open(src, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  with (gzip.open if gz else open)(src, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\0\0" or raw[2] != 0x08:
    raise DeviceRunError(f"{src}: not an IDX file of uint8")
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  hdr = 4 + 4 * ndim
  n = dims[0] if limit_items is None else min(dims[0], limit_items)
  per_item = 1
  for d in dims[1:]:
    per_item *= d
  body = raw[hdr : hdr + n * per_item]
  tmp = dst + ".tmp"
  with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
    f.write(raw[:4] + n.to_bytes(4, "big") + raw[8:hdr] + body)
  os.replace(tmp, dst)


def _fashion_source() -> str:
  src = os.environ.get("EXVAE_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist"
  for base in IDX:
    if not any(os.path.isfile(os.path.join(src, base + s)) for s in (".gz", "")):
      raise DeviceRunError(
        f"missing {src}/{base}[.gz]: apt-get install dataset-fashion-mnist, "
        "or set EXVAE_FASHION_MNIST_DIR to the four IDX files"
      )
  return src


def carry_data(root: str, dataset: str, mode: str) -> None:
  """``.carry-run/data/``: the data set's IDX files as .xz (the full ones cached in ``CACHE``).

  A training call carries the first ``TRAIN_CALL_TEST`` test images, an evaluation all.
  The sklearn digits ship with scikit-learn and need nothing.
  """
  out = os.path.join(carried_dir(root), "data")
  shutil.rmtree(out, ignore_errors=True)
  if dataset == "digits":
    return
  if dataset != "fashion_mnist":
    raise DeviceRunError(
      f"dataset {dataset!r}: only Fashion-MNIST and the sklearn digits are carried to the device"
    )
  src = _fashion_source()
  cache = os.path.join(root, CACHE, "fashion_mnist")
  os.makedirs(cache, exist_ok=True)
  os.makedirs(out)
  for base in IDX:
    path = next(
      os.path.join(src, base + s)
      for s in (".gz", "")
      if os.path.isfile(os.path.join(src, base + s))
    )
    test = base.startswith("t10k")
    name = base + (f".first{TRAIN_CALL_TEST}" if test and mode == "train" else "") + ".xz"
    cached = os.path.join(cache, name)
    if not os.path.exists(cached):
      print(f"compressing {path} (xz -9e, about a minute for the training images)", flush=True)
      _xz(path, cached, TRAIN_CALL_TEST if test and mode == "train" else None)
    shutil.copy(cached, os.path.join(out, base + ".xz"))


def carry_wheel(root: str) -> None:
  """``.carry-run/wheels/``: the one wheel the GPU image lacks (pure Python ml_collections)."""
  version = "1.1.0"
  with open(os.path.join(root, "requirements.txt")) as f:
    for line in f:
      if line.startswith("ml_collections=="):
        version = line.split("==", 1)[1].strip()
  cache = os.path.join(root, CACHE, "wheels")
  if (
    not any(f.startswith("ml_collections-") for f in os.listdir(cache))
    if os.path.isdir(cache)
    else True
  ):
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_17_x86_64",
        "-d",
        cache,
        f"ml_collections=={version}",
      ],
      check=True,
    )
  out = os.path.join(carried_dir(root), "wheels")
  shutil.rmtree(out, ignore_errors=True)
  shutil.copytree(cache, out)


def _carry_runs():
  """scripts/carry_runs.py (a script, not a package module)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "carry_runs", os.path.join(os.path.dirname(os.path.abspath(__file__)), "carry_runs.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _join_parts(src: str, dst_file: str) -> dict:
  """Concatenates the parts in ``src`` into ``dst_file``; checks them against the manifest."""
  with open(os.path.join(src, MANIFEST)) as f:
    manifest = json.load(f)
  h = hashlib.sha256()
  with open(dst_file, "wb") as out:
    for part in manifest["parts"]:
      with open(os.path.join(src, part), "rb") as f:
        data = f.read()
      h.update(data)
      out.write(data)
  if h.hexdigest() != manifest["sha256"]:
    raise DeviceRunError(
      f"{src}: the parts do not match {MANIFEST} (sha256): an incomplete "
      "copy; unpack the returned files again"
    )
  return manifest


def restore_run(config: str, workdir: str, root: str = ROOT) -> str:
  """Recreates ``workdir`` from the carried run of ``config`` (a fresh directory each call).

  Returns:
    One line: the step it resumes from, or that the run starts.
  """
  carry_runs = _carry_runs()
  src = carry_dir(config, root)
  shutil.rmtree(workdir, ignore_errors=True)
  if not os.path.exists(os.path.join(src, MANIFEST)):
    return f"no carried run in {src}: {config} starts from step 0"
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, ARCHIVE)
    manifest = _join_parts(src, archive)
    carry_runs.unpack(archive, workdir)
  return (
    f"resuming {config} from step {manifest.get('step')} (epoch {manifest.get('epoch')}, "
    f"best validation {manifest.get('best_val')})"
  )


def device_data(root: str, dest: str) -> str:
  """Decompresses ``.carry-run/data/*.xz`` into ``dest``; returns ``dest`` ('' if no data)."""
  src = os.path.join(carried_dir(root), "data")
  files = sorted(f for f in os.listdir(src) if f.endswith(".xz")) if os.path.isdir(src) else []
  if not files:
    return ""
  os.makedirs(dest, exist_ok=True)
  for f in files:
    with lzma.open(os.path.join(src, f)) as fin, open(os.path.join(dest, f[:-3]), "wb") as fout:
      shutil.copyfileobj(fin, fout, 1 << 22)
  return dest


def _summary(workdir: str) -> dict:
  """Whether the run in ``workdir`` finished (its last ``metrics.jsonl`` summary record)."""
  rundir = _carry_runs().rundir
  last = {}
  for r in rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))[0]:
    if "summary" in r:
      last = r["summary"]
    elif "step" in r:
      last = {}  # trained on after an earlier summary
  return last


def pack_run(config: str, workdir: str, out: str) -> dict:
  """Packs ``workdir`` (newest checkpoint) into ``out/config/run.tar.gz.NN`` + manifest.

  Returns:
    The manifest: step, epoch, best_val, finished, sha256, bytes, parts.
  """
  carry_runs = _carry_runs()
  dest = os.path.join(out, config)
  os.makedirs(dest, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, ARCHIVE)
    try:
      manifest = carry_runs.pack(workdir, archive)
    except carry_runs.CarryError as e:
      raise DeviceRunError(
        f"{e} (a first call needs minutes to save its first checkpoint)"
      ) from None
    manifest.pop("source", None)
    h, parts = hashlib.sha256(), []
    with open(archive, "rb") as f:
      for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
        name = f"{ARCHIVE}.{i:02d}"
        with open(os.path.join(dest, name), "wb") as p:
          p.write(chunk)
        h.update(chunk)
        parts.append(name)
  s = _summary(workdir)
  manifest.update(
    config=config,
    parts=parts,
    sha256=h.hexdigest(),
    finished=bool(s.get("finished")),
    early_stopped=bool(s.get("early_stopped")),
  )
  with open(os.path.join(dest, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  return manifest


def unpack_returned(config: str, src: str, root: str = ROOT) -> str:
  """Puts the files a device call returned into ``carry/device/config/``; then restores.

  ``src`` is the returned folder (``files_at``) or its ``config`` subfolder. A run
  (manifest + parts, checked) replaces the carried run; evaluation files go to ``eval/``.
  """
  if os.path.isdir(os.path.join(src, config)):
    src = os.path.join(src, config)
  dest = carry_dir(config, root)
  said = []
  if os.path.exists(os.path.join(src, MANIFEST)):
    with tempfile.TemporaryDirectory() as tmp:
      manifest = _join_parts(src, os.path.join(tmp, ARCHIVE))  # check before replacing
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(dest):
      if f.startswith(ARCHIVE + ".") or f == MANIFEST:
        os.remove(os.path.join(dest, f))
    for f in manifest["parts"] + [MANIFEST]:
      shutil.copyfile(os.path.join(src, f), os.path.join(dest, f))
    said.append(
      f"run at step {manifest['step']} (epoch {manifest.get('epoch')}, best validation "
      f"{manifest.get('best_val')}{', finished' if manifest.get('finished') else ''})"
    )
  ev = os.path.join(src, "eval")
  if os.path.isdir(ev) and os.listdir(ev):
    os.makedirs(os.path.join(dest, "eval"), exist_ok=True)
    for f in EVAL_FILES:  # a finished evaluation replaces its partial scores
      if os.path.exists(os.path.join(dest, "eval", f)):
        os.remove(os.path.join(dest, "eval", f))
    for f in os.listdir(ev):
      shutil.copyfile(os.path.join(ev, f), os.path.join(dest, "eval", f))
    done = os.path.exists(os.path.join(ev, "eval_metrics.json"))
    said.append("evaluation " + ("finished" if done else "partial (eval_partial.npz)"))
  if not said:
    raise DeviceRunError(f"{src} holds neither {MANIFEST} nor eval/: not a device_run.sh output")
  n = restore(root)
  return f"{config}: {'; '.join(said)} -> {dest}; {n} held file(s) restored"


def publish_for_eval(config: str, root: str = ROOT) -> str:
  """The carried run's best parameters as a published model in ``.carry-run/model/config``."""
  out = os.path.join(carried_dir(root), "model", config)
  shutil.rmtree(os.path.join(carried_dir(root), "model"), ignore_errors=True)
  with tempfile.TemporaryDirectory() as tmp:
    line = restore_run(config, os.path.join(tmp, "run"), root)
    if not os.path.isdir(os.path.join(tmp, "run")):
      raise DeviceRunError(f"no carried run of {config} to evaluate ({line})")
    subprocess.run(
      [
        sys.executable,
        os.path.join(root, "scripts", "publish_model.py"),
        "--workdir",
        os.path.join(tmp, "run"),
        "--config",
        os.path.join(root, "configs", f"{config}.py"),
        "--out",
        out,
      ],
      check=True,
      cwd=root,
    )
  return out


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def prepare(config: str, mode: str, root: str = ROOT) -> str:
  """Readies the tree for one device call of ``config`` (``mode``: train or eval).

  Returns:
    One line: what would travel against the limit.

  Raises:
    DeviceRunError: no such config, data missing, or more than 64 MiB would travel.
  """
  path = os.path.join(root, "configs", f"{config}.py")
  if not os.path.isfile(path):
    raise DeviceRunError(f"no config {path}: CONFIG is the name of a file in configs/")
  from exvae import config_registry

  dataset = str(config_registry.get_config(path).dataset)
  carry_wheel(root)
  carry_data(root, dataset, mode)
  shutil.rmtree(os.path.join(carried_dir(root), "model"), ignore_errors=True)
  rel = os.path.relpath(carry_dir(config, root), root) + "/"
  if mode == "eval":
    publish_for_eval(config, root)
    rel += "eval/"  # the run's parts stay here; its partial scores travel
  held = hold(root, keep="" if rel.startswith("..") else rel)
  size = travel_bytes(root)
  line = (
    f"would travel: {_mib(size['total'])} (tree {_mib(size['tree'])}, {CARRIED}/ "
    f"{_mib(size['carried'])}); limit {_mib(LIMIT_BYTES)}; {held} file(s) held in {HOLD}/"
  )
  if size["total"] > LIMIT_BYTES:
    restore(root)
    raise DeviceRunError(
      f"{line}: over the limit, nothing held now; the largest: {', '.join(_largest(root))}"
    )
  return line


def _largest(root: str, n: int = 4) -> list[str]:
  paths = set(_git_files(root)) | set(_git_files(root, "--others", "--exclude-standard"))
  sizes = sorted(
    (
      (os.path.getsize(os.path.join(root, p)), p)
      for p in paths
      if os.path.isfile(os.path.join(root, p))
    ),
    reverse=True,
  )[:n]
  return [f"{p} {_mib(b)}" for b, p in sizes]


def eval_setup(config: str, outdir: str, root: str = ROOT) -> str:
  """There: a fresh ``outdir`` with the carried partial scores; returns the model directory."""
  model = os.path.join(carried_dir(root), "model", config)
  if not os.path.isdir(model):
    raise DeviceRunError(
      f"no {model}: run 'scripts/device_run.sh --prepare --eval {config}' "
      "here before the call, with carry [\".carry-run\"]"
    )
  shutil.rmtree(outdir, ignore_errors=True)
  os.makedirs(outdir)
  partial = os.path.join(carry_dir(config, root), "eval", "eval_partial.npz")
  if os.path.exists(partial):
    shutil.copyfile(partial, os.path.join(outdir, "eval_partial.npz"))
  return model


def eval_collect(config: str, outdir: str, out: str) -> str:
  """There: the evaluation's outputs (or its partial scores) into ``out/config/eval/``."""
  dest = os.path.join(out, config, "eval")
  os.makedirs(dest, exist_ok=True)
  got = [f for f in EVAL_FILES if os.path.exists(os.path.join(outdir, f))]
  for f in got:
    shutil.copyfile(os.path.join(outdir, f), os.path.join(dest, f))
  return f"{config}: returned {', '.join(got) or 'nothing'} in {dest}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("prepare")
  a.add_argument("config")
  a.add_argument("--eval", action="store_true")
  sub.add_parser("restore")
  a = sub.add_parser("unpack")
  a.add_argument("config")
  a.add_argument("dir")
  a = sub.add_parser("setup")
  a.add_argument("config")
  a.add_argument("workdir")
  a.add_argument("datadir")
  a = sub.add_parser("pack")
  a.add_argument("config")
  a.add_argument("workdir")
  a.add_argument("out")
  a = sub.add_parser("eval-setup")
  a.add_argument("config")
  a.add_argument("outdir")
  a.add_argument("datadir")
  a = sub.add_parser("eval-collect")
  a.add_argument("config")
  a.add_argument("outdir")
  a.add_argument("out")
  args = p.parse_args(argv)
  try:
    if args.command == "prepare":
      print(prepare(args.config, "eval" if args.eval else "train"))
      print("after the call: scripts/device_run.sh --unpack CONFIG FILES_AT (or --restore)")
    elif args.command == "restore":
      print(f"restored {restore()} held file(s)")
    elif args.command == "unpack":
      print(unpack_returned(args.config, args.dir))
    elif args.command == "setup":
      print(restore_run(args.config, args.workdir), file=sys.stderr)
      print(device_data(ROOT, args.datadir))  # the shell reads this line
    elif args.command == "pack":
      m = pack_run(args.config, args.workdir, args.out)
      print(
        f"packed {args.config}: step {m['step']}, epoch {m.get('epoch')}, best validation "
        f"{m.get('best_val')}, {_mib(m['bytes'])} in {len(m['parts'])} part(s)"
        f"{', finished' if m['finished'] else ''}",
        file=sys.stderr,
      )
    elif args.command == "eval-setup":
      print(eval_setup(args.config, args.outdir) + "\t" + device_data(ROOT, args.datadir))
    else:
      print(eval_collect(args.config, args.outdir, args.out), file=sys.stderr)
  except DeviceRunError as e:
    print(f"device_run: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
