"""exvae.resumable: saved arrays come back only to the same work, whole, with a line why not."""

import numpy as np

from exvae import resumable


def test_saved_arrays_come_back_only_with_their_identity_digest_and_shapes(tmp_path, capsys):
  path = str(tmp_path / "sub" / "work.npz")
  like = {"scores": np.zeros(4), "done": np.int64(0), "losses": None}
  kw = dict(what="partial job", restart="starting over")
  assert resumable.load(path, "a", like, **kw) is None and capsys.readouterr().out == ""
  resumable.save(path, "a", {"scores": np.arange(4.0), "done": np.int64(2), "losses": np.ones(7)})
  got = resumable.load(path, "a", like, **kw)
  assert set(got) == {"scores", "done", "losses"}
  np.testing.assert_array_equal(got["scores"], np.arange(4.0))
  assert int(got["done"]) == 2 and got["losses"].shape == (7,)
  # Another identity, other shapes, a torn file: None, each with its line.
  assert resumable.load(path, "b", like, other="parameters", **kw) is None
  assert "a partial job of other parameters; starting over" in capsys.readouterr().out
  assert resumable.load(path, "a", dict(like, scores=np.zeros(5)), **kw) is None
  assert "a partial job of other shapes; starting over" in capsys.readouterr().out
  assert resumable.load(path, "a", dict(like, missing=None), **kw) is None
  assert "of other shapes" in capsys.readouterr().out
  with open(path, "rb") as f:
    whole = f.read()
  with open(path, "wb") as f:
    f.write(whole[:100])
  assert resumable.load(path, "a", like, **kw) is None
  assert "unreadable partial job (" in capsys.readouterr().out
