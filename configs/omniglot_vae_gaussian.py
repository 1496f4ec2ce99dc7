"""Omniglot (28x28 chardata.mat, dynamically binarised), MLP VAE, standard Gaussian prior.

Paper row "VAE, Gaussian prior", Omniglot column: published test NLL 108.34 +- 0.06 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "vae", "gaussian")
