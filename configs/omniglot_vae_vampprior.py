"""Omniglot (28x28 chardata.mat, dynamically binarised), MLP VAE, VampPrior with 500 pseudo-inputs.

Paper row "VAE, VampPrior", Omniglot column: published test NLL 106.78 +- 0.21 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "vae", "vampprior")
