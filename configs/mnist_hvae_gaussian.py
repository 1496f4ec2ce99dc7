"""Dynamic MNIST (dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), standard Gaussian prior on the top latent.

Paper row "HVAE, Gaussian prior", Dynamic MNIST column: published test NLL 82.39 +- 0.11 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "mnist"
  c.model = "hvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "gaussian"
  return finalize(c)
