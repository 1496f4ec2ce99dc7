"""Dynamic MNIST, MLP VAE, standard Gaussian prior (paper row "VAE, Gaussian prior")."""

from exvae.config_base import paper_config


def get_config():
  return paper_config("mnist", "vae", "gaussian")
