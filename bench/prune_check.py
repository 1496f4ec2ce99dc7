"""How far certified pruned evaluation is from the exact one, paired on the same test images.

Usage: python bench/prune_check.py --config=fashion_vae_exemplar_rat --workdir RUN
                                  [--keep 2048] [--points 300]

The certificate of ``eval.prune_keep`` bounds the error from above and can be
loose (the skipped exemplars' centre-distance bound); this measures the actual
difference: the first ``--points`` test images scored with the full bank and
with the ``--keep`` nearest exemplars, same parameters (the run's best), same
importance samples (same key), S from the config.  Reads the run directory only.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--keep", type=int, default=2048)
  ap.add_argument("--points", type=int, default=300)
  a = ap.parse_args(argv)
  from exvae import checkpoints, config_registry, evaluation, train_lib

  out = {}
  for keep in (0, a.keep):
    config = config_registry.get_config(a.config)
    config.eval.prune_keep = keep
    splits = train_lib.load_data(config)
    pool, _ = train_lib.make_pool(config, splits, None)
    setup = train_lib.make_setup(config, splits)
    template = train_lib.init_state(config, setup, splits.train_x.shape[0])
    manager = checkpoints.Manager(os.path.join(a.workdir, "checkpoints"), read_only=True)
    if keep == 0:
      state, best, meta = manager.restore_latest(template, template.params)
      step = int(state.step)
    ctx = evaluation.eval_context(
      best, pool, jax.random.PRNGKey(config.eval.bank_seed), setup=setup
    )
    t0 = time.time()
    res = evaluation.evaluate_split(
      best,
      setup,
      ctx,
      splits.test_x[: a.points],
      jax.random.PRNGKey(config.eval.seed),
      num_samples=int(config.eval.num_importance_samples),
      max_queries=int(config.eval.max_queries),
    )
    out[keep] = (-res["log_px_iwae"], res["max_err"], (time.time() - t0) / a.points)
  exact, (pruned, cert, t_p) = out[0][0], out[a.keep]
  d = pruned - exact
  best = int(meta.get("best_epoch", -1)) + 1  # meta counts epochs from 0
  print(
    f"checkpoint step {step} (best epoch {best}), {a.points} test images, "
    f"S={config.eval.num_importance_samples}: exact NLL {exact.mean():.4f}, pruned "
    f"(keep {a.keep}) {pruned.mean():.4f}; pruned - exact: mean {d.mean():.2e}, "
    f"max {d.max():.2e}, min {d.min():.2e} nats; certified bound mean {cert.mean():.3f}; "
    f"s/point exact {out[0][2]:.3f}, pruned {t_p:.3f}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
