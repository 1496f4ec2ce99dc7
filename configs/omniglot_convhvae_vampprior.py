"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), VampPrior with 500 pseudo-inputs on the top latent z2.

Paper row "ConvHVAE, VampPrior", Omniglot column: published test NLL 97.30 +- 0.07 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "convhvae", "vampprior")
