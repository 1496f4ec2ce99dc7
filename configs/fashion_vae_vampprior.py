"""Fashion-MNIST (dynamically binarised), MLP VAE, VampPrior with 500 pseudo-inputs (paper row "VAE, VampPrior")."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.prior = "vampprior"
  c.vampprior.num_pseudo = 500
  return finalize(c)
