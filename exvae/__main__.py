"""``python -m exvae <command> [flags]``: the ``exvae`` dispatcher (see :mod:`exvae.cli`)."""

from exvae.cli import main

if __name__ == "__main__":
  main()
