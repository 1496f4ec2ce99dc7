"""Fashion-MNIST (dynamically binarised), VAE with a gated PixelCNN decoder p(x|z) (MLP encoder, z of 40), standard Gaussian prior.

Baseline for configs/fashion_pixelcnn_exemplar.py (the same model with the
standard Gaussian prior instead of the exemplar prior), to measure what the
exemplar prior adds on top of an autoregressive decoder; no published number
is attached to it here (the paper's "Exemplar PixelSNAIL" Fashion-MNIST row
is 223.26 +- 0.01 nats).  The decoder is a gated PixelCNN standing in for
PixelSNAIL (see exvae/models/pixelcnn.py).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"
  c.model = "pixelcnn"
  c.latent_dim = 40
  c.pixelcnn.channels = 64
  c.pixelcnn.num_layers = 6
  c.pixelcnn.kernel_size = 5
  c.prior = "gaussian"
  # The decoder is evaluated on every importance sample: 1000 images at once
  # keep the activations (~400 MB per 128-channel layer) well inside memory.
  c.eval.max_queries = 1000
  return finalize(c)
