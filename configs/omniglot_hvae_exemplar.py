"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), exact exemplar prior, M = 11500 exemplars of 23000 per batch (prior on z2).

Paper row "Exemplar HVAE", Omniglot column: published test NLL 102.25 +- 0.43 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "hvae", "exemplar")
