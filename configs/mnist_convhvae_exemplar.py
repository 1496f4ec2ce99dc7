"""Dynamic MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), exact exemplar prior, M = 25000 exemplars of 50000 per batch (prior on z2).

Paper row "Exemplar ConvHVAE", Dynamic MNIST column: published test NLL 79.58 +- 0.07 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "convhvae", "exemplar")
