"""reference/ref_classify.py: what it reads from the authors' classifier and what it refuses.

The torch side needs the authors' code (not installed in CI). Checked here:
the per-epoch test errors are read from their printed accuracies (the last one
is their result), the stand-in model hands the real batch back as the
"augmented" one in the shape their loop squeezes, and bad arguments stop with
a usage error before anything runs.
"""

import numpy as np
import pytest

from reference import ref_classify

THEIR_LOG = """epoch number: 1
learning rate: 0.0901
val acc 0.84
accuracy test: 0.8398
time: 80.1
epoch number: 2
learning rate: 0.0802
val acc 0.86
accuracy test: 0.8612999999999998
time: 79.0
accuracy val: 0.8601
accuracy test: 0.8612999999999998
"""


def test_test_errors_are_read_from_their_log():
  errs = ref_classify.per_epoch_test_errors(THEIR_LOG)
  np.testing.assert_allclose(errs, [16.02, 13.87, 13.87], atol=1e-9)
  assert ref_classify.per_epoch_test_errors("val acc 0.9\n") == []


class _Batch:
  """A stand-in for a torch tensor: what RealImages calls on the batch."""

  def __init__(self, a):
    self.a = np.asarray(a)

  def unsqueeze(self, dim):
    return _Batch(np.expand_dims(self.a, dim))

  def repeat(self, *reps):
    return _Batch(np.tile(self.a, reps))


def test_the_stand_in_returns_the_real_batch():
  x = np.arange(12.0).reshape(3, 4)
  out = ref_classify.RealImages().reference_based_generation_x(reference_image=_Batch(x), N=1)
  assert out.a.shape == (3, 1, 4)  # their loop squeezes it back to (3, 4)
  np.testing.assert_array_equal(out.a[:, 0], x)


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--threads", "0"]])
def test_bad_arguments_are_refused(bad):
  with pytest.raises(SystemExit) as e:
    ref_classify.main(bad)
  assert e.value.code == 2
