"""Fashion-MNIST (dynamically binarised), MLP VAE, standard Gaussian prior (paper row "VAE, Gaussian prior")."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.prior = "gaussian"
  return finalize(c)
