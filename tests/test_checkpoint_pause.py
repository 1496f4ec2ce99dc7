"""A run paused longer than Orbax's async timeouts (SIGSTOP, a suspended VM or laptop)
must save normally once it continues.

Session 4 lost a training run this way: stopped for 30 minutes during a save, it
resumed into ``TimeoutError: Thread write_metadata_after_commits did not complete
within 1200 s`` from Orbax's background commit thread.  ``Manager.save`` waits for
every save anyway, so checkpoints are written synchronously: no background thread,
and the commit threads Orbax still starts wait up to a week.  The pause is
simulated by taking an hour off every timed wait in Orbax's futures.
"""

import os
import time
import jax.numpy as jnp
import numpy as np

from exvae import checkpoints


def test_a_save_survives_an_hour_long_pause(tmp_path, monkeypatch):
  from orbax.checkpoint._src.futures import future

  # Every timed wait in Orbax's futures loses an hour, as a thread waiting in a
  # process stopped for an hour finds on continuing.
  def remaining(start, timeout):
    if timeout is None:
      return None
    return max(0.0, timeout - (time.time() - start) - 3600.0)

  monkeypatch.setattr(future, "get_remaining_time", remaining)
  m = checkpoints.Manager(os.path.join(tmp_path, "checkpoints"), max_to_keep=2, create=True)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  best = {"w": jnp.ones((2, 3))}
  m.save(3, state, best, {"epoch": 1})
  m.save(4, state, best, {"epoch": 2})
  assert m.all_steps() == [3, 4]
  r = checkpoints.Manager(os.path.join(tmp_path, "checkpoints"), read_only=True)
  restored, best_r, meta = r.restore_latest(state, best)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert meta["epoch"] == 2
