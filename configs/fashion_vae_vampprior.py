"""Fashion-MNIST (dynamically binarised), MLP VAE, VampPrior with 500 pseudo-inputs (paper row "VAE, VampPrior")."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "vae", "vampprior")
