"""Dynamic MNIST (dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), standard Gaussian prior on the top latent.

Paper row "HVAE, Gaussian prior", Dynamic MNIST column: published test NLL 82.39 +- 0.11 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "hvae", "gaussian")
