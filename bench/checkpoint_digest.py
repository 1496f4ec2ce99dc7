"""What checkpoint digests cost: save and restore with and without them, on the paper configs.

    python bench/checkpoint_digest.py [--configs=fashion_vae_exemplar_rat,fashion_hvae_vampprior]

Builds each config's train state at its full size (50000 training images of
28x28, random values: no data set needed), then times, over ``--repeats``
rounds (median, ms): the digest of the arrays at save (:func:`tree_digest`),
the record of the step's files after it (:func:`step_files_digest`), a whole
``Manager.save``, and a verified ``Manager.restore_latest`` next to the time
the two checks take within it.  Times are CPU times of this process (a shared
machine's other load does not count).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _state(name: str):
  import jax
  import numpy as np
  from exvae import config_registry, data, train_lib

  c = config_registry.get_config(name)
  n = 50000
  x = np.zeros((n, 28, 28, 1), np.float32)
  splits = data.Splits(
    name="fashion_mnist",
    train_x=x,
    train_y=None,
    val_x=x[:10],
    val_y=None,
    test_x=x[:10],
    test_y=None,
    binary=True,
    source="bench",
  )
  setup = train_lib.make_setup(c, splits)
  shapes = jax.eval_shape(lambda: train_lib.init_state(c, setup, n))
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda s: (
      np.asarray(rng.standard_normal(s.shape), s.dtype)
      if np.issubdtype(s.dtype, np.floating)
      else np.zeros(s.shape, s.dtype)
    ),
    shapes,
  )
  return state


def _median_ms(fn, repeats: int) -> float:
  """Median CPU time of ``fn()`` in ms (this process's, so other load on the machine does
  not count; the saves and restores run in this thread, their I/O waits do not count)."""
  ts = []
  for _ in range(repeats):
    t0 = time.process_time()
    fn()
    ts.append(time.process_time() - t0)
  return 1000 * sorted(ts)[len(ts) // 2]


def bench(name: str, repeats: int = 5) -> dict[str, float]:
  """Times (ms, medians) of the digests, a save and a verified restore of ``name``'s state."""
  import jax
  import numpy as np
  from exvae import checkpoints

  state = _state(name)
  mb = sum(np.asarray(x).nbytes for x in jax.tree.leaves((state, state.params))) / 2**20
  out = {"MB": mb}
  out["digest_arrays_ms"] = _median_ms(
    lambda: (checkpoints.tree_digest(state), checkpoints.tree_digest(state.params)), repeats
  )
  with tempfile.TemporaryDirectory() as d:
    m = checkpoints.Manager(os.path.join(d, "checkpoints"), max_to_keep=2)
    steps = iter(range(1, 10**6))
    out["save_ms"] = _median_ms(lambda: m.save(next(steps), state, state.params, {"e": 1}), repeats)
    step_dir = os.path.join(d, "checkpoints", str(m.all_steps()[-1]))
    out["digest_files_ms"] = _median_ms(lambda: checkpoints.step_files_digest(step_dir), repeats)
    r = checkpoints.Manager(os.path.join(d, "checkpoints"), read_only=True)
    out["restore_ms"] = _median_ms(lambda: r.restore_latest(state, state.params), repeats)
    out["verify_files_ms"] = _median_ms(lambda: checkpoints._verify_files(step_dir), repeats)
    out["verify_arrays_ms"] = out["digest_arrays_ms"]  # the same hashing, on restored arrays
    m.close()
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--configs", default="fashion_vae_exemplar_rat,fashion_hvae_vampprior")
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  for name in a.configs.split(","):
    r = bench(name, a.repeats)
    print(
      f"{name}: {r['MB']:.1f} MB (state + best); save {r['save_ms']:.0f} ms, of which "
      f"array digests {r['digest_arrays_ms']:.0f} ms and file digests "
      f"{r['digest_files_ms']:.0f} ms; restore {r['restore_ms']:.0f} ms, of which "
      f"array checks {r['verify_arrays_ms']:.0f} ms and file checks "
      f"{r['verify_files_ms']:.0f} ms",
      flush=True,
    )


if __name__ == "__main__":
  main()
