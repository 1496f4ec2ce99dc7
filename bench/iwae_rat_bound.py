"""The bound IWAE trains against under RAT, beside the exact exemplar prior's.

Usage: python bench/iwae_rat_bound.py [--model results/fashion_vae_exemplar_rat/model]
                                      [--k 5] [--batches 20] [--out results/objectives]

With a trained exemplar model's parameters held fixed, each of ``--batches``
training batches (binarised and ordered as training draws them) is scored at
beta = 1 by the k-sample IWAE training loss under four prior contexts, with
the same images, ids and noise:

* ``exact``: the exact exemplar prior over all N training exemplars with
  leave-one-out (weights 1/(N - 1)), the density the model is evaluated with;
* ``rat_reference``: RAT as trained (the k = 10 nearest of M = 25000 cached
  codes per image; the union normalised by its size, as the authors' code);
* ``rat_bound``: RAT with weights 1/(N - 1), a lower bound on ``exact``;
* ``elbo``: the one-sample ELBO under the exact prior, for scale.

Each image's k samples are scored against one retrieved union (the
neighbours of every image's encoder mean), as :func:`exvae.objectives.iwae_loss`
builds it.  Prints the mean loss of each and their paired differences, and
writes ``<out>/rat_bound.json``.
"""

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from exvae import api, config_registry, runinfo, train_lib
from exvae.objectives import elbo_loss, iwae_loss


def variant(config, **over):
  """A copy of ``config`` with ``over`` applied (apply_overrides changes its argument)."""
  return config_registry.apply_overrides(
    copy.deepcopy(config), [(k, str(v)) for k, v in over.items()]
  )


def provenance() -> dict:
  """The commit (and whether the tree had changes), the date and the command."""
  import datetime
  import subprocess

  git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
  return {
    "commit": git("rev-parse", "--short", "HEAD")
    + ("+changes" if git("status", "--porcelain", "exvae", "bench") else ""),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "command": " ".join(["bench/iwae_rat_bound.py"] + sys.argv[1:]),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="results/fashion_vae_exemplar_rat/model")
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--batches", type=int, default=20)
  ap.add_argument("--out", default="results/objectives")
  args = ap.parse_args()
  run = api.load_run(args.model, bank=False)
  base = variant(run.config, objective="iwae", objective_samples=args.k)
  variants = {
    "exact": variant(base, **{"exemplar.rat": False, "exemplar.num_exemplars": 0}),
    "rat_reference": variant(base, **{"exemplar.rat": True, "exemplar.rat_mode": "reference"}),
    "rat_bound": variant(base, **{"exemplar.rat": True, "exemplar.rat_mode": "bound"}),
  }
  splits = run.splits
  n = splits.train_x.shape[0]
  pool = jnp.asarray(splits.train_x)
  perm = jnp.asarray(train_lib.epoch_permutation(0, 0, n))
  scores = {name: [] for name in list(variants) + ["elbo"]}
  for name, c in variants.items():
    setup = train_lib.make_setup(c, splits)
    state = train_lib.init_state(c, setup, n).replace(params=run.params)
    state = train_lib.refresh_step(state, pool, setup=setup)
    one = jnp.float32(1.0)
    loss = jax.jit(lambda p, s, x, i, k, setup=setup: iwae_loss(p, s, setup, x, i, k, one, pool))
    elbo = jax.jit(lambda p, s, x, i, k, setup=setup: elbo_loss(p, s, setup, x, i, k, one, pool))
    for b in range(args.batches):
      x, ids, key = train_lib.train_batch(state.key, jnp.int32(b * 17), pool, perm, setup=setup)
      scores[name].append(float(loss(state.params, state.prior_state, x, ids, key)[0]))
      if name == "exact":
        scores["elbo"].append(float(elbo(state.params, state.prior_state, x, ids, key)[0]))
  res = {
    "model": args.model,
    "k": args.k,
    "batches": args.batches,
    "mean_loss": {k: float(np.mean(v)) for k, v in scores.items()},
    "machine": runinfo.machine(),
    "provenance": provenance(),
  }
  ex = np.asarray(scores["exact"])
  res["paired_vs_exact"] = {}
  for name in ("rat_reference", "rat_bound", "elbo"):
    d = np.asarray(scores[name]) - ex
    res["paired_vs_exact"][name] = {
      "mean": float(d.mean()),
      "se": float(d.std(ddof=1) / np.sqrt(len(d))),
    }
  for name, v in res["mean_loss"].items():
    print(
      f"{name:14s} loss {v:9.3f}"
      + (
        ""
        if name == "exact"
        else f"   - exact: {res['paired_vs_exact'][name]['mean']:+.3f} "
        f"+- {res['paired_vs_exact'][name]['se']:.3f}"
      )
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "rat_bound.json"), "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
