"""Fashion-MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), standard Gaussian prior on the top latent.

Paper row "ConvHVAE, Gaussian prior", Fashion-MNIST column: published test NLL 225.38 +- 0.08 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "convhvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "gaussian"
  return finalize(c)
