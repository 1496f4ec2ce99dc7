"""Exemplar VAEs (Norouzi, Fleet & Norouzi, NeurIPS 2020) in JAX/Flax.

``exvae.load_run(workdir)`` loads a trained run for a notebook (see
``docs/api.md``); the command-line programs are ``exvae-train``,
``exvae-eval``, ``exvae-uses`` and ``exvae-compare`` (see ``docs/cli.md``).
"""

__version__ = "0.1.0"


def load_run(workdir: str, **kwargs):
  """A trained run, ready for ``log_prob``, sampling and kNN (see :func:`exvae.api.load_run`)."""
  from exvae import api

  return api.load_run(workdir, **kwargs)


__all__ = ["load_run", "__version__"]
