"""Dynamic MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), standard Gaussian prior on the top latent.

Paper row "ConvHVAE, Gaussian prior", Dynamic MNIST column: published test NLL 80.52 +- 0.28 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "convhvae", "gaussian")
