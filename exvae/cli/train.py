"""Trains an exvae model: ``exvae-train --config=<name or path> --workdir=<dir>``.

``--config`` takes a shipped config's name (``fashion_vae_exemplar_rat``;
``exvae configs`` lists them) or a path. Any config field can be overridden:
``--config.num_epochs=10 --config.exemplar.rat=True``. Training resumes
automatically from the latest checkpoint in ``--workdir``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from exvae import cli, config_registry, distributed, rundir, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A shipped config's name or a configs/*.py path.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (enables jax.distributed).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Multi-host with auto-detected cluster settings "
                  "(SLURM, Cloud TPU): jax.distributed.initialize() without arguments.")
flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changes the "
                  "model, data or optimisation (recorded in <workdir>/config_changes.jsonl).")
flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds an earlier run's "
                  "history but no checkpoint: its files move to <workdir>/previous/<time>/.")
flags.mark_flags_as_required(["config", "workdir"])


@rundir.cli_main   # expected errors: one line on stderr (traceback: --verbosity=1)
def main(argv):
  cli.begin(argv)
  if FLAGS.coordinator_address or FLAGS.distributed:
    distributed.initialize(FLAGS.coordinator_address or "", FLAGS.num_processes, FLAGS.process_id)
  summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                         allow_config_change=FLAGS.allow_config_change,
                                         overwrite=FLAGS.overwrite)
  print({k: summary[k] for k in ("step", "best_val", "best_epoch", "finished") if k in summary})


def run(argv=None):
  """Console-script entry point (``exvae-train``)."""
  app.run(main, argv=config_registry.resolve_argv_or_exit(sys.argv if argv is None else argv))


if __name__ == "__main__":
  run()
