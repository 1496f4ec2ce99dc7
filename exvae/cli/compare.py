"""Paired comparison of evaluated runs: ``exvae-compare RUN_A RUN_B [RUN_C ...] [--plot]``.

Each RUN is an evaluated workdir, a ``results/<config>/`` entry, or a
``per_example.npz`` file (written by ``exvae-eval``). The runs must have
scored the same test images (checked by data set, split, binarisation seed,
count and a digest of the images). For every pair it prints the mean NLL
difference, its paired standard error, the two-sided paired t-test p-value
(and its Holm adjustment over the pairs) and the share of images each model
wins; ``--plot`` also writes a PNG of the per-image differences.
"""

import json
import sys

from absl import app, flags, logging

from exvae import compare as compare_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("metric", "log_px", list(compare_lib.METRICS),
                  "Per-image score to compare: log_px (NLL) or elbo (negative ELBO).")
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-image differences (see --out).")
flags.DEFINE_string("out", "compare.png", "Where --plot writes its PNG.")
flags.DEFINE_string("json", None, "Also write the statistics to this JSON file.")


def main(argv):
  paths = argv[1:]
  if not FLAGS["verbosity"].present:     # keep matplotlib's INFO chatter out of the terminal
    logging.set_verbosity(logging.WARNING)
  if len(paths) < 2:
    raise app.UsageError("Usage: exvae-compare RUN_A RUN_B [RUN_C ...] [--plot] "
                         "(RUN: an evaluated workdir, a results/ entry or a per_example.npz)")
  try:
    result = compare_lib.compare(paths, metric=FLAGS.metric)
  except (FileNotFoundError, ValueError) as e:
    print(f"exvae-compare: {e}", file=sys.stderr)
    sys.exit(1)
  print(compare_lib.format_report(result))
  if FLAGS.plot:
    print(f"plot: {compare_lib.plot(result, FLAGS.out)}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({k: v for k, v in result.items() if not k.startswith("_")}, f, indent=2)


def run(argv=None):
  """Console-script entry point (``exvae-compare``)."""
  app.run(main, argv=sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
