"""Evaluates a trained run: ``exvae-eval --workdir=<dir>`` (the run's own config.json).

Computes the importance-sampled test NLL (``--config.eval.num_importance_samples``,
default 5000) against all training exemplars, the test ELBO and its terms, and
writes ``<workdir>/eval_metrics.json``, the per-image scores
``<workdir>/per_example.npz`` (see :mod:`exvae.per_example`; compared with
``exvae-compare``) and the scalars into the run's TensorBoard events; with
``--config.eval.out_dir=DIR`` into DIR instead, and nothing into the run
directory. Run again with the same parameters, images and settings, it
prints that the evaluation is done and keeps its outputs
(``--config.eval.reuse=False`` scores again). ``--config`` may name the run's
config instead (then with the run's training overrides); evaluation settings
(``eval.*``) may differ.
"""

from __future__ import annotations

import json
import sys

from exvae.cli import command, exits

SPEC = command.Spec(
  name="eval",
  module=__name__,
  config="from_run",
  summary="scores a trained run: test NLL (importance sampled), ELBO, reconstruction, KL.",
  usage="exvae-eval --workdir=DIR [--config.eval.num_importance_samples=S ...]\n"
  "       exvae-eval --config=NAME|FILE --workdir=DIR [--config.KEY=VALUE ...]",
)


def main(inv: command.Invocation) -> None:
  if inv.config is None:
    raise exits.missing_run(inv.workdir)
  from exvae import eval_lib
  from exvae.cli import eval_events

  config = inv.config
  metrics = eval_lib.evaluate(config, inv.workdir)
  eval_events.write(metrics, config, inv.workdir)  # unless a reused evaluation's are there
  print(json.dumps(metrics, indent=2))
  print(
    f"test NLL = {metrics['test_nll']:.2f} nats (S={metrics['num_importance_samples']}, "
    f"{metrics['num_test_examples']} test images); samples: {metrics['samples_png']}"
  )


def run(argv=None):
  """Console-script entry point (``exvae-eval``)."""
  command.run(SPEC, main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
