"""Fashion-MNIST (dynamically binarised), MLP VAE, exact exemplar prior, M = 25000 exemplars per batch (paper row "Exemplar VAE")."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 25000
  c.exemplar.rat = False
  return finalize(c)
