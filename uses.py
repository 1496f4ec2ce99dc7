"""Downstream uses of a trained run: ``python uses.py <command> --config=configs/<x>.py --workdir=<dir>``.

A thin entry point to :mod:`exvae.cli.uses` (installed as ``exvae-uses``); its
docstring lists the commands (bank, generate, knn, augment, plots, grow).
"""

from exvae.cli.uses import run

if __name__ == "__main__":
  run()
