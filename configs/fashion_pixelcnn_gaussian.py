"""Fashion-MNIST (dynamically binarised), VAE with a gated PixelCNN decoder p(x|z) (MLP encoder, z of 40), standard Gaussian prior.

Baseline for configs/fashion_pixelcnn_exemplar.py (the same model with the
standard Gaussian prior instead of the exemplar prior), to measure what the
exemplar prior adds on top of an autoregressive decoder; no published number
is attached to it here (the paper's "Exemplar PixelSNAIL" Fashion-MNIST row
is 223.26 +- 0.01 nats).  The decoder is a gated PixelCNN standing in for
PixelSNAIL (see exvae/models/pixelcnn.py).
"""

from exvae.config_base import paper_config


def get_config():
  return paper_config("fashion_mnist", "pixelcnn", "gaussian")
