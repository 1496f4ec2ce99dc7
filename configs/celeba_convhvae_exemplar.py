"""CelebA 64x64 colour (centre crop 140, resized), ConvHVAE with a discretised logistic likelihood, exemplar prior (RAT).

Paper row: none. The Exemplar VAE paper shows CelebA only as qualitative
exemplar-based generations (its code uses a different, BatchNorm conv
network for CelebA); there is no published CelebA NLL to compare with.
Training lengths below are our choice, not the paper's: CelebA has 162770
training images (1627 steps per epoch at batch 100).
"""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "celeba"  # tfds 'celeb_a' prepared in data_dir (exvae/data/celeba.py)
  c.model = "convhvae"
  c.likelihood = "logistic"  # 256-level discretised logistic, per-pixel log-scale
  c.latent_dim = 40  # z2 (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = "exemplar"
  c.exemplar.rat = True  # exact mode would re-encode 25000 colour images per batch
  c.exemplar.rat_k = 10
  c.exemplar.num_exemplars = 25000
  c.num_epochs = 100
  c.warmup_epochs = 10
  c.early_stopping_patience = 10
  c.eval.num_importance_samples = 1000
  c.eval.max_queries = 1000  # 1000 decoded 64x64 images per call (memory bound)
  return finalize(c)
