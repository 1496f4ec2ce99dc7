"""Flax modules (pure building blocks, no training logic)."""

from exvae.nets.gated import GatedDense, he_init

__all__ = ["GatedDense", "he_init"]
