"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), standard Gaussian prior on the top latent.

Paper row "ConvHVAE, Gaussian prior", Omniglot column: published test NLL 98.12 +- 0.17 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "convhvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "gaussian"
  return finalize(c)
