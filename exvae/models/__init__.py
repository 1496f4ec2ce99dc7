"""VAE models: ``encode(x) -> (mu, logvar)``, ``decode(z) -> likelihood params``."""
from exvae.models.vae import VAE, Model, make_model

__all__ = ["VAE", "Model", "make_model"]
