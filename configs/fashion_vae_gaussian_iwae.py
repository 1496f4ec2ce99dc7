"""Fashion-MNIST (dynamically binarised), MLP VAE, standard Gaussian prior, trained with the IWAE bound (k = 5 samples, DReG gradients)."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "vae", "gaussian", iwae_samples=5)
