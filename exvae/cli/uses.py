"""Downstream uses of a trained run: ``exvae-uses <command> --config=<name or path> --workdir=<dir>``.

Commands (outputs go to ``--out``, default ``<workdir>/uses``):

  bank      build the exemplar bank from the training split, save bank.npz,
            print its size on disk vs the raw uint8 images
  generate  conditional.png, unconditional.png, cyclic.png, interpolation.png
  knn       kNN error per k on encoder means (validation and test); knn.json
  augment   MLP test error without / with generative augmentation; augment.json
  plots     tsne.png (codes by label), curves.png (training / validation loss)
  grow      add the validation split to the bank without retraining; report
            log p(z) of validation codes before / after; bank_grown.npz, grow.json

The config must be the one the run was trained with (same overrides).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from exvae import config_registry, rundir
from exvae.uses import commands

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config: a shipped name or a path.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory (default: <workdir>/uses).")
flags.DEFINE_string("bank", None, "Use this saved bank (.npz) instead of building one.")
flags.DEFINE_integer("seed", 0, "Seed of sampling / the classifier / t-SNE.")
flags.DEFINE_integer("num_exemplars", 8, "generate: test exemplars (rows) to condition on.")
flags.DEFINE_integer("num_samples", 10, "generate: samples per exemplar.")
flags.DEFINE_integer("num_unconditional", 64, "generate: unconditional samples.")
flags.DEFINE_integer("chain_steps", 10, "generate: cyclic generation steps T.")
flags.DEFINE_integer("interp_steps", 10, "generate: points on each interpolation path.")
flags.DEFINE_list("ks", ["3", "5", "7", "9", "11", "13", "15"], "knn: values of k.")
flags.DEFINE_integer("epochs", 100, "augment: classifier epochs.")
flags.DEFINE_integer("hidden", 1024, "augment: MLP width h (784-h-h-10).")
flags.DEFINE_bool("use_val", True, "augment: train the classifier on train + validation.")
flags.DEFINE_integer("max_steps", 0, "augment: stop each classifier run after this many steps (0: no cap).")
flags.DEFINE_integer("tsne_points", 5000, "plots: codes in the t-SNE subsample.")
flags.DEFINE_bool("allow_bank_mismatch", False, "Use a --bank built from another model "
                  "(its codes were made by another encoder).")
flags.mark_flags_as_required(["config", "workdir"])


@rundir.cli_main   # expected errors: one line on stderr (traceback: --verbosity=1)
def main(argv):
  if len(argv) != 2 or argv[1] not in commands.COMMANDS:
    raise app.UsageError(
        f"Usage: exvae-uses <command> --config=... --workdir=...; "
        f"command one of {sorted(commands.COMMANDS)}, got {argv[1:]}")
  if not FLAGS["verbosity"].present:     # keep Orbax's INFO chatter out of the terminal
    logging.set_verbosity(logging.WARNING)
  commands.run(argv[1], FLAGS.config, FLAGS.workdir, FLAGS.out, bank_path=FLAGS.bank,
               seed=FLAGS.seed, num_exemplars=FLAGS.num_exemplars,
               num_samples=FLAGS.num_samples, num_unconditional=FLAGS.num_unconditional,
               chain_steps=FLAGS.chain_steps, interp_steps=FLAGS.interp_steps,
               ks=[int(k) for k in FLAGS.ks], epochs=FLAGS.epochs, hidden=FLAGS.hidden,
               use_val=FLAGS.use_val, max_steps=FLAGS.max_steps or None,
               tsne_points=FLAGS.tsne_points, allow_bank_mismatch=FLAGS.allow_bank_mismatch)


def run(argv=None):
  """Console-script entry point (``exvae-uses``)."""
  app.run(main, argv=config_registry.resolve_argv_or_exit(sys.argv if argv is None else argv))


if __name__ == "__main__":
  run()
