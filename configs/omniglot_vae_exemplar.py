"""Omniglot (28x28 chardata.mat, dynamically binarised), MLP VAE, exact exemplar prior, M = 11500 exemplars of 23000 per batch.

Paper row "Exemplar VAE", Omniglot column: published test NLL 105.22 +- 0.18 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "vae"
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 11500
  c.exemplar.rat = False
  return finalize(c)
