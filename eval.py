"""Evaluates a trained run: ``python eval.py --config=configs/<name>.py --workdir=<dir>``.

A thin entry point to :mod:`exvae.cli.eval` (installed as ``exvae-eval``).
Computes the importance-sampled test NLL (``--config.eval.num_importance_samples``,
default 5000) against all training exemplars, the test ELBO and its terms, and
writes ``eval_metrics.json`` and ``per_example.npz`` into the workdir, or into
``--config.eval.out_dir`` when set (then nothing is written into the run directory).
"""

from exvae.cli.eval import run

if __name__ == "__main__":
  run()
