"""Fashion-MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), exemplar prior with retrieval augmented training (RAT: k = 10 nearest of M = 25000 cached codes per batch element) (prior on z2).

Paper row "Exemplar ConvHVAE", Fashion-MNIST column: published test NLL 224.63 +- 0.06 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "convhvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 25000
  c.exemplar.rat = True
  return finalize(c)
