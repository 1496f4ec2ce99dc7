"""Trains an exvae model: ``python train.py --config=configs/<name>.py --workdir=<dir>``.

Any config field can be overridden: ``--config.num_epochs=10 --config.exemplar.rat=True``.
Training resumes automatically from the latest checkpoint in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from exvae import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:     # keep Orbax's INFO chatter out of the terminal
    logging.set_verbosity(logging.WARNING)
  summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print({k: summary[k] for k in ("step", "best_val", "best_epoch", "finished") if k in summary})


if __name__ == "__main__":
  app.run(main)
