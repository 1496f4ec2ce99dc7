"""Fashion-MNIST (dynamically binarised), two-level MLP HVAE (z1, z2 of 40, gated dense 300), exemplar prior with retrieval augmented training (RAT: k = 10 nearest of M = 25000 cached codes per batch element) (prior on z2).

Paper row "Exemplar HVAE", Fashion-MNIST column: published test NLL 226.53 +- 0.09 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "hvae"
  c.latent_dim = 40                 # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 25000
  c.exemplar.rat = True
  return finalize(c)
