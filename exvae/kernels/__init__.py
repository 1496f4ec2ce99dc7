"""Streamed exemplar-prior kernels (log-sum of Gaussian kernels, k-NN)."""

from exvae.kernels.exemplar_lse import log_kernel_sum, topk_neighbors

__all__ = ["log_kernel_sum", "topk_neighbors"]
