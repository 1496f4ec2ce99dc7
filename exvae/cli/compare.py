"""Paired comparison of evaluated runs: ``exvae-compare RUN_A RUN_B [RUN_C ...] [--plot]``.

Each RUN is an evaluated workdir, a ``results/<config>/`` entry, or a
``per_example.npz`` file (written by ``exvae-eval``). The runs must have
scored the same test images (checked by data set, split, binarisation seed,
count and a digest of the images) in the same way (number of importance
samples S, pruning, whose binarisation draw); ``--force`` compares runs
scored differently. For every pair it prints the mean NLL difference, its
paired standard error, the two-sided paired t-test p-value (and its Holm
adjustment over the pairs) and the share of images each model wins;
``--plot`` also writes a PNG of the per-image differences.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from exvae.cli import command

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "metric",
  "log_px",
  ["log_px", "elbo"],
  "Per-image score to compare: log_px (NLL) or elbo (negative ELBO).",
)
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-image differences (see --out).")
flags.DEFINE_string("out", "compare.png", "Where --plot writes its PNG.")
flags.DEFINE_string("json", None, "Also write the statistics to this JSON file.")
flags.DEFINE_bool("force", False, "Compare runs scored differently (S, pruning, binarisation).")

SPEC = command.Spec(
  name="compare",
  module=__name__,
  config="none",
  positional=(2, None),
  positional_help="two or more runs (evaluated workdirs, results/ entries or per_example.npz)",
  summary="paired comparison of evaluated runs on the same test images.",
  usage="exvae-compare RUN_A RUN_B [RUN_C ...] [--plot] [--force]",
)


def main(inv: command.Invocation) -> None:
  from exvae import compare as compare_lib

  result = compare_lib.compare(inv.args, metric=FLAGS.metric, force=FLAGS.force)
  for warning in result.get("warnings", []):
    print(f"{inv.prog}: warning: {warning}", file=sys.stderr, flush=True)
  print(compare_lib.format_report(result))
  if FLAGS.plot:
    print(f"plot: {compare_lib.plot(result, FLAGS.out)}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({k: v for k, v in result.items() if not k.startswith("_")}, f, indent=2)


def run(argv=None):
  """Console-script entry point (``exvae-compare``)."""
  command.run(SPEC, main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
