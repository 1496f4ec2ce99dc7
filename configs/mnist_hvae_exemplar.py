"""Dynamic MNIST (dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), exact exemplar prior, M = 25000 exemplars of 50000 per batch (prior on z2).

Paper row "Exemplar HVAE", Dynamic MNIST column: published test NLL 81.22 +- 0.05 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "hvae", "exemplar")
