"""Omniglot (28x28 chardata.mat, dynamically binarised), MLP VAE, standard Gaussian prior.

Paper row "VAE, Gaussian prior", Omniglot column: published test NLL 108.34 +- 0.06 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "vae"
  c.prior = "gaussian"
  return finalize(c)
