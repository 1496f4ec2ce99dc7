"""A data set from the user's own code: scikit-learn's 8x8 digits as a plug-in.

Run it without editing exvae (from this directory, or by file path from anywhere):

    exvae-train --config=test --workdir=runs/dd --config.data_source=auto \\
        --config.dataset=/path/to/examples/digits_dataset.py:load

The function takes no arguments and returns the same keys an ``.npz`` holds
(``x_train``, ``x_test``, optionally ``x_val`` and ``y_train`` / ``y_val`` /
``y_test``); exvae checks every array before training, exactly as for
``--config.dataset=npz:PATH``, and records the SHA-256 of the arrays in the run.
"""

import numpy as np


def load():
  """The 1797 digits, grey levels 0-16 scaled to uint8 0-255; the last 297 are the test set."""
  from sklearn.datasets import load_digits

  d = load_digits()
  x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
  y = d.target.astype(np.int64)
  return {"x_train": x[:1500], "y_train": y[:1500], "x_test": x[1500:], "y_test": y[1500:]}
