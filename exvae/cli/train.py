"""Trains an exvae model: ``exvae-train --config=<name or path> --workdir=<dir>``.

``--config`` takes a shipped config's name (``fashion_vae_exemplar_rat``;
``exvae configs`` lists them), a ``.py`` path or a ``.json`` file. Any config
field can be overridden: ``--config.num_epochs=10 --config.exemplar.rat=True``.
Training resumes automatically from the latest checkpoint in ``--workdir``;
on a workdir that holds a run, ``--config`` may be omitted (the run's
``config.json`` is used, overrides apply on top).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from absl import flags

from exvae.cli import command

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: host:port of process 0 (enables jax.distributed)."
)
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-host with auto-detected cluster settings "
  "(SLURM, Cloud TPU): jax.distributed.initialize() without arguments.",
)
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume even though the config changes the "
  "model, data or optimisation (recorded in <workdir>/config_changes.jsonl).",
)
flags.DEFINE_bool(
  "overwrite",
  False,
  "Start afresh in a workdir that holds an earlier run's "
  "history but no checkpoint: its files move to <workdir>/previous/<time>/.",
)

SPEC = command.Spec(
  name="train",
  module=__name__,
  config="required",
  summary="trains a model; resumes from the workdir's newest checkpoint.",
  usage="exvae-train --config=NAME|FILE --workdir=DIR [--config.KEY=VALUE ...]\n"
  "       exvae-train --workdir=DIR [--config.num_epochs=N ...]   (resume a run)",
)


def summary_line(summary: Mapping[str, Any]) -> str:
  """The last line of training: steps, epochs, the best validation loss and its epoch (1-based).

  Args:
    summary: what :func:`exvae.train_lib.train_and_evaluate` returns.

  Returns:
    One line, e.g. ``finished: step 128, epoch 2; best validation loss 45.12 at epoch 2``.
  """
  state = "finished" if summary.get("finished") else "stopped"
  if summary.get("early_stopped"):
    state += " (early stopping)"
  parts = [f"step {summary.get('step')}"]
  if summary.get("epochs") is not None:
    parts.append(f"epoch {float(summary['epochs']):g}")
  if summary.get("wall_time_s") is not None:
    parts.append(f"{float(summary['wall_time_s']):.0f} s")
  line = f"{state}: {', '.join(parts)}"
  best, epoch = summary.get("best_val"), summary.get("best_epoch")
  if best is not None and epoch is not None and int(epoch) >= 1:  # 1-based
    line += f"; best validation loss {float(best):.3f} at epoch {int(epoch)}"
  else:
    line += "; no validated epoch yet"
  return line


def main(inv: command.Invocation) -> None:
  from exvae import distributed, train_lib

  if FLAGS.coordinator_address or FLAGS.distributed:
    distributed.initialize(FLAGS.coordinator_address or "", FLAGS.num_processes, FLAGS.process_id)
  summary = train_lib.train_and_evaluate(
    inv.config,
    inv.workdir,
    allow_config_change=FLAGS.allow_config_change,
    overwrite=FLAGS.overwrite,
  )
  print(summary_line(summary))


def run(argv=None):
  """Console-script entry point (``exvae-train``)."""
  command.run(SPEC, main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
