"""Evaluates a trained run: ``python eval.py --config=configs/<name>.py --workdir=<dir>``.

A thin entry point to :mod:`exvae.cli.eval` (installed as ``exvae-eval``).
Computes the importance-sampled test NLL (``--config.eval.num_importance_samples``,
default 5000) against all training exemplars, the test ELBO and its terms, and
writes ``<workdir>/eval_metrics.json`` and ``<workdir>/per_example.npz``.
"""

from exvae.cli.eval import run

if __name__ == "__main__":
  run()
