"""Fashion-MNIST (dynamically binarised), MLP VAE, exact exemplar prior, M = 25000 exemplars per batch (paper row "Exemplar VAE")."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "vae", "exemplar")
