"""Fashion-MNIST (dynamically binarised), two-level ConvHVAE (gated convolutions, z1, z2 of 40), exemplar prior with retrieval augmented training (RAT: k = 10 nearest of M = 25000 cached codes per batch element) (prior on z2).

Paper row "Exemplar ConvHVAE", Fashion-MNIST column: published test NLL 224.63 +- 0.06 nats
(Norouzi et al. 2020, S = 5000 importance samples).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "convhvae", "exemplar", rat=True)
