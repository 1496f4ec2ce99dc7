"""Dynamic MNIST, MLP VAE, exact exemplar prior, M = 25000 exemplars per batch (paper row "Exemplar VAE")."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "vae", "exemplar")
