"""Publishes a trained run's best-on-validation parameters as a small model directory.

Usage: python scripts/publish_model.py --workdir RUN_DIR --config NAME_OR_PATH
           [--out results/<config>/model] [--source_commit SHA]
       python scripts/publish_model.py --record_config_digest MODEL_DIR [MODEL_DIR ...]

Writes ``config.json``, ``params.npz`` and ``model.json`` (provenance and the
SHA-256 of the parameters; see :mod:`exvae.published`). The result is a few MB
where the run directory is tens, and ``exvae-eval`` / ``exvae-uses`` read it
like a run directory. Reads the run directory only (never writes there).

``--record_config_digest`` adds the digest of ``config.json`` (``config_sha256``)
to the ``model.json`` of models published before it was recorded, after checking
their parameters against ``params_sha256``; the parameters are not touched.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record_config_digest(directories) -> int:
  """Adds ``config_sha256`` to each published model's ``model.json`` (see the docstring)."""
  from exvae import atomic, published

  for d in directories:
    try:
      meta = published.read_meta(d)
      params = os.path.join(d, published.PARAMS_FILE)
      if atomic.sha256_file(params) != meta.get("params_sha256"):
        raise published.PublishedModelError(f"{params} does not match its params_sha256")
      with open(os.path.join(d, published.CONFIG_FILE)) as f:
        digest = atomic.json_digest(json.load(f))
    except (OSError, ValueError) as e:
      print(f"publish_model: error: {d}: {e}", file=sys.stderr)
      return 1
    if meta.get("config_sha256") not in (None, digest):
      print(
        f"publish_model: error: {d}: config.json differs from the config_sha256 its "
        "model.json records",
        file=sys.stderr,
      )
      return 1
    atomic.write_json(
      os.path.join(d, published.META_FILE), dict(meta, config_sha256=digest), sort_keys=True
    )
    print(f"{d}: config_sha256 {digest[:12]}")
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--record_config_digest"]:
    return record_config_digest(argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the trained run directory")
  p.add_argument("--config", required=True, help="the run's config (name or path)")
  p.add_argument("--out", default=None, help="default: results/<config name>/model")
  p.add_argument(
    "--source_commit",
    default=None,
    help="the commit the run trained from (default: its provenance.json)",
  )
  args = p.parse_args(argv)

  from exvae import bank as bank_lib
  from exvae import config_registry, published, rundir

  try:
    config = config_registry.get_config(args.config)
  except Exception as e:  # noqa: BLE001  (one line for any bad name or path)
    print(f"publish_model: error: cannot load config {args.config!r}: {e}", file=sys.stderr)
    return 2
  name = os.path.splitext(os.path.basename(args.config))[0]
  out = args.out or os.path.join("results", name, "model")
  stored = rundir.read_stored_config(args.workdir)
  if stored is None:
    print(f"publish_model: error: {args.workdir} holds no readable config.json", file=sys.stderr)
    return 1
  trained = bank_lib.restore_trained(config, args.workdir)
  provenance = {}
  prov_path = os.path.join(args.workdir, "provenance.json")
  if os.path.isfile(prov_path):
    with open(prov_path) as f:
      provenance = json.load(f)
  meta = trained.meta or {}
  ckpt_dir = os.path.join(args.workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
  record = {
    "config": name,
    "source_run": os.path.basename(os.path.normpath(args.workdir)),
    "source_commit": args.source_commit or provenance.get("commit"),
    "params": "best on validation",
    "best_epoch": int(meta.get("best_epoch", 0)),  # 1-based (restore_trained's meta)
    "best_val_loss": meta.get("best_val"),
    "source_checkpoint_step": max(steps) if steps else None,
  }
  path = published.save(out, trained.params, stored, record)
  print(
    f"published {name}: best epoch {record['best_epoch']}, validation "
    f"{record['best_val_loss']:.3f}, {os.path.getsize(path) / 2**20:.1f} MiB -> {out}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
