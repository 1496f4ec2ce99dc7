"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), exact exemplar prior, M = 11500 exemplars of 23000 per batch (prior on z2).

Paper row "Exemplar ConvHVAE", Omniglot column: published test NLL 96.38 +- 0.24 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "convhvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 11500
  c.exemplar.rat = False
  return finalize(c)
