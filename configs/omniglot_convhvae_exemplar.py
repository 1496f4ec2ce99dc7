"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), exact exemplar prior, M = 11500 exemplars of 23000 per batch (prior on z2).

Paper row "Exemplar ConvHVAE", Omniglot column: published test NLL 96.38 +- 0.24 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "convhvae", "exemplar")
