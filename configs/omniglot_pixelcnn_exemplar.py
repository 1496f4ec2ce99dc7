"""Omniglot (28x28 chardata.mat, dynamically binarised), VAE with a gated PixelCNN decoder p(x|z) (MLP encoder, z of 40), exemplar prior with retrieval augmented training (k = 10 of M = 11500 candidates of 23000).

Paper row "Exemplar PixelSNAIL", Omniglot column: published test NLL 89.28 +- 0.12 nats
(Norouzi et al. 2020, S = 5000 importance samples).  This is NOT PixelSNAIL:
a gated PixelCNN (van den Oord et al. 2016; vertical and horizontal stacks,
F = 64 channels, 6 + 1 layers, 5x5 kernels, spatial conditioning on z; see
exvae/models/pixelcnn.py) stands in for it, so expect a weaker decoder than
the paper's.  RAT instead of the exact prior: exact mode re-encodes M
exemplars with gradients every step, RAT only the batch's retrieved
neighbours (the encoder is the MLP VAE's either way).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "omniglot"
  c.model = "pixelcnn"
  c.latent_dim = 40
  c.pixelcnn.channels = 64
  c.pixelcnn.num_layers = 6
  c.pixelcnn.kernel_size = 5
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 11500
  c.exemplar.rat = True
  c.exemplar.rat_k = 10
  # The decoder is evaluated on every importance sample: 1000 images at once
  # keep the activations (~400 MB per 128-channel layer) well inside memory.
  c.eval.max_queries = 1000
  return finalize(c)
