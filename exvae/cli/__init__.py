"""Command-line entry points (console scripts of the installed package).

* ``exvae-train`` / ``exvae train``: :mod:`exvae.cli.train` (top-level ``train.py``);
* ``exvae-eval`` / ``exvae eval``: :mod:`exvae.cli.eval` (``eval.py``);
* ``exvae-uses`` / ``exvae uses``: :mod:`exvae.cli.uses` (``uses.py``);
* ``exvae-compare`` / ``exvae compare``: :mod:`exvae.cli.compare`;
* ``exvae configs``: lists the shipped configs, usable by name
  (``--config=fashion_vae_exemplar_rat``).

Each command module defines its absl flags at import, so the dispatcher
imports only the one it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "exvae.cli.train", "eval": "exvae.cli.eval", "uses": "exvae.cli.uses",
            "compare": "exvae.cli.compare"}
_USAGE = ("usage: exvae {train,eval,uses,compare,configs} [flags]\n"
          "  exvae train --config=fashion_vae_exemplar_rat --workdir=runs/fx\n"
          "  exvae eval  --config=fashion_vae_exemplar_rat --workdir=runs/fx\n"
          "  exvae uses <command> --config=... --workdir=...\n"
          "  exvae compare runs/a runs/b [--plot]\n"
          "  exvae configs            (the config names --config accepts)\n"
          "'exvae <command> --help' lists a command's flags.")


def main(argv: list[str] | None = None) -> None:
  """``exvae <command> [flags]``: runs one of :data:`COMMANDS`."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd == "configs":
    from exvae import config_registry
    print("\n".join(config_registry.available()))
    return
  if cmd not in COMMANDS:
    print(f"exvae: unknown command {cmd!r}.\n{_USAGE}", file=sys.stderr)
    sys.exit(2)
  importlib.import_module(COMMANDS[cmd]).run([f"exvae {cmd}"] + argv[2:])


def begin(argv: list[str]) -> None:
  """The start of a command's ``main``: no stray arguments, and Orbax's INFO chatter
  kept out of the terminal unless ``--verbosity`` was given."""
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
