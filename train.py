"""Trains an exvae model: ``python train.py --config=configs/<name>.py --workdir=<dir>``.

A thin entry point to :mod:`exvae.cli.train` (installed as ``exvae-train``).
``--config`` also takes a shipped config's name (``--config=fashion_vae_exemplar``).
Any config field can be overridden: ``--config.num_epochs=10 --config.exemplar.rat=True``.
Training resumes automatically from the latest checkpoint in ``--workdir``.
"""

from exvae.cli.train import run

if __name__ == "__main__":
  run()
