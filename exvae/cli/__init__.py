"""Command-line entry points (console scripts of the installed package).

* ``exvae-train`` / ``exvae train``: :mod:`exvae.cli.train` (top-level ``train.py``);
* ``exvae-eval`` / ``exvae eval``: :mod:`exvae.cli.eval` (``eval.py``);
* ``exvae-uses`` / ``exvae uses``: :mod:`exvae.cli.uses` (``uses.py``);
* ``exvae-compare`` / ``exvae compare``: :mod:`exvae.cli.compare` (``compare.py``);
* ``exvae configs``: lists the shipped configs, usable by name
  (``--config=fashion_vae_exemplar_rat``).

``python -m exvae`` is the same dispatcher. What the commands share (the
config and its overrides, ``--help``, ``--print_config``, ``--version``) is
in :mod:`exvae.cli.command`; the one-line errors in :mod:`exvae.cli.exits`.
Each command module defines its absl flags at import, so the dispatcher
imports only the one it runs.
"""

from __future__ import annotations

import importlib
import sys

# The dispatcher's commands and the modules that run them (exvae.cli.uses.COMMANDS are the
# subcommands of `exvae uses`, another list).
COMMAND_MODULES = {
  "train": "exvae.cli.train",
  "eval": "exvae.cli.eval",
  "uses": "exvae.cli.uses",
  "compare": "exvae.cli.compare",
}
_USAGE = (
  "usage: exvae {train,eval,uses,compare,configs} [flags]\n"
  "  exvae train --config=fashion_vae_exemplar_rat --workdir=runs/fx\n"
  "  exvae eval  --workdir=runs/fx\n"
  "  exvae uses <command> --workdir=runs/fx\n"
  "  exvae compare runs/a runs/b [--plot]\n"
  "  exvae configs            (the config names --config accepts)\n"
  "  exvae --version\n"
  "'exvae <command> --help' lists a command's flags."
)


def main(argv: list[str] | None = None) -> None:
  """``exvae <command> [flags]``: runs one of :data:`COMMAND_MODULES`."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_USAGE, file=sys.stdout if len(argv) >= 2 else sys.stderr)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd == "--version":
    from exvae.cli import command

    print(f"exvae {command.version()}")
    return
  if cmd == "configs":
    from exvae import config_registry

    print("\n".join(config_registry.shipped_configs()))
    return
  if cmd not in COMMAND_MODULES:
    import difflib

    close = difflib.get_close_matches(cmd, list(COMMAND_MODULES) + ["configs"], n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    print(
      f"exvae: error: unknown command {cmd!r}; one of train, eval, uses, compare, configs.{hint}",
      file=sys.stderr,
    )
    sys.exit(2)
  importlib.import_module(COMMAND_MODULES[cmd]).run([f"exvae-{cmd}"] + argv[2:])
