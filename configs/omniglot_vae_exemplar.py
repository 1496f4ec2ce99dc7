"""Omniglot (28x28 chardata.mat, dynamically binarised), MLP VAE, exact exemplar prior, M = 11500 exemplars of 23000 per batch.

Paper row "Exemplar VAE", Omniglot column: published test NLL 105.22 +- 0.18 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("omniglot", "vae", "exemplar")
