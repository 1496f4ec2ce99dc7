"""Fashion-MNIST (dynamically binarised), MLP VAE, exemplar prior with retrieval augmented training (k = 10 of M = 25000)."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 25000
  c.exemplar.rat = True
  c.exemplar.rat_k = 10
  return finalize(c)
