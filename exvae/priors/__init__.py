"""Priors over latent codes, behind one interface (see :mod:`exvae.priors.base`).

Importing this package registers the built-in priors: ``gaussian``,
``vampprior`` and ``exemplar``. A prior outside the library is selected by a
plug-in spec, ``config.prior = "my_pkg.my_prior:MyPrior"`` (see
:mod:`exvae.plugins`): imported on first use, checked (:mod:`exvae.priors.checks`)
and registered under that spec.
"""

from exvae import plugins
from exvae.priors import base, checks
from exvae.priors.base import ContextInputs, Prior, register, registered_priors
from exvae.priors import exemplar, gaussian, vampprior  # noqa: F401  (registration)
from exvae.priors.exemplar import ExemplarContext
from exvae.priors.vampprior import VampContext


def make_prior(name: str, config) -> Prior:
  """Instantiates the prior ``name``: a registered name or a ``MODULE:CLASS`` plug-in spec.

  Args:
    name: ``config.prior``.
    config: the run's config (given to the prior's constructor).

  Returns:
    The prior.

  Raises:
    ValueError: an unknown name, an unimportable spec, a spec that does
      not name a :class:`Prior` subclass, one that lacks ``log_prob`` or
      ``sample``, or ``config.prior_options`` its constructor does not take.
  """
  if plugins.is_spec(name) and name not in base.registered_priors():
    cls = plugins.load(name, "prior")
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
      raise ValueError(f"prior plug-in {name!r} is {cls!r}, not a subclass of exvae.priors.Prior.")
    if name not in base.registered_priors():  # the import may have registered it
      base.register(name, cls)
  cls = base.prior_class(name)
  if plugins.is_spec(name):  # checked, and built with config.prior_options
    checks.check_prior_class(cls, name)
    return plugins.construct(
      cls, name, "prior", config, opts=plugins.options(config, "prior_options")
    )
  return cls(config)


__all__ = [
  "ContextInputs",
  "ExemplarContext",
  "Prior",
  "VampContext",
  "make_prior",
  "register",
  "registered_priors",
]
