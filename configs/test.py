"""Tiny CPU config for tests: real sklearn digits (8x8), small nets, seconds per run."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "digits"  # sklearn's real 8x8 digits: offline, tiny
  c.data_source = "sklearn"
  c.latent_dim = 4
  c.hidden = (16, 16)
  c.prior = "exemplar"
  c.exemplar.num_exemplars = 64
  c.exemplar.rat_k = 3
  c.exemplar.chunk_size = 32
  c.vampprior.num_pseudo = 8
  c.batch_size = 20
  c.num_epochs = 2
  c.warmup_epochs = 1
  c.early_stopping_patience = 5
  c.checkpoint_every_steps = 10
  c.log_every_steps = 5
  c.num_picture_samples = 8
  c.progress = False
  c.eval.num_importance_samples = 16
  c.eval.max_queries = 256
  c.eval.max_test_examples = 40
  return finalize(c)
