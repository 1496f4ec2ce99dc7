"""Fashion-MNIST (dynamically binarised), VAE with a gated PixelCNN decoder p(x|z) (MLP encoder, z of 40), exemplar prior with retrieval augmented training (k = 10 of M = 25000 candidates of 50000).

Paper row "Exemplar PixelSNAIL", Fashion-MNIST column: published test NLL 223.26 +- 0.01 nats
(Norouzi et al. 2020, S = 5000 importance samples).  This is NOT PixelSNAIL:
a gated PixelCNN (van den Oord et al. 2016; vertical and horizontal stacks,
F = 64 channels, 6 + 1 layers, 5x5 kernels, spatial conditioning on z; see
exvae/models/pixelcnn.py) stands in for it, so expect a weaker decoder than
the paper's.  RAT instead of the exact prior: exact mode re-encodes M
exemplars with gradients every step, RAT only the batch's retrieved
neighbours (the encoder is the MLP VAE's either way).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "pixelcnn", "exemplar", rat=True)
