"""Priors over latent codes, behind one interface (see :mod:`exvae.priors.base`).

Importing this package registers the built-in priors: ``gaussian``,
``vampprior`` and ``exemplar``.
"""
from exvae.priors.base import ContextInputs, Prior, make_prior, register, registered_priors
from exvae.priors import exemplar, gaussian, vampprior  # noqa: F401  (registration)

__all__ = ["ContextInputs", "Prior", "make_prior", "register", "registered_priors"]
