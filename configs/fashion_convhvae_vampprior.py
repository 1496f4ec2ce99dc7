"""Fashion-MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), VampPrior with 500 pseudo-inputs on the top latent z2.

Paper row "ConvHVAE, VampPrior", Fashion-MNIST column: published test NLL 224.67 +- 0.03 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "convhvae", "vampprior")
