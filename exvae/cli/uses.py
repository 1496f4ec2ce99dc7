"""Downstream uses of a trained run: ``exvae-uses <command> --workdir=<dir>``.

Commands (outputs go to ``--out``, default ``<workdir>/uses``):

  bank      build the exemplar bank from the training split, save bank.npz,
            print its size on disk vs the raw uint8 images
  generate  conditional.png, unconditional.png, cyclic.png, interpolation.png
  knn       kNN error per k on encoder means (validation and test); knn.json
  augment   MLP test error without / with generative augmentation; augment.json;
            augment_runs/ keeps each finished classifier and the state of the
            one in training (every 10 epochs), so the same command started
            again after a stop continues where it stopped
  plots     tsne.png (codes by label), curves.png (training / validation loss)
  grow      add the validation split to the bank without retraining; report
            log p(z) of validation codes before / after; bank_grown.npz, grow.json

The config is the run's own ``<workdir>/config.json`` unless ``--config``
names it (then with the run's training overrides).
"""

from __future__ import annotations

import sys

from absl import flags

from exvae.cli import command, exits

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory (default: <workdir>/uses).")
flags.DEFINE_string("bank", None, "Use this saved bank (.npz) instead of building one.")
flags.DEFINE_integer("seed", 0, "Seed of sampling / the classifier / t-SNE.")
flags.DEFINE_integer("num_exemplars", 8, "generate: test exemplars (rows) to condition on.")
flags.DEFINE_integer("num_samples", 10, "generate: samples per exemplar.")
flags.DEFINE_integer("num_unconditional", 64, "generate: unconditional samples.")
flags.DEFINE_integer("chain_steps", 10, "generate: cyclic generation steps T.")
flags.DEFINE_integer("interp_steps", 10, "generate: points on each interpolation path.")
flags.DEFINE_list("ks", ["3", "5", "7", "9", "11", "13", "15"], "knn: values of k.")
flags.DEFINE_enum(
  "query_images",
  "grey",
  ["grey", "binarised"],
  "knn: validation/test queries as grey levels (the authors') or binarised.",
)
flags.DEFINE_enum(
  "tie_break",
  "lowest_label",
  ["lowest_label", "distance"],
  "knn: a tied vote goes to the lowest label (the authors') or the closest voters.",
)
flags.DEFINE_list(
  "seeds", None, "augment: classifier seeds (default: --seed); each trains both arms."
)
flags.DEFINE_enum(
  "encode_input",
  "grey",
  ["grey", "bernoulli"],
  "augment: the encoder sees the grey image (the authors') or a binarisation of it.",
)
flags.DEFINE_integer("epochs", 100, "augment: classifier epochs.")
flags.DEFINE_integer("hidden", 1024, "augment: MLP width h (784-h-h-10).")
flags.DEFINE_bool("use_val", True, "augment: train the classifier on train + validation.")
flags.DEFINE_integer(
  "max_steps", 0, "augment: stop each classifier run after this many steps (0: no cap)."
)
flags.DEFINE_float(
  "aug_log_var",
  None,
  "augment: log s2 of the augmentation noise (default: the exemplar prior's learned one).",
)
flags.DEFINE_list(
  "arms",
  ["without", "with"],
  "augment: the classifiers to train, without and/or with augmentation.",
)
flags.DEFINE_integer("tsne_points", 5000, "plots: codes in the t-SNE subsample.")
flags.DEFINE_bool(
  "allow_bank_mismatch",
  False,
  "Use a --bank built from another model (its codes were made by another encoder).",
)

COMMANDS = ("bank", "generate", "knn", "augment", "plots", "grow")
SPEC = command.Spec(
  name="uses",
  module=__name__,
  config="from_run",
  positional=(1, 1),
  positional_help=f"one command: {', '.join(COMMANDS)}",
  summary="downstream uses of a trained run: " + ", ".join(COMMANDS) + ".",
  usage="exvae-uses {" + ",".join(COMMANDS) + "} --workdir=DIR [--out=DIR] [flags]",
)


def main(inv: command.Invocation) -> None:
  cmd = inv.args[0]
  if cmd not in COMMANDS:
    import difflib

    close = difflib.get_close_matches(cmd, COMMANDS, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise exits.UsageError(f"unknown command {cmd!r}; one of {', '.join(COMMANDS)}.{hint}")
  if inv.config is None:
    raise exits.missing_run(inv.workdir)
  from exvae.uses import augment

  if not FLAGS.arms or set(FLAGS.arms) - set(augment.ARMS):
    raise exits.UsageError(f"--arms takes 'without' and/or 'with', got {','.join(FLAGS.arms)!r}")
  from exvae import stopping
  from exvae.uses import commands

  with stopping.on_sigterm():  # one line, exit 143; a classifier in training saves its state
    commands.run(
      cmd,
      inv.config,
      inv.workdir,
      FLAGS.out,
      bank_path=FLAGS.bank,
      seed=FLAGS.seed,
      num_exemplars=FLAGS.num_exemplars,
      num_samples=FLAGS.num_samples,
      num_unconditional=FLAGS.num_unconditional,
      chain_steps=FLAGS.chain_steps,
      interp_steps=FLAGS.interp_steps,
      ks=[int(k) for k in FLAGS.ks],
      query_images=FLAGS.query_images,
      tie_break=FLAGS.tie_break,
      epochs=FLAGS.epochs,
      hidden=FLAGS.hidden,
      seeds=[int(x) for x in FLAGS.seeds] if FLAGS.seeds else None,
      encode_input=FLAGS.encode_input,
      use_val=FLAGS.use_val,
      max_steps=FLAGS.max_steps or None,
      aug_log_var=FLAGS.aug_log_var,
      arms=FLAGS.arms,
      tsne_points=FLAGS.tsne_points,
      allow_bank_mismatch=FLAGS.allow_bank_mismatch,
    )


def run(argv=None):
  """Console-script entry point (``exvae-uses``)."""
  command.run(SPEC, main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
