"""Fashion-MNIST (dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), VampPrior with 500 pseudo-inputs on the top latent z2.

Paper row "HVAE, VampPrior", Fashion-MNIST column: published test NLL 226.72 +- 0.08 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "hvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "vampprior"
  c.vampprior.num_pseudo = 500
  return finalize(c)
