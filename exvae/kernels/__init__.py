"""Streamed exemplar-prior kernels (log-sum of Gaussian kernels, k-NN, pruning)."""

from exvae.kernels.exemplar_lse import default_chunk_size, log_kernel_sum, topk_neighbors
from exvae.kernels.pruned import PrunedLSE, pruned_log_kernel_sum

__all__ = [
  "PrunedLSE",
  "default_chunk_size",
  "log_kernel_sum",
  "pruned_log_kernel_sum",
  "topk_neighbors",
]
