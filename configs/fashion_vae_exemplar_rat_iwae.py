"""Fashion-MNIST (dynamically binarised), MLP VAE, exemplar prior with retrieval augmented training (k = 10 of M = 25000), trained with the IWAE bound (k = 5 samples, DReG gradients)."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "vae", "exemplar", rat=True, iwae_samples=5)
