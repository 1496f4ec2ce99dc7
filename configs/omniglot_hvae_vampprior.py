"""Omniglot (28x28 chardata.mat, dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), VampPrior with 500 pseudo-inputs on the top latent z2.

Paper row "HVAE, VampPrior", Omniglot column: published test NLL 103.30 +- 0.43 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "hvae", "vampprior")
