"""The README quickstart: a short Fashion-MNIST Exemplar VAE (RAT) that trains in minutes on 2 CPU cores."""

from exvae.config_base import base_config, finalize


def get_config():
  c = base_config()
  c.dataset = "fashion_mnist"  # genuine Fashion-MNIST (Debian package / IDX / tfds)
  c.prior = "exemplar"
  c.exemplar.rat = True  # RAT: fast epochs on a CPU
  c.exemplar.num_exemplars = 25000
  c.num_epochs = 3
  c.warmup_epochs = 3
  c.eval.num_importance_samples = 500
  c.eval.max_test_examples = 2000
  return finalize(c)
