"""Evaluates a trained run: ``exvae-eval --config=<name or path> --workdir=<dir>``.

Computes the importance-sampled test NLL (``--config.eval.num_importance_samples``,
default 5000) against all training exemplars, the test ELBO and its terms, and
writes ``<workdir>/eval_metrics.json`` and the per-image scores
``<workdir>/per_example.npz`` (see :mod:`exvae.per_example`; compared with
``exvae compare``); with ``--config.eval.out_dir=DIR`` into DIR instead, and nothing
into the run directory.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from exvae import cli, config_registry, eval_lib, rundir

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A shipped config's name or a configs/*.py path.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir (holds checkpoints/).")
flags.mark_flags_as_required(["config", "workdir"])


@rundir.cli_main   # expected errors: one line on stderr (traceback: --verbosity=1)
def main(argv):
  cli.begin(argv)
  metrics = eval_lib.evaluate(FLAGS.config, FLAGS.workdir)
  print(json.dumps(metrics, indent=2))
  print(f"test NLL = {metrics['test_nll']:.2f} nats (S={metrics['num_importance_samples']}, "
        f"{metrics['num_test_examples']} test images); samples: {metrics['samples_png']}")


def run(argv=None):
  """Console-script entry point (``exvae-eval``)."""
  app.run(main, argv=config_registry.resolve_argv_or_exit(sys.argv if argv is None else argv))


if __name__ == "__main__":
  run()
