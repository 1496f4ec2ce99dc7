"""The speed benchmarks' own arithmetic and failure modes (no timing here).

The FLOP account of bench/train_speed.py against a hand count, and
bench/vs_reference.py's refusal, with install instructions, when the
reference implementation is not installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import train_speed  # noqa: E402


def _vae_params(d=40, h=300, x=784):
  """Kernel shapes of the MLP VAE (gated layers: h and g tensors)."""
  gated = lambda i, o: {"h": {"kernel": np.zeros((i, o))}, "g": {"kernel": np.zeros((i, o))}}
  dense = lambda i, o: {"kernel": np.zeros((i, o))}
  return {"enc_0": gated(x, h), "enc_1": gated(h, h), "enc_mu": dense(h, d),
          "enc_logvar": dense(h, d), "dec_0": gated(d, h), "dec_1": gated(h, h),
          "dec_out": dense(h, x)}


def test_step_flops_rat_matches_hand_count():
  c = train_speed.make_config("rat")
  f = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  # Per row, 2 * fan_in * fan_out per dense layer; a gated layer is two 300-wide products.
  enc = 2 * (784 * 600 + 300 * 600 + 300 * 40 + 300 * 40)          # mu and log-variance heads
  enc_mean = 2 * (784 * 600 + 300 * 600 + 300 * 40)
  dec = 2 * (40 * 600 + 300 * 600 + 300 * 784)
  assert f["batch_fwd"] == 100 * (enc + dec)
  # Backward: weight gradients of every layer + input gradients of all but the data layer.
  assert f["batch_bwd"] == 100 * (enc + 2 * (300 * 600 + 300 * 40 + 300 * 40) + 2 * dec)
  assert f["exemplar_rows"] == 1000                                   # B * k, static
  assert f["exemplar_fwd"] == 1000 * enc_mean
  assert f["exemplar_remat"] == 0                                     # one chunk: no remat
  assert f["exemplar_bwd"] == 1000 * (enc_mean + 2 * (300 * 600 + 300 * 40))
  assert f["retrieval"] == 2 * 100 * 25000 * 40
  assert f["prior_fwd"] == 2 * 100 * 1000 * 40
  assert f["prior_bwd"] == 2 * f["prior_fwd"]
  assert f["refresh_per_step"] == 50000 * enc_mean / 500
  parts = ("batch_fwd", "batch_bwd", "exemplar_fwd", "exemplar_remat", "exemplar_bwd",
           "retrieval", "prior_fwd", "prior_bwd")
  assert f["total"] == sum(f[k] for k in parts)
  assert round(f["total"] / 1e6, 2) == 3831.68


def test_step_flops_exact_remat_and_union_override():
  c = train_speed.make_config("exact")
  enc_mean = 2 * (784 * 600 + 300 * 600 + 300 * 40)
  # Default budget (1024 MiB): 25000 rows x ~23 KB of activations fit, nothing recomputed.
  # The 25000 draws hold <= 20207 distinct exemplars (distinct_capacity): 21 chunks of 1000.
  g = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  assert g["exemplar_rows"] == 21000 and g["retrieval"] == 0 and g["exemplar_remat"] == 0
  assert g["exemplar_fwd"] == 21000 * enc_mean
  ref = train_speed.step_flops(c, _vae_params(), 100, 50000, 500, distinct=False)
  assert ref["exemplar_rows"] == 25000 and ref["exemplar_fwd"] == 25000 * enc_mean
  assert ref["prior_fwd"] == g["prior_fwd"]                  # the mixture keeps all 25000
  c.exemplar.encode_remat_mb = 256                                      # below ~450 MB: remat
  f = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  assert f["exemplar_remat"] == f["exemplar_fwd"] == 21000 * enc_mean
  assert g["total"] == f["total"] - f["exemplar_remat"]
  assert train_speed.step_flops(c, _vae_params(), 100, 50000, 500, remat=False)["exemplar_remat"] == 0
  r = train_speed.step_flops(train_speed.make_config("rat"), _vae_params(), 100, 50000, 500,
                             union_rows=900)
  assert r["exemplar_rows"] == 900 and r["exemplar_fwd"] == 900 * enc_mean
  gauss = train_speed.step_flops(train_speed.make_config("gaussian"), _vae_params(), 100, 50000,
                                 500)
  assert gauss["total"] == gauss["batch_fwd"] + gauss["batch_bwd"]
  assert train_speed.step_flops(c, {"conv_0": {}}, 100, 50000, 500) is None


def test_vs_reference_without_reference_says_how_to_install():
  env = dict(os.environ, EXVAE_REF_SRC="/nonexistent/ref", EXVAE_REF_PYTHON="/nonexistent/python")
  p = subprocess.run([sys.executable, str(ROOT / "bench" / "vs_reference.py"), "--quick"],
                     env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  assert "not installed" in p.stderr and "EXVAE_REF_SRC" in p.stderr
  assert "pip install torch" in p.stderr and "git clone" in p.stderr
  assert "rat_speedup" not in p.stdout


def test_other_cpu_counts_a_busy_outsider_and_not_itself():
  """vs_reference's quiet-machine verdict: CPU burnt by another process shows up,
  the same CPU counted as the benchmark's own (its pid listed) does not."""
  import time
  from bench import vs_reference
  if not os.path.exists("/proc/stat"):
    import pytest
    pytest.skip("no /proc")
  t0 = time.monotonic()
  burner = subprocess.Popen([sys.executable, "-c",
                             "import time\nwhile time.process_time() < 1.0: pass"])
  outsider = vs_reference.OtherCpu([os.getpid()])
  own = vs_reference.OtherCpu([os.getpid(), burner.pid])
  while True:                            # exited but unreaped: its /proc/<pid>/stat stays
    with open(f"/proc/{burner.pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":
        break
    time.sleep(0.05)
  f_out, f_own = outsider.fraction(), own.fraction()
  window = time.monotonic() - t0
  _, _, usage = os.wait4(burner.pid, 0)
  burnt = (usage.ru_utime + usage.ru_stime) / (window * os.cpu_count())
  assert burnt > 0
  assert f_out is not None and f_out >= 0.8 * burnt
  assert f_out - f_own >= 0.8 * burnt    # listed as its own, the burner no longer counts
