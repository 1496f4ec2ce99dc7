"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), VampPrior with 500 pseudo-inputs on the top latent z2.

Paper row "ConvHVAE, VampPrior", Omniglot column: published test NLL 97.30 +- 0.07 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "convhvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "vampprior"
  c.vampprior.num_pseudo = 500
  return finalize(c)
