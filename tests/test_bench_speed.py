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
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import train_speed  # noqa: E402


def _vae_params(d=40, h=300, x=784):
  """Kernel shapes of the MLP VAE (gated layers: h and g tensors)."""
  gated = lambda i, o: {"h": {"kernel": np.zeros((i, o))}, "g": {"kernel": np.zeros((i, o))}}
  dense = lambda i, o: {"kernel": np.zeros((i, o))}
  return {
    "enc_0": gated(x, h),
    "enc_1": gated(h, h),
    "enc_mu": dense(h, d),
    "enc_logvar": dense(h, d),
    "dec_0": gated(d, h),
    "dec_1": gated(h, h),
    "dec_out": dense(h, x),
  }


def test_step_flops_rat_matches_hand_count():
  c = train_speed.make_config("rat")
  f = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  # Per row, 2 * fan_in * fan_out per dense layer; a gated layer is two 300-wide products.
  enc = 2 * (784 * 600 + 300 * 600 + 300 * 40 + 300 * 40)  # mu and log-variance heads
  enc_mean = 2 * (784 * 600 + 300 * 600 + 300 * 40)
  dec = 2 * (40 * 600 + 300 * 600 + 300 * 784)
  assert f["batch_fwd"] == 100 * (enc + dec)
  # Backward: weight gradients of every layer + input gradients of all but the data layer.
  assert f["batch_bwd"] == 100 * (enc + 2 * (300 * 600 + 300 * 40 + 300 * 40) + 2 * dec)
  assert f["exemplar_rows"] == 1000  # B * k, static
  assert f["exemplar_fwd"] == 1000 * enc_mean
  assert f["exemplar_remat"] == 0  # one chunk: no remat
  assert f["exemplar_bwd"] == 1000 * (enc_mean + 2 * (300 * 600 + 300 * 40))
  assert f["retrieval"] == 2 * 100 * 25000 * 40
  assert f["prior_fwd"] == 2 * 100 * 1000 * 40
  assert f["prior_bwd"] == 2 * f["prior_fwd"]
  assert f["refresh_per_step"] == 50000 * enc_mean / 500
  parts = (
    "batch_fwd",
    "batch_bwd",
    "exemplar_fwd",
    "exemplar_remat",
    "exemplar_bwd",
    "retrieval",
    "prior_fwd",
    "prior_bwd",
  )
  assert f["total"] == sum(f[k] for k in parts)
  assert round(f["total"] / 1e6, 2) == 3831.68


def test_step_flops_exact_remat_and_union_override():
  c = train_speed.make_config("exact")
  enc_mean = 2 * (784 * 600 + 300 * 600 + 300 * 40)
  # Default budget (1024 MiB): 25000 rows x ~23 KB of activations fit, nothing recomputed.
  # The 25000 draws hold <= 20207 distinct exemplars (distinct_capacity): 21 chunks, of
  # ceil(20207 / 21) = 963 rows rounded up to 968 (a multiple of 8).
  g = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  assert g["exemplar_rows"] == 21 * 968 and g["retrieval"] == 0 and g["exemplar_remat"] == 0
  assert g["exemplar_fwd"] == 21 * 968 * enc_mean
  ref = train_speed.step_flops(c, _vae_params(), 100, 50000, 500, distinct=False)
  assert ref["exemplar_rows"] == 25000 and ref["exemplar_fwd"] == 25000 * enc_mean
  assert ref["prior_fwd"] == g["prior_fwd"]  # the mixture keeps all 25000
  c.exemplar.encode_remat_mb = 256  # below ~450 MB: remat
  f = train_speed.step_flops(c, _vae_params(), batch=100, num_train=50000, steps_per_epoch=500)
  assert f["exemplar_remat"] == f["exemplar_fwd"] == 21 * 968 * enc_mean
  assert g["total"] == f["total"] - f["exemplar_remat"]
  assert (
    train_speed.step_flops(c, _vae_params(), 100, 50000, 500, remat=False)["exemplar_remat"] == 0
  )
  # RAT with 480 distinct union rows: with exemplar.rat_compact exvae encodes the 4 chunks
  # of 125 rows holding them (all 1000 without, the default) and sums the static 1000-row
  # union; the reference encodes and sums exactly 480.
  rat = train_speed.make_config("rat", rat_compact=True)
  r = train_speed.step_flops(rat, _vae_params(), 100, 50000, 500, union_rows=480)
  assert r["exemplar_rows"] == 500 and r["exemplar_fwd"] == 500 * enc_mean
  assert r["prior_fwd"] == 2 * 100 * 1000 * 40
  rr = train_speed.step_flops(rat, _vae_params(), 100, 50000, 500, union_rows=480, distinct=False)
  assert rr["exemplar_rows"] == 480 and rr["prior_fwd"] == 2 * 100 * 480 * 40
  rat.exemplar.rat_compact = False
  ra = train_speed.step_flops(rat, _vae_params(), 100, 50000, 500, union_rows=480)
  assert ra["exemplar_rows"] == 1000 and ra["exemplar_fwd"] == 1000 * enc_mean
  gauss = train_speed.step_flops(
    train_speed.make_config("gaussian"), _vae_params(), 100, 50000, 500
  )
  assert gauss["total"] == gauss["batch_fwd"] + gauss["batch_bwd"]
  assert train_speed.step_flops(c, {"conv_0": {}}, 100, 50000, 500) is None


def test_vs_reference_without_reference_says_how_to_install():
  env = dict(os.environ, EXVAE_REF_SRC="/nonexistent/ref", EXVAE_REF_PYTHON="/nonexistent/python")
  p = subprocess.run(
    [sys.executable, str(ROOT / "bench" / "vs_reference.py"), "--quick"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
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
  burner = subprocess.Popen(
    [sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass"]
  )
  outsider = vs_reference.OtherCpu([os.getpid()])
  own = vs_reference.OtherCpu([os.getpid(), burner.pid])
  while True:  # exited but unreaped: its /proc/<pid>/stat stays
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
  assert f_out - f_own >= 0.8 * burnt  # listed as its own, the burner no longer counts


# ------------------------------------------------------------------------------
# JSON summaries and the per-operation profile (no timing asserted)
# ------------------------------------------------------------------------------


def test_vs_reference_summary_has_the_readme_schema(tmp_path):
  import json
  from bench import vs_reference

  prov = train_speed.provenance(["bench/vs_reference.py", "--quick"])
  assert set(prov) == {"commit", "date", "command"} and prov["command"].endswith("--quick")
  s = vs_reference.summary(
    "Some CPU",
    2,
    400.5,
    160.25,
    [("rat: training step", "ms", 20.0, 50.0), ("evaluation", "s", 0.5, 40.0, 79.0)],
    prov,
  )
  path = train_speed.write_json(str(tmp_path / "speed" / "vs_reference.json"), s)
  back = json.loads(open(path).read())
  assert set(back) == {"machine", "provenance", "rows"}
  assert back["machine"] == {
    "cpu": "Some CPU",
    "cores": 2,
    "xla_matmul_gflops": 400.5,
    "torch_matmul_gflops": 160.25,
  }
  assert set(back["provenance"]) == {"commit", "date", "command"}
  assert [set(r) for r in back["rows"]] == [{"what", "unit", "exvae", "reference", "speedup"}] * 2
  assert back["rows"][0]["speedup"] == 2.5 and back["rows"][1]["speedup"] == 79.0
  assert isinstance(back["machine"]["cores"], int)


def test_train_speed_step_record():
  f = {"total": 3.0e9}
  r = train_speed.step_record("rat", 0.020, f, 300e9, epoch_s=10.0)
  assert r["ms_per_step"] == 20.0 and r["gflop_per_step"] == 3.0
  assert abs(r["achieved_gflops"] - 150.0) < 1e-9 and abs(r["share_of_matmul_rate"] - 0.5) < 1e-12
  assert r["epoch_s"] == 10.0
  none = train_speed.step_record("x", 0.010, None, None)
  assert none["gflop_per_step"] is None and none["share_of_matmul_rate"] is None


_HLO = """HloModule jit_f, entry_computation_layout={()->f32[]}

%fused_dot (param_0: f32[8,16], param_1: f32[16,4]) -> f32[8,4] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_tanh (param_0.1: f32[8,4]) -> f32[8,4] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[8,4]{1,0} tanh(%param_0.1)
}

ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %ynn_fusion = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/VAE.encode_mean/dot_general"}
  %dot.2 = f32[16,4]{1,0} dot(%a, %ynn_fusion), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose(jvp(jit(log_kernel_sum)))/dot"}
  %copy.3 = f32[8,4]{1,0} copy(%ynn_fusion)
  ROOT %tanh_fusion = f32[8,4]{1,0} fusion(%copy.3), kind=kLoop, calls=%fused_tanh
}
"""


def test_op_profile_classifies_and_attributes_async_time():
  from bench import op_profile

  hlo = op_profile.parse_hlo(_HLO)
  c = op_profile.classify(hlo, "ynn_fusion")
  assert (c["kind"], c["label"], c["flops"], c["part"]) == (
    "matmul",
    "8x16x4",
    2 * 8 * 16 * 4,
    "exemplar encoder",
  )
  d = op_profile.classify(hlo, "dot.2")
  assert (d["kind"], d["label"], d["part"]) == ("matmul", "16x8x4", "prior kernel")
  assert op_profile.classify(hlo, "copy.3")["kind"] == "copy/transpose/concat"
  assert op_profile.classify(hlo, "tanh_fusion")["kind"] == "elementwise"
  ev = lambda name, ts, dur, run="1", tid=1: {
    "ph": "X",
    "name": name,
    "ts": ts,
    "dur": dur,
    "tid": tid,
    "args": {"hlo_op": name, "hlo_module": "jit_f", "run_id": run},
  }
  end = lambda name, ts: {"ph": "X", "name": "end: " + name, "ts": ts, "dur": 0.1, "tid": 1}
  # One run: the fused dot 0-100 µs; dot.2 launched at 100-110 and ends at 400
  # (asynchronous: 110-300 has no thunk running, booked to it); copy 300-350;
  # tanh 350-400 µs; a second, synchronous run of the fused dot.
  events = [
    ev("ynn_fusion", 0, 100),
    end("ynn_fusion", 99.9),
    ev("dot.2", 100, 10),
    end("dot.2", 400),
    ev("copy.3", 300, 50),
    ev("tanh_fusion", 350, 50),
    ev("ynn_fusion", 1000, 100, run="2"),
    end("ynn_fusion", 1099.9),
    {
      "ph": "X",
      "name": "other module",
      "ts": 0,
      "dur": 5,
      "tid": 1,
      "args": {"hlo_op": "x", "hlo_module": "jit_g", "run_id": "1"},
    },
  ]
  s = op_profile.summarize(hlo, op_profile._exclusive_events(events, "jit_f"))
  assert s["steps"] == 2
  # per step: matmul (100 + 10 + 190 + 100) / 2, copy 50 / 2, elementwise 50 / 2
  assert abs(s["kinds"]["matmul"] - 0.2) < 1e-9
  assert abs(s["kinds"]["copy/transpose/concat"] - 0.025) < 1e-9
  assert abs(s["kinds"]["elementwise"] - 0.025) < 1e-9
  mm = {m["shape"]: m for m in s["matmuls"]}
  assert mm["16x8x4"]["calls"] == 0.5 and abs(mm["16x8x4"]["ms"] - 0.1) < 1e-9
  assert mm["8x16x4"]["calls"] == 1.0
  assert abs(s["op_ms"] - 0.25) < 1e-9
  assert "matmul" in op_profile.format_table("f", s, 1e9)


def test_op_profile_of_a_real_trace():
  import jax
  import jax.numpy as jnp
  from bench import op_profile

  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  text = f.lower(a, b).compile().as_text()
  p = op_profile.profile(lambda: jax.block_until_ready(f(a, b)), text, "jit__lambda", 3)
  assert p["steps"] == 3 and p["op_ms"] > 0
  assert any(m["shape"] == "64x32x48" for m in p["matmuls"]), p["matmuls"]


def test_op_profile_books_async_time_inside_a_loop_to_the_thunk_not_the_loop():
  from bench import op_profile

  ev = lambda name, ts, dur, tid=1: {
    "ph": "X",
    "name": name,
    "ts": ts,
    "dur": dur,
    "tid": tid,
    "args": {"hlo_op": name, "hlo_module": "m", "run_id": "1"},
  }
  end = lambda name, ts: {"ph": "X", "name": "end: " + name, "ts": ts, "dur": 0.1, "tid": 1}
  # A loop 0-1000 µs; in it a fused op 0-100, an async dot launched 100-110 ending at 700,
  # an element-wise op 700-800; 800-1000 nothing runs (the loop's own time).
  events = [
    ev("while.1", 0, 1000),
    ev("fusion.2", 0, 100),
    end("fusion.2", 99),
    ev("dot.3", 100, 10),
    end("dot.3", 700),
    ev("fusion.4", 700, 100),
  ]
  rows = op_profile._exclusive_events(events, "m", frozenset({"while.1"}))
  t = {}
  for op, us, *_ in rows:
    t[op] = t.get(op, 0.0) + us
  assert t == {"while.1": 200.0, "fusion.2": 100.0, "dot.3": 600.0, "fusion.4": 100.0}, t
  assert abs(sum(t.values()) - 1000.0) < 1e-9


def test_op_profile_matmul_bound_from_lone_rates():
  from bench import op_profile

  p = {"matmuls": [{"shape": "10x20x30", "gflop": 2.0}, {"shape": "5x5x5", "gflop": 1.0}]}
  op_profile.add_ceiling(p, {"10x20x30": 100.0, "5x5x5": 10.0, "2048x2048x2048": 300.0})
  assert abs(p["matmul_bound_ms"] - (2.0 / 100.0 + 1.0 / 10.0) * 1e3) < 1e-9
  assert abs(p["matmul_bound_share"] - 3.0 / 0.12 / 300.0) < 1e-12
  assert p["matmuls"][1]["isolated_gflops"] == 10.0


def test_set_overrides_reach_every_timed_config(monkeypatch):
  monkeypatch.setattr(train_speed, "OVERRIDES", [])
  train_speed.OVERRIDES.extend(train_speed.parse_set("exemplar.encode_chunk=2500, seed=3"))
  c = train_speed.make_config("exact")
  assert (c.exemplar.encode_chunk, c.seed, c.prior) == (2500, 3, "exemplar")
  train_speed.OVERRIDES.extend(train_speed.parse_set("exemplar.encode_chunks=1"))
  with pytest.raises(SystemExit, match="has no key 'exemplar.encode_chunks'"):
    train_speed.make_config("exact")
  with pytest.raises(SystemExit, match="key=value"):
    train_speed.parse_set("encode_chunk")
