"""Paired comparison of evaluated runs: ``python compare.py runs/a runs/b [--plot]``.

A thin entry point to :mod:`exvae.cli.compare` (installed as ``exvae-compare``).
"""

from exvae.cli.compare import run

if __name__ == "__main__":
  run()
